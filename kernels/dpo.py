"""Triton kernels: DPO losses, metrics and closed-form gradients for all pairs, two launches.

1. :func:`_dpo_pairs_kernel` -- one program per tile of ``BLOCK_B`` pairs. It either loads the
   per-sequence policy log-probs (``TOKENS=False``: :func:`bpo_fast.ops.dpo.dpo_loss`; tiles of
   128 pairs, one pair per thread) or reduces the float32 token log-probs ``[2B, T-1]`` of the
   logits kernel and counts the scored labels (``TOKENS=True``: the fused logits -> loss path;
   one program per pair, so ``B`` programs stream the ``2B`` rows side by side). The token loop
   accumulates whole ``[BLOCK_B, BLOCK_T]`` tiles and reduces them once after the loop: a
   reduction inside the loop feeding a loop-carried vector is what Triton 3.7's
   ``OptimizeThreadLocality`` pass crashes on. Then it evaluates the selected loss type (a
   ``constexpr``: one specialisation per type, the formulas in :func:`_pair_loss`) with its
   derivatives ``d losses_i / d policy_chosen_i`` and ``d losses_i / d policy_rejected_i`` in
   closed form, and writes the per-pair losses, rewards, margins and derivatives.
2. :func:`_dpo_mean_kernel` -- one program: the mean loss and the reward accuracy from the
   per-pair outputs, in a fixed order (deterministic, no atomics, no zero-init launch).

Size arguments are not specialised (``do_not_specialize``) and pointers not on alignment, and
labels come in one dtype (int32 labels are widened): the kernels move kilobytes, and every
(loss type, ``TOKENS``, ``HAS_LEN``) then has exactly one compiled variant, which
``bpo_fast.tools.gpu_check`` compiles for every supported arch on every supported Triton. The backward of the fused path uses the saved ``dlosses`` inside the
logits-gradient kernel (``kernels/logprobs.py``, ``MODE_DPO``).

Loss-type ids are the named constants below; the loss registry (``bpo_fast/ops/losses.py``) maps
each loss type to one of them (``cdpo`` shares ``SIGMOID``'s branch) and holds the reference
formulas; ``tests/test_losses.py`` checks the two agree.
"""

import math

import torch
import triton
import triton.language as tl

(SIGMOID, ROBUST, HINGE, IPO, EXO_PAIR, NCA_PAIR, BCO_PAIR, SPPO_HARD, APO_ZERO, APO_DOWN,
 DISCOPOP, SIGMOID_NORM) = range(12)
N_LOSS_TYPES = SIGMOID_NORM + 1
# constexpr twins of the ids for the branches inside @triton.jit code
_SIGMOID, _ROBUST, _HINGE, _IPO = (tl.constexpr(SIGMOID), tl.constexpr(ROBUST),
                                   tl.constexpr(HINGE), tl.constexpr(IPO))
_EXO_PAIR, _NCA_PAIR, _BCO_PAIR, _SPPO_HARD = (tl.constexpr(EXO_PAIR), tl.constexpr(NCA_PAIR),
                                              tl.constexpr(BCO_PAIR), tl.constexpr(SPPO_HARD))
_APO_ZERO, _APO_DOWN, _DISCOPOP = (tl.constexpr(APO_ZERO), tl.constexpr(APO_DOWN),
                                   tl.constexpr(DISCOPOP))

# launch shapes (the gate compiles exactly these)
PAIRS_BLOCK_B = 128     # TOKENS=False: pairs per program (4 warps, one pair per thread)
TOKENS_BLOCK_T = 1024   # TOKENS=True: one pair per program, 1024 tokens per step (8 per thread)
MEAN_BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _sig(x):
    # stable on both sides: exp of a non-positive number only
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _logsig(x):
    # logsigmoid(x) = min(x, 0) - log1p(exp(-|x|)); log1p by its series where 1 + u rounds
    u = tl.exp(-tl.abs(x))
    l1p = tl.where(u < 1e-4, u * (1.0 - 0.5 * u), tl.log(1.0 + u))
    return tl.minimum(x, 0.0) - l1p


