"""Triton kernels: per-token log-probs ``log_softmax(logits / temperature)[label]`` from logits,
forward and backward, one streaming pass over the vocabulary per row.

Layout: ``logits [N, T, V]`` with unit stride over ``V`` and any ``N``/``T`` strides (element
strides are passed in; no ``.contiguous()`` copy). Labels follow the Hugging Face shift: row
``(n, t)`` for ``t < T - 1`` scores ``labels[n, t + 1]``.

* :func:`forward` -- one program per row ``(n, t < T-1)``. An online log-sum-exp over ``V`` in
  ``BLOCK_V`` chunks (one block max per chunk, so one ``exp2`` per element: with two per element,
  the SFU throughput of an H100 would be about as slow as HBM for bf16 logits), plus one scalar
  load of the target logit. Writes the float32 token log-prob and two float32 row statistics
  (the only thing saved for backward): the max of the raw logits and the log2-sum of
  ``exp2((x - max) * log2e / T)``. Keeping them apart makes backward's ``p`` a function of
  ``x - max`` (exact near the max) instead of ``x / T - lse`` (two large numbers: a relative
  gradient error of ~1e-3 at |logits| ~ 1e4 in fp32). A row whose target is ``ignore_index``
  runs a zero-trip loop: it reads nothing. A target outside ``[0, V)`` is never dereferenced; its log-prob is NaN
  (poison, so a bad label cannot go unnoticed; the ops check the range eagerly on CPU and under
  ``BPO_FAST_DEBUG=1``).
* :func:`backward` -- one program per row ``(n, t)`` including ``t = T - 1``; writes
  ``g * (onehot(label) - softmax(logits / temperature)) / temperature`` in the gradient's
  dtype in one pass. The gradient buffer may be the logits' own storage (in-place backward):
  each program reads a chunk before it overwrites it. Rows with no target, an ignored or bad
  target, or a zero upstream gradient read nothing and only write zeros. The per-row upstream
  gradient comes from one of three sources (``MODE``): per-token ``[N, T-1]``, per-sequence
  ``[N]``, or the fused DPO combination ``(g_loss / B + g_losses[n mod B]) * dlosses[n] +
  g_logps[n]`` computed in-kernel (no chain of small PyTorch ops before the launch).
* :func:`sequence_sums` -- per-sequence sums of token log-probs and counts of scored tokens.

Block sizes: 16-byte vector loads (rows whose strides and ``V`` are multiples of 8-16 elements,
which Triton's argument specialisation detects) and 4K elements per iteration; see
:func:`block_config`. ``BPO_FAST_LOGPROBS_BLOCK_V`` / ``BPO_FAST_LOGPROBS_WARPS`` override
them (the benchmark can sweep them).
"""

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# constants used inside @triton.jit code must be constexpr globals (compiled Triton refuses
# plain Python globals; the interpreter would not notice)
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
# finite "minus infinity" for the running max: exp2(-inf - (-inf)) would be NaN on chunks that
# hold only padding (other=-inf) before any real logit was seen
_NEG_BIG = tl.constexpr(-3.0e38)

MODE_TOKEN, MODE_SEQUENCE, MODE_DPO = 0, 1, 2


# Integers that only index rows or compare labels are not specialised (divisibility by 16 or
# == 1 buys nothing there): one compiled variant per dtype / mode instead of one per shape
# class, for users' first-step JIT time and for the GPU-readiness gate (bpo_fast.tools.gpu_check).
# Row strides and V stay specialised: they decide the 16-byte vector loads.
@triton.jit(do_not_specialize=["sln", "slt", "T1", "ignore_index"])
def _fwd_kernel(x_ptr, sxn, sxt, lab_ptr, sln, slt, lp_ptr, lse_ptr,
                T1, V, ignore_index, scale2,
                BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    n = row // T1
    t = row % T1
    label = tl.load(lab_ptr + n * sln + (t + 1) * slt).to(tl.int64)
    scored = label != ignore_index
    valid = scored & (label >= 0) & (label < V)
    x_row = x_ptr + n * sxn + t * sxt
    offs = tl.arange(0, BLOCK_V)
    # running max of the raw logits (a scalar) and per-lane running sums of
    # exp2((x - max) * scale2): x - max is formed before scaling, so it is exact near the max
    # and p = exp2((x - max) * scale2 - log2(sum)) in backward never subtracts two large numbers
    s = tl.zeros([BLOCK_V], tl.float32)
    m_all = tl.full([], _NEG_BIG, tl.float32)
    # an ignored (or bad) row runs zero iterations: it reads nothing
    v_end = tl.where(valid, V, 0)
    for v0 in range(0, v_end, BLOCK_V):
        cols = v0 + offs
        x = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m_all, tl.max(x, 0))
        # one exp2 per element; the rescale of the old sums is a single scalar exp2
        s = s * tl.exp2((m_all - m_new) * scale2) + tl.exp2((x - m_new) * scale2)
        m_all = m_new
    ls2 = tl.log2(tl.where(valid, tl.sum(s, 0), 1.0))
    safe = tl.where(valid, label, 0)
    xt = tl.load(x_row + safe, mask=valid, other=0.0).to(tl.float32)
    lp = tl.where(valid, ((xt - m_all) * scale2 - ls2) * _LN2, float("nan"))
    lp = tl.where(scored, lp, 0.0)
    tl.store(lp_ptr + row, lp)
    # saved for backward: (max of the raw logits, log2 of the sum of exp2((x - max) * scale2))
    tl.store(lse_ptr + 2 * row, tl.where(valid, m_all, 0.0))
    tl.store(lse_ptr + 2 * row + 1, tl.where(valid, ls2, 0.0))


