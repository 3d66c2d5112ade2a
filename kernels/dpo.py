"""Triton kernel: DPO losses, metrics and closed-form gradients over all pairs in one launch.

One program walks the ``B`` pairs in tiles of ``BLOCK_B``. Per tile it either loads the
per-sequence policy log-probs (``TOKENS=False``: :func:`bpo_fast.ops.dpo.dpo_loss`) or reduces
the float32 token log-probs ``[2B, T-1]`` of the logits kernel and counts the scored labels
(``TOKENS=True``: the fused logits -> loss path, so the per-sequence reduction and the loss are
one kernel). It then evaluates the selected loss type (a ``constexpr``: one specialisation per
type) and its derivatives ``d losses_i / d policy_chosen_i`` and ``d losses_i / d
policy_rejected_i`` in closed form, the rewards, margins, and accumulates the mean loss and the
reward accuracy in a fixed order.

Why a single program: ``B`` is a handful to a few hundred pairs and the token log-probs are
``4 * 2B * T`` bytes (128 KB for 32k tokens): reading them with one SM costs microseconds, the
mean needs no atomics (deterministic, no zero-init launch), and everything a DPO step needs
comes out of one launch. The backward of the fused path uses the saved ``dlosses`` inside the
logits-gradient kernel (``kernels/logprobs.py``, ``MODE_DPO``).

Loss-type ids follow ``bpo_fast.ops.dpo.LOSS_TYPES``; the formulas are in that module's doc.
"""

import math

import torch
import triton
import triton.language as tl