@triton.jit
def _pair_loss(c, r, lc, lr, beta, eps, tau, log1m_eps, log_eps, LOSS: tl.constexpr):
    """Loss of each pair and its derivatives w.r.t. the chosen / rejected log-ratios ``c``,
    ``r`` (= w.r.t. the policy log-probs). ``lc``/``lr``: token counts (>= 1) for the
    length-normalised types. Returns ``(loss, dc, dr)``."""
    z = beta * (c - r)
    zc = beta * c
    zr = beta * r
    if LOSS == _SIGMOID:  # sigmoid (conservative DPO with label smoothing eps)
        loss = -(1.0 - eps) * _logsig(z) - eps * _logsig(-z)
        gd = beta * (-(1.0 - eps) * _sig(-z) + eps * _sig(z))
        dc = gd
        dr = -gd
    elif LOSS == _ROBUST:
        k = 1.0 / (1.0 - 2.0 * eps)
        loss = (-(1.0 - eps) * _logsig(z) + eps * _logsig(-z)) * k
        gd = beta * (-(1.0 - eps) * _sig(-z) - eps * _sig(z)) * k
        dc = gd
        dr = -gd
    elif LOSS == _HINGE:
        h = 1.0 - z
        loss = tl.maximum(h, 0.0)
        gd = tl.where(h > 0.0, -beta, 0.0)
        dc = gd
        dr = -gd
    elif LOSS == _IPO:  # length-normalised
        u = c / lc - r / lr - 0.5 / beta
        loss = u * u
        dc = 2.0 * u / lc
        dr = -2.0 * u / lr
    elif LOSS == _EXO_PAIR:
        sz = _sig(z)
        smz = _sig(-z)
        loss = sz * (_logsig(z) - log1m_eps) + smz * (_logsig(-z) - log_eps)
        gd = beta * sz * smz * (z - log1m_eps + log_eps)
        dc = gd
        dr = -gd
    elif LOSS == _NCA_PAIR:
        loss = -_logsig(zc) - 0.5 * _logsig(-zc) - 0.5 * _logsig(-zr)
        dc = beta * (-_sig(-zc) + 0.5 * _sig(zc))
        dr = 0.5 * beta * _sig(zr)
    elif LOSS == _BCO_PAIR:
        loss = -_logsig(zc) - _logsig(-zr)
        dc = -beta * _sig(-zc)
        dr = beta * _sig(zr)
    elif LOSS == _SPPO_HARD:
        a = c - 0.5 / beta
        q = r + 0.5 / beta
        loss = a * a + q * q
        dc = 2.0 * a
        dr = 2.0 * q
    elif LOSS == _APO_ZERO:
        sc_ = _sig(zc)
        sr_ = _sig(zr)
        loss = (1.0 - sc_) + sr_
        dc = -beta * sc_ * _sig(-zc)
        dr = beta * sr_ * _sig(-zr)
    elif LOSS == _APO_DOWN:
        sc_ = _sig(zc)
        sd = _sig(z)
        gsd = beta * sd * _sig(-z)
        loss = sc_ + (1.0 - sd)
        dc = beta * sc_ * _sig(-zc) - gsd
        dr = gsd
    elif LOSS == _DISCOPOP:
        m = _sig(z / tau)
        om = _sig(-z / tau)          # 1 - m without cancellation
        ls = _logsig(z)
        e = tl.exp(_logsig(z / tau) - z)   # exp(-z) * m without inf * 0
        loss = -ls * om + e
        gz = -_sig(-z) * om + ls * m * om / tau - e + e * om / tau
        gd = beta * gz
        dc = gd
        dr = -gd
    else:  # SIGMOID_NORM (length-normalised)
        u = beta * (c / lc - r / lr)
        loss = -_logsig(u)
        g = beta * _sig(-u)
        dc = -g / lc
        dr = g / lr
    return loss, dc, dr


_PTRS = ["pc_ptr", "pr_ptr", "tok_ptr", "lab_ptr", "rc_ptr", "rr_ptr", "lc_ptr", "lr_ptr",
         "losses_ptr", "crew_ptr", "rrew_ptr", "marg_ptr", "dl_ptr", "logps_ptr", "ntok_ptr"]


@triton.jit(do_not_specialize=["sln", "slt", "T1", "ignore_index", "B"],
            do_not_specialize_on_alignment=_PTRS)