# MODE_DPO's three optional upstream terms are runtime flags, not constexprs: they add a scalar
# load per row (a uniform branch) next to a row of V logits, and one variant per MODE replaces
# one per flag combination (8 for MODE_DPO) in users' first-step JIT and in the gate.
@triton.jit(do_not_specialize=["sln", "slt", "T", "B", "ignore_index", "has_gloss",
                               "has_glosses", "has_glogps"])
def _bwd_kernel(x_ptr, sxn, sxt, gx_ptr, sgn, sgt, lab_ptr, sln, slt, lse_ptr,
                g_ptr, gl_ptr, gls_ptr, dl_ptr,
                T, V, B, ignore_index, scale2, inv_temp, inv_B,
                has_gloss, has_glosses, has_glogps,
                MODE: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    n = row // T
    t = row % T
    T1 = T - 1
    has_target = t < T1
    label = tl.load(lab_ptr + n * sln + (t + 1) * slt, mask=has_target,
                    other=ignore_index).to(tl.int64)
    valid = has_target & (label != ignore_index) & (label >= 0) & (label < V)
    tok = n * T1 + t
    if MODE == 0:    # per-token upstream gradient [N, T-1]
        g = tl.load(g_ptr + tok, mask=valid, other=0.0)
    elif MODE == 1:  # per-sequence upstream gradient [N]
        g = tl.load(g_ptr + n, mask=valid, other=0.0)
    else:            # fused DPO: (g_loss / B + g_losses[n mod B]) * dlosses[n] + g_logps[n]
        coef = tl.zeros([], tl.float32)
        if has_gloss:
            coef += tl.load(gl_ptr).to(tl.float32) * inv_B
        if has_glosses:
            coef += tl.load(gls_ptr + n % B).to(tl.float32)
        g = coef * tl.load(dl_ptr + n)
        if has_glogps:
            g += tl.load(g_ptr + n).to(tl.float32)
        g = tl.where(valid, g, 0.0)
    g = g.to(tl.float32)
    active = valid & (g != 0.0)
    mx = tl.load(lse_ptr + 2 * tok, mask=active, other=0.0)
    ls2 = tl.load(lse_ptr + 2 * tok + 1, mask=active, other=0.0)
    gi = g * inv_temp
    x_row = x_ptr + n * sxn + t * sxt
    gx_row = gx_ptr + n * sgn + t * sgt
    offs = tl.arange(0, BLOCK_V)
    # masked-off lanes issue no loads: an inactive row only writes zeros
    v_read = tl.where(active, V, 0)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        inb = cols < V
        x = tl.load(x_row + cols, mask=cols < v_read, other=0.0).to(tl.float32)
        p = tl.exp2((x - mx) * scale2 - ls2)
        d = gi * (tl.where(cols == label, 1.0, 0.0) - p)
        d = tl.where(active, d, 0.0)
        tl.store(gx_row + cols, d.to(gx_ptr.dtype.element_ty), mask=inb)


@triton.jit(do_not_specialize=["sln", "slt", "T1", "ignore_index"])
def _seq_sum_kernel(lp_ptr, lab_ptr, sln, slt, out_ptr, cnt_ptr, T1, ignore_index,
                    BLOCK_T: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_T)
    acc = tl.zeros([BLOCK_T], tl.float32)
    cnt = tl.zeros([BLOCK_T], tl.int64)
    for t0 in range(0, T1, BLOCK_T):
        t = t0 + offs
        m = t < T1
        acc += tl.load(lp_ptr + n * T1 + t, mask=m, other=0.0)
        # int64: a runtime stride never meets a 32-bit index in a product (the gate checks)
        lab = tl.load(lab_ptr + n * sln + (t + 1).to(tl.int64) * slt, mask=m, other=ignore_index)
        cnt += tl.where(m & (lab != ignore_index), 1, 0).to(tl.int64)
    tl.store(out_ptr + n, tl.sum(acc, 0))
    tl.store(cnt_ptr + n, tl.sum(cnt, 0))


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------


def block_config(V, element_size):
    """(BLOCK_V, num_warps) for a row of ``V`` elements.

    4096 elements per iteration and 8 warps: 16 elements per thread, i.e. two (bf16/fp16) or
    four (fp32) 16-byte vector loads in flight per thread. Compiled for sm_90 this needs ~55
    registers per thread (forward; ~32-43 backward) and no spills, so about four 8-warp
    programs fit per SM: ~32 KB of bf16 logits in flight per SM, about HBM3's
    bandwidth x latency share per SM. Bigger blocks (8192 with 8 warps) need ~90 registers
    and halve the programs per SM without more bytes in flight. Small vocabularies get one
    block of the next power of two. ``BPO_FAST_LOGPROBS_BLOCK_V`` / ``BPO_FAST_LOGPROBS_WARPS``
    override this (``bench/logprobs.py --sweep`` times the alternatives)."""
    del element_size  # same elements per thread for all dtypes (see above)
    env_b = os.environ.get("BPO_FAST_LOGPROBS_BLOCK_V")
    env_w = os.environ.get("BPO_FAST_LOGPROBS_WARPS")
    block = min(4096, triton.next_power_of_2(max(int(V), 16)))
    if env_b:
        block = int(env_b)
    warps = max(1, min(16, block // 512))
    if env_w:
        warps = int(env_w)
    return block, warps


def int64_labels(labels):
    """``labels`` as int64 (int32 labels are widened, a copy of ``[N, T]``): the kernels take one
    label dtype, so int32 callers compile no variants of their own."""
    return labels if labels.dtype == torch.int64 else labels.long()


def forward(logits, labels, ignore_index, temperature, block_v=None):
    """(token log-probs float32 ``[N, T-1]``, row statistics float32 ``[N, T-1, 2]``: the max
    of the raw logits and ``log2(sum(exp2((x - max) * log2(e) / temperature)))``, the only
    thing :func:`backward` needs; ``lse = max / temperature + stats[..., 1] * ln 2``).
    ``logits`` must have ``stride(2) == 1``; ``labels`` any strides."""
    N, T, V = logits.shape
    T1 = T - 1
    labels = int64_labels(labels)
    lp = torch.empty(N, T1, device=logits.device, dtype=torch.float32)
    stats = torch.empty(N, T1, 2, device=logits.device, dtype=torch.float32)
    if N * T1 == 0:
        return lp, stats
    block, warps = block_config(V, logits.element_size())
    if block_v is not None:
        block = block_v
    _fwd_kernel[(N * T1,)](
        logits, logits.stride(0), logits.stride(1), labels, labels.stride(0), labels.stride(1),
        lp, stats, T1, V, ignore_index, LOG2E / temperature, BLOCK_V=block, num_warps=warps)
    return lp, stats


def backward(logits, labels, stats, ignore_index, temperature, *, mode, g=None, g_loss=None,
             g_losses=None, dlosses=None, B=1, out=None, block_v=None):
    """Gradient w.r.t. ``logits`` (``[N, T, V]``, the logits' dtype) for a per-row upstream
    gradient (see the module doc for ``mode``); ``stats``: the row statistics of :func:`forward`.
    ``out``: the buffer to write (``None``: a new
    contiguous tensor; pass ``logits`` itself for the in-place backward)."""
    N, T, V = logits.shape
    labels = int64_labels(labels)
    if out is None:
        out = torch.empty((N, T, V), device=logits.device, dtype=logits.dtype)
    if N * T == 0:
        return out
    if T == 1:  # nothing is scored; also keeps empty [N, 0] buffers (null pointers) off the launch
        return out.zero_()
    block, warps = block_config(V, logits.element_size())
    if block_v is not None:
        block = block_v
    f32 = stats  # any float32 tensor as a placeholder pointer for absent operands
    _bwd_kernel[(N * T,)](
        logits, logits.stride(0), logits.stride(1), out, out.stride(0), out.stride(1),
        labels, labels.stride(0), labels.stride(1), stats,
        g if g is not None else f32, g_loss if g_loss is not None else f32,
        g_losses if g_losses is not None else f32, dlosses if dlosses is not None else f32,
        T, V, B, ignore_index, LOG2E / temperature, 1.0 / temperature, 1.0 / B,
        int(g_loss is not None), int(g_losses is not None), int(g is not None),
        MODE=mode, BLOCK_V=block, num_warps=warps)
    return out


def sequence_sums(lp, labels, ignore_index):
    """(float32 [N] sums of ``lp [N, T-1]`` rows, int64 [N] counts of scored labels)."""
    N, T1 = lp.shape
    labels = int64_labels(labels)
    sums = torch.empty(N, device=lp.device, dtype=torch.float32)
    cnt = torch.empty(N, device=lp.device, dtype=torch.int64)
    if N == 0:
        return sums, cnt
    if T1 == 0:
        return sums.zero_(), cnt.zero_()
    block = min(1024, triton.next_power_of_2(T1))
    _seq_sum_kernel[(N,)](lp, labels, labels.stride(0), labels.stride(1), sums, cnt, T1,
                          ignore_index, BLOCK_T=block, num_warps=4)
    return sums, cnt