(SIGMOID, ROBUST, HINGE, IPO, EXO_PAIR, NCA_PAIR, BCO_PAIR, SPPO_HARD, APO_ZERO, APO_DOWN,
 DISCOPOP, SIGMOID_NORM) = range(12)


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
def _dpo_pairs_kernel(pc_ptr, pr_ptr, tok_ptr, lab_ptr, sln, slt, T1, ignore_index,
                      rc_ptr, rr_ptr, lc_ptr, lr_ptr,
                      loss_ptr, acc_ptr, losses_ptr, crew_ptr, rrew_ptr, marg_ptr, dl_ptr,
                      logps_ptr, ntok_ptr,
                      B, beta, eps, tau, log1m_eps, log_eps,
                      LOSS: tl.constexpr, TOKENS: tl.constexpr, HAS_LEN: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr):
    loss_sum = tl.zeros([BLOCK_B], tl.float32)
    acc_sum = tl.zeros([BLOCK_B], tl.float32)
    for b0 in range(0, B, BLOCK_B):
        ib = (b0 + tl.arange(0, BLOCK_B)).to(tl.int64)
        mb = ib < B
        if TOKENS:
            sc = tl.zeros([BLOCK_B], tl.float32)
            sr = tl.zeros([BLOCK_B], tl.float32)
            nc = tl.zeros([BLOCK_B], tl.int64)
            nr = tl.zeros([BLOCK_B], tl.int64)
            offs_t = tl.arange(0, BLOCK_T)
            for t0 in range(0, T1, BLOCK_T):
                it = (t0 + offs_t).to(tl.int64)
                m2 = mb[:, None] & (it < T1)[None, :]
                sc += tl.sum(tl.load(tok_ptr + ib[:, None] * T1 + it[None, :], mask=m2,
                                     other=0.0), 1)
                sr += tl.sum(tl.load(tok_ptr + (ib + B)[:, None] * T1 + it[None, :], mask=m2,
                                     other=0.0), 1)
                lab_c = tl.load(lab_ptr + ib[:, None] * sln + (it + 1)[None, :] * slt,
                                mask=m2, other=ignore_index)
                lab_r = tl.load(lab_ptr + (ib + B)[:, None] * sln + (it + 1)[None, :] * slt,
                                mask=m2, other=ignore_index)
                nc += tl.sum(tl.where(lab_c != ignore_index, 1, 0).to(tl.int64), 1)
                nr += tl.sum(tl.where(lab_r != ignore_index, 1, 0).to(tl.int64), 1)
            tl.store(logps_ptr + ib, sc, mask=mb)
            tl.store(logps_ptr + B + ib, sr, mask=mb)
            tl.store(ntok_ptr + ib, nc, mask=mb)
            tl.store(ntok_ptr + B + ib, nr, mask=mb)
            pc = sc
            pr = sr
            lc = tl.maximum(nc.to(tl.float32), 1.0)
            lr = tl.maximum(nr.to(tl.float32), 1.0)
        else:
            pc = tl.load(pc_ptr + ib, mask=mb, other=0.0).to(tl.float32)
            pr = tl.load(pr_ptr + ib, mask=mb, other=0.0).to(tl.float32)
            if HAS_LEN:
                lc = tl.maximum(tl.load(lc_ptr + ib, mask=mb, other=1).to(tl.float32), 1.0)
                lr = tl.maximum(tl.load(lr_ptr + ib, mask=mb, other=1).to(tl.float32), 1.0)
            else:
                lc = tl.full([BLOCK_B], 1.0, tl.float32)
                lr = tl.full([BLOCK_B], 1.0, tl.float32)
        c = pc - tl.load(rc_ptr + ib, mask=mb, other=0.0).to(tl.float32)
        r = pr - tl.load(rr_ptr + ib, mask=mb, other=0.0).to(tl.float32)
        d = c - r
        z = beta * d
        zc = beta * c
        zr = beta * r
        # loss and its derivatives w.r.t. c and r (= w.r.t. the policy log-probs)
        if LOSS == 0:  # sigmoid (conservative DPO with label smoothing eps)
            loss = -(1.0 - eps) * _logsig(z) - eps * _logsig(-z)
            gd = beta * (-(1.0 - eps) * _sig(-z) + eps * _sig(z))
            dc = gd
            dr = -gd
        elif LOSS == 1:  # robust
            k = 1.0 / (1.0 - 2.0 * eps)
            loss = (-(1.0 - eps) * _logsig(z) + eps * _logsig(-z)) * k
            gd = beta * (-(1.0 - eps) * _sig(-z) - eps * _sig(z)) * k
            dc = gd
            dr = -gd
        elif LOSS == 2:  # hinge
            h = 1.0 - z
            loss = tl.maximum(h, 0.0)
            gd = tl.where(h > 0.0, -beta, 0.0)
            dc = gd
            dr = -gd
        elif LOSS == 3:  # ipo (length-normalised)
            u = c / lc - r / lr - 0.5 / beta
            loss = u * u
            dc = 2.0 * u / lc
            dr = -2.0 * u / lr
        elif LOSS == 4:  # exo_pair
            sz = _sig(z)
            smz = _sig(-z)
            loss = sz * (_logsig(z) - log1m_eps) + smz * (_logsig(-z) - log_eps)
            gd = beta * sz * smz * (z - log1m_eps + log_eps)
            dc = gd
            dr = -gd
        elif LOSS == 5:  # nca_pair
            loss = -_logsig(zc) - 0.5 * _logsig(-zc) - 0.5 * _logsig(-zr)
            dc = beta * (-_sig(-zc) + 0.5 * _sig(zc))
            dr = 0.5 * beta * _sig(zr)
        elif LOSS == 6:  # bco_pair
            loss = -_logsig(zc) - _logsig(-zr)
            dc = -beta * _sig(-zc)
            dr = beta * _sig(zr)
        elif LOSS == 7:  # sppo_hard
            a = c - 0.5 / beta
            q = r + 0.5 / beta
            loss = a * a + q * q
            dc = 2.0 * a
            dr = 2.0 * q
        elif LOSS == 8:  # apo_zero
            sc_ = _sig(zc)
            sr_ = _sig(zr)
            loss = (1.0 - sc_) + sr_
            dc = -beta * sc_ * _sig(-zc)
            dr = beta * sr_ * _sig(-zr)
        elif LOSS == 9:  # apo_down
            sc_ = _sig(zc)
            sd = _sig(z)
            gsd = beta * sd * _sig(-z)
            loss = sc_ + (1.0 - sd)
            dc = beta * sc_ * _sig(-zc) - gsd
            dr = gsd
        elif LOSS == 10:  # discopop
            m = _sig(z / tau)
            om = _sig(-z / tau)          # 1 - m without cancellation
            ls = _logsig(z)
            e = tl.exp(_logsig(z / tau) - z)   # exp(-z) * m without inf * 0
            loss = -ls * om + e
            gz = -_sig(-z) * om + ls * m * om / tau - e + e * om / tau
            gd = beta * gz
            dc = gd
            dr = -gd
        else:  # sigmoid_norm (length-normalised)
            u = beta * (c / lc - r / lr)
            loss = -_logsig(u)
            g = beta * _sig(-u)
            dc = -g / lc
            dr = g / lr
        crew = zc
        rrew = zr
        tl.store(losses_ptr + ib, loss, mask=mb)
        tl.store(crew_ptr + ib, crew, mask=mb)
        tl.store(rrew_ptr + ib, rrew, mask=mb)
        tl.store(marg_ptr + ib, crew - rrew, mask=mb)
        tl.store(dl_ptr + ib, dc, mask=mb)
        tl.store(dl_ptr + B + ib, dr, mask=mb)
        loss_sum += tl.where(mb, loss, 0.0)
        acc_sum += tl.where(mb & (crew > rrew), 1.0, 0.0)
    tl.store(loss_ptr, tl.sum(loss_sum, 0) / B)
    tl.store(acc_ptr, tl.sum(acc_sum, 0) / B)