def _dpo_pairs_kernel(pc_ptr, pr_ptr, tok_ptr, lab_ptr, sln, slt, T1, ignore_index,
                      rc_ptr, rr_ptr, lc_ptr, lr_ptr,
                      losses_ptr, crew_ptr, rrew_ptr, marg_ptr, dl_ptr, logps_ptr, ntok_ptr,
                      B, beta, eps, tau, log1m_eps, log_eps,
                      LOSS: tl.constexpr, TOKENS: tl.constexpr, HAS_LEN: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr):
    ib = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    mb = ib < B
    if TOKENS:
        # whole tiles accumulate in the loop (per lane, fixed order); reduced once after it
        acc_c = tl.zeros([BLOCK_B, BLOCK_T], tl.float32)
        acc_r = tl.zeros([BLOCK_B, BLOCK_T], tl.float32)
        cnt_c = tl.zeros([BLOCK_B, BLOCK_T], tl.int32)
        cnt_r = tl.zeros([BLOCK_B, BLOCK_T], tl.int32)
        offs_t = tl.arange(0, BLOCK_T)
        row_c = ib[:, None] * T1
        row_r = (ib + B)[:, None] * T1
        lrow_c = lab_ptr + ib[:, None] * sln
        lrow_r = lab_ptr + (ib + B)[:, None] * sln
        for t0 in range(0, T1, BLOCK_T):
            it = (t0 + offs_t).to(tl.int64)[None, :]
            m2 = mb[:, None] & (it < T1)
            acc_c += tl.load(tok_ptr + row_c + it, mask=m2, other=0.0)
            acc_r += tl.load(tok_ptr + row_r + it, mask=m2, other=0.0)
            lab_c = tl.load(lrow_c + (it + 1) * slt, mask=m2, other=ignore_index)
            lab_r = tl.load(lrow_r + (it + 1) * slt, mask=m2, other=ignore_index)
            cnt_c += (lab_c != ignore_index).to(tl.int32)
            cnt_r += (lab_r != ignore_index).to(tl.int32)
        pc = tl.sum(acc_c, 1)
        pr = tl.sum(acc_r, 1)
        nc = tl.sum(cnt_c, 1).to(tl.int64)
        nr = tl.sum(cnt_r, 1).to(tl.int64)
        tl.store(logps_ptr + ib, pc, mask=mb)
        tl.store(logps_ptr + B + ib, pr, mask=mb)
        tl.store(ntok_ptr + ib, nc, mask=mb)
        tl.store(ntok_ptr + B + ib, nr, mask=mb)
        lc = tl.maximum(nc.to(tl.float32), 1.0)
        lr = tl.maximum(nr.to(tl.float32), 1.0)
    else:
        pc = tl.load(pc_ptr + ib, mask=mb, other=0.0)
        pr = tl.load(pr_ptr + ib, mask=mb, other=0.0)
        if HAS_LEN:
            lc = tl.maximum(tl.load(lc_ptr + ib, mask=mb, other=1.0), 1.0)
            lr = tl.maximum(tl.load(lr_ptr + ib, mask=mb, other=1.0), 1.0)
        else:
            lc = tl.full([BLOCK_B], 1.0, tl.float32)
            lr = tl.full([BLOCK_B], 1.0, tl.float32)
    c = pc - tl.load(rc_ptr + ib, mask=mb, other=0.0)
    r = pr - tl.load(rr_ptr + ib, mask=mb, other=0.0)
    loss, dc, dr = _pair_loss(c, r, lc, lr, beta, eps, tau, log1m_eps, log_eps, LOSS)
    crew = beta * c
    rrew = beta * r
    tl.store(losses_ptr + ib, loss, mask=mb)
    tl.store(crew_ptr + ib, crew, mask=mb)
    tl.store(rrew_ptr + ib, rrew, mask=mb)
    tl.store(marg_ptr + ib, crew - rrew, mask=mb)
    tl.store(dl_ptr + ib, dc, mask=mb)
    tl.store(dl_ptr + B + ib, dr, mask=mb)


@triton.jit(do_not_specialize=["B"],
            do_not_specialize_on_alignment=["losses_ptr", "crew_ptr", "rrew_ptr", "loss_ptr",
                                            "acc_ptr"])
def _dpo_mean_kernel(losses_ptr, crew_ptr, rrew_ptr, loss_ptr, acc_ptr, B,
                     BLOCK: tl.constexpr):
    # one program, fixed order: per-lane sums over the blocks, then one tree reduction
    loss_sum = tl.zeros([BLOCK], tl.float32)
    acc_sum = tl.zeros([BLOCK], tl.float32)
    for b0 in range(0, B, BLOCK):
        ib = b0 + tl.arange(0, BLOCK)
        mb = ib < B
        loss_sum += tl.load(losses_ptr + ib, mask=mb, other=0.0)
        win = tl.load(crew_ptr + ib, mask=mb, other=0.0) > tl.load(rrew_ptr + ib, mask=mb,
                                                                  other=0.0)
        acc_sum += tl.where(mb & win, 1.0, 0.0)
    tl.store(loss_ptr, tl.sum(loss_sum, 0) / B)
    tl.store(acc_ptr, tl.sum(acc_sum, 0) / B)