def dpo_pairs(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_lengths=None,
              rejected_lengths=None, *, beta, loss_type, label_smoothing, tau,
              token_logps=None, labels=None, ignore_index=-100):
    """Launch the pair kernel. Either ``policy_chosen``/``policy_rejected`` ``[B]`` (any float
    dtype, unit stride) with optional token counts, or ``token_logps [2B, T-1]`` float32
    contiguous + ``labels [2B, T]`` (then the policy inputs are ignored and may be None).
    ``loss_type`` is the index into ``LOSS_TYPES``. Returns a dict of float32 tensors:
    ``loss``, ``reward_accuracy`` (scalars), ``losses``, ``chosen_rewards``,
    ``rejected_rewards``, ``reward_margins`` ``[B]``, ``dlosses [2B]``, and for the token mode
    ``logps [2B]`` float32 and ``n_tokens [2B]`` int64."""
    tokens = token_logps is not None
    B = ref_chosen.shape[0]
    dev = ref_chosen.device
    f = dict(device=dev, dtype=torch.float32)
    out = {k: torch.empty(B, **f) for k in ("losses", "chosen_rewards", "rejected_rewards",
                                             "reward_margins")}
    out["loss"] = torch.empty((), **f)
    out["reward_accuracy"] = torch.empty((), **f)
    out["dlosses"] = torch.empty(2 * B, **f)
    if tokens:
        out["logps"] = torch.empty(2 * B, **f)
        out["n_tokens"] = torch.empty(2 * B, device=dev, dtype=torch.int64)
        T1 = token_logps.shape[1]
        # T == 1: an empty [2B, 0] buffer (maybe a null pointer) is never read: pass another
        tok = token_logps if T1 > 0 else ref_chosen
        lab, sln, slt = labels, labels.stride(0), labels.stride(1)
        pc = pr = tok
        logps_buf, ntok_buf = out["logps"], out["n_tokens"]
    else:
        T1, tok, lab, sln, slt = 0, ref_chosen, ref_chosen, 0, 0
        pc, pr = policy_chosen, policy_rejected
        logps_buf, ntok_buf = out["dlosses"], out["dlosses"]  # unused placeholders
    has_len = chosen_lengths is not None
    lc = chosen_lengths if has_len else ref_chosen
    lr = rejected_lengths if has_len else ref_chosen
    eps = float(label_smoothing)
    log1m = math.log1p(-eps)
    log_e = math.log(eps) if eps > 0 else 0.0  # only exo_pair uses it, and it needs eps > 0
    block_b = min(64, triton.next_power_of_2(B))
    block_t = max(16, min(triton.next_power_of_2(max(T1, 1)), 4096 // block_b))
    _dpo_pairs_kernel[(1,)](
        pc, pr, tok, lab, sln, slt, T1, ignore_index, ref_chosen, ref_rejected, lc, lr,
        out["loss"], out["reward_accuracy"], out["losses"], out["chosen_rewards"],
        out["rejected_rewards"], out["reward_margins"], out["dlosses"], logps_buf, ntok_buf,
        B, float(beta), eps, float(tau), log1m, log_e,
        LOSS=int(loss_type), TOKENS=tokens, HAS_LEN=has_len, BLOCK_B=block_b,
        BLOCK_T=block_t, num_warps=4)
    return out