def _f32(x):
    # tiny [B] vectors: one float32 layout for every caller, so one compiled variant
    return x if x.dtype == torch.float32 and x.stride(0) == 1 else x.to(torch.float32).contiguous()


def pairs_config(tokens):
    """(BLOCK_B, BLOCK_T, num_warps) of :func:`_dpo_pairs_kernel` (fixed: see the module doc)."""
    return (1, TOKENS_BLOCK_T, NUM_WARPS) if tokens else (PAIRS_BLOCK_B, 16, NUM_WARPS)


def dpo_pairs(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_lengths=None,
              rejected_lengths=None, *, beta, loss_type, label_smoothing, tau,
              token_logps=None, labels=None, ignore_index=-100):
    """Launch the pair kernels. Either ``policy_chosen``/``policy_rejected`` ``[B]`` (any float
    dtype) with optional token counts, or ``token_logps [2B, T-1]`` float32 contiguous +
    ``labels [2B, T]`` (then the policy inputs and counts are ignored and may be None; the
    counts come from the labels). ``loss_type`` is a kernel id (``REGISTRY[name].kernel_id``).
    Returns a dict of float32 tensors: ``loss``, ``reward_accuracy`` (scalars), ``losses``,
    ``chosen_rewards``, ``rejected_rewards``, ``reward_margins`` ``[B]``, ``dlosses [2B]``, and
    for the token mode ``logps [2B]`` float32 and ``n_tokens [2B]`` int64."""
    tokens = token_logps is not None
    B = ref_chosen.shape[0]
    dev = ref_chosen.device
    f = dict(device=dev, dtype=torch.float32)
    out = {k: torch.empty(B, **f) for k in ("losses", "chosen_rewards", "rejected_rewards",
                                             "reward_margins")}
    out["loss"] = torch.empty((), **f)
    out["reward_accuracy"] = torch.empty((), **f)
    out["dlosses"] = torch.empty(2 * B, **f)
    rc, rr = _f32(ref_chosen), _f32(ref_rejected)
    if tokens:
        out["logps"] = torch.empty(2 * B, **f)
        out["n_tokens"] = torch.empty(2 * B, device=dev, dtype=torch.int64)
        T1 = token_logps.shape[1]
        # T == 1: an empty [2B, 0] buffer (maybe a null pointer) is never read: pass another
        tok = token_logps if T1 > 0 else rc
        lab = labels if labels.dtype == torch.int64 else labels.long()  # one label dtype
        sln, slt = lab.stride(0), lab.stride(1)
        pc = pr = tok
        logps_buf, ntok_buf = out["logps"], out["n_tokens"]
        has_len = False
    else:
        T1, tok, lab, sln, slt = 0, rc, rc, 0, 0
        pc, pr = _f32(policy_chosen), _f32(policy_rejected)
        logps_buf, ntok_buf = out["dlosses"], out["dlosses"]  # unused placeholders
        has_len = chosen_lengths is not None
    lc = _f32(chosen_lengths) if has_len else rc
    lr = _f32(rejected_lengths) if has_len else rc
    eps = float(label_smoothing)
    log1m = math.log1p(-eps)
    log_e = math.log(eps) if eps > 0 else 0.0  # only exo_pair uses it, and it needs eps > 0
    block_b, block_t, warps = pairs_config(tokens)
    _dpo_pairs_kernel[(triton.cdiv(B, block_b),)](
        pc, pr, tok, lab, sln, slt, T1, ignore_index, rc, rr, lc, lr,
        out["losses"], out["chosen_rewards"], out["rejected_rewards"], out["reward_margins"],
        out["dlosses"], logps_buf, ntok_buf,
        B, float(beta), eps, float(tau), log1m, log_e,
        LOSS=int(loss_type), TOKENS=tokens, HAS_LEN=has_len, BLOCK_B=block_b,
        BLOCK_T=block_t, num_warps=warps)
    _dpo_mean_kernel[(1,)](out["losses"], out["chosen_rewards"], out["rejected_rewards"],
                           out["loss"], out["reward_accuracy"], B, BLOCK=MEAN_BLOCK,
                           num_warps=NUM_WARPS)
    return out
