"""Triton kernels for the fused LM head (log-probs straight from hidden states).

Two GPU strategies live here; ``bpo_fast/ops/linear.py`` orchestrates them and
``bench/linear.py`` times both:

* **cublas** -- cuBLAS produces a float32 chunk of logits ``z = h_c @ W_v.T`` and two
  row-wise kernels reduce it on the fly:
  :func:`lse_update` folds the chunk into running (max, sum-exp) statistics and gathers the
  target logit; :func:`dlogits` turns it into ``d = (onehot - softmax) * g / temperature`` in
  the matmul dtype, ready for the two backward GEMMs (a separate buffer for 2-byte dtypes,
  see :func:`dlogits` for why).
* **triton** -- CCE-style kernels that never write logits at all: :func:`fused_forward`
  computes ``[BM, BV]`` logit tiles with ``tl.dot`` (float32 accumulators) and reduces them
  with an online log-sum-exp; :func:`fused_backward` recomputes each tile, forms ``d`` and
  accumulates ``grad_hidden`` / ``grad_weight`` / ``grad_bias``: with relaxed float32 atomics
  (fast path), or deterministically with two non-atomic passes (``deterministic=True``, the
  default under ``torch.use_deterministic_algorithms(True)``).

**Logit soft-capping** (Gemma 2 / PaliGemma 2 ``final_logit_softcapping``): with
``SOFTCAP=True`` (a constexpr, so the un-capped specialisations compile exactly as without it)
every kernel turns the logit ``z = h @ W.T + b`` into ``cap * tanh(z / cap)`` before the
temperature and the log-sum-exp, and the backward multiplies ``d`` by the derivative
``1 - tanh(z / cap)^2``, formed as ``(1 - t)(1 + t)`` from the capped logit itself (``t = x /
cap``: no second tile held, the same rounding as PyTorch's ``tanh`` backward). ``tanh`` is
formed from one ``exp`` (:func:`_tanh`: the interpreter has no libdevice ``tanh``), with a series
near 0 so that it keeps float32 relative accuracy.

Scored positions are compacted by the caller; hidden rows are read through a per-row element
offset (``row_off``) so that any strided ``hidden [N, T, H]`` works without a copy when every
stride of ``hidden`` (but the last, 1) and its start are 16-byte aligned: the kernels are told
so (``ROW_ALIGN``, a ``tl.multiple_of`` hint) and load hidden rows with 16-byte vectors (else
the launchers compact the scored rows into an aligned copy first).

Tiles come from a fixed table per (arch, dtype) (:func:`tile_config`), checked for every
supported Triton by ``python -m bpo_fast.tools.gpu_check``: no spills, shared memory within the
arch's per-block limit. There is no autotuning (a trial would have to restore the multi-GB
float32 ``grad_weight`` it accumulates into).

Everything runs under ``TRITON_INTERPRET=1`` on CPU tensors (small fp32 shapes), which is how
the test-suite checks these kernels on machines without a GPU.
"""

import torch
import triton
import triton.language as tl

from bpo_fast.kernels.target import gpu_target


# ----------------------------------------------------------------------------------------------
# logit soft-capping
# ----------------------------------------------------------------------------------------------


@triton.jit
def _tanh(y):
    """``tanh(y)`` in float32 from one ``exp``: ``sign(y) (1 - e) / (1 + e)``, ``e = exp(-2|y|)``,
    and its odd series below ``|y| = 1/8``, where ``1 - e`` would cancel."""
    a = tl.abs(y)
    e = tl.exp(-2.0 * a)
    y2 = y * y
    series = a * (1.0 + y2 * (-0.3333333333333333 + y2 * (0.13333333333333333
                                                         + y2 * -0.05396825396825397)))
    t = tl.where(a < 0.125, series, (1.0 - e) / (1.0 + e))
    return tl.where(y < 0, -t, t)


@triton.jit
def _softcap(x, softcap):
    """``softcap * tanh(x / softcap)``."""
    return _tanh(x / softcap) * softcap


@triton.jit
def _softcap_grad(d, x, softcap):
    """``d * (1 - t^2)`` with ``t = x / softcap`` the tanh of the capped logit ``x``."""
    t = x / softcap
    return d * ((1.0 - t) * (1.0 + t))


# ----------------------------------------------------------------------------------------------
# cublas strategy: row-wise reductions of a float32 logits chunk
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["v0"])
def _lse_update_kernel(z_ptr, stride_z, b_ptr, tgt_ptr, m_ptr, s_ptr, t_ptr,
                       v0, n_cols, inv_temp, softcap,
                       HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    m = tl.load(m_ptr + row)
    s = tl.load(s_ptr + row)
    for c0 in range(0, n_cols, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        mask = cols < n_cols
        x = tl.load(z_row + cols, mask=mask, other=0.0)
        if HAS_BIAS:
            x += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if SOFTCAP:
            x = _softcap(x, softcap)
        x = tl.where(mask, x * inv_temp, float("-inf"))
        # every block holds at least one real column, so m_new is finite and exp(m - m_new)
        # is 0 (not NaN) on the first block where m is still -inf
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    tl.store(m_ptr + row, m)
    tl.store(s_ptr + row, s)
    # the target logit, when the target falls inside this vocabulary chunk
    t = tl.load(tgt_ptr + row) - v0
    hit = (t >= 0) & (t < n_cols)
    t_safe = tl.where(hit, t, 0)
    zt = tl.load(z_row + t_safe)
    if HAS_BIAS:
        zt += tl.load(b_ptr + t_safe).to(tl.float32)
    if SOFTCAP:
        zt = _softcap(zt, softcap)
    tl.store(t_ptr + row, zt * inv_temp, mask=hit)


def _row_config(n_cols, device):  # the block's cap per arch: see _row_block_cap
    block_v = min(_row_block_cap(device), triton.next_power_of_2(n_cols))
    return block_v, 8 if block_v >= 2048 else 4


def _cap_args(softcap):
    """(runtime value, SOFTCAP constexpr) of an optional logit cap."""
    return (1.0, False) if softcap is None else (float(softcap), True)


def lse_update(z, bias_v, targets, m, s, tgt_logit, v0, inv_temp, block_v=None, softcap=None):
    """Fold the float32 chunk ``z [C, Vc]`` (columns ``v0 .. v0+Vc`` of the logits, before bias,
    cap and temperature) into the running max ``m [C]`` and sum-exp ``s [C]`` (in place), and
    write ``x[target]`` into ``tgt_logit [C]`` for rows whose target is in range, where
    ``x = cap(z + b) / temperature`` and ``cap(y) = softcap * tanh(y / softcap)`` (identity when
    ``softcap`` is None)."""
    C, n_cols = z.shape
    if C == 0:
        return
    assert z.dtype == torch.float32 and z.stride(1) == 1
    bv, warps = _row_config(n_cols, z.device)
    cap, has_cap = _cap_args(softcap)
    _lse_update_kernel[(C,)](
        z, z.stride(0), bias_v if bias_v is not None else z, targets, m, s, tgt_logit,
        v0, n_cols, float(inv_temp), cap,
        HAS_BIAS=bias_v is not None, SOFTCAP=has_cap, BLOCK_V=block_v or bv, num_warps=warps)


@triton.jit(do_not_specialize=["v0"])
def _dlogits_kernel(z_ptr, stride_z, d_ptr, stride_d, b_ptr, tgt_ptr, lse_ptr, gs_ptr,
                    v0, n_cols, inv_temp, softcap,
                    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    # d_ptr is z_ptr itself (float32 d) or a buffer of its own (2-byte d): see dlogits()
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    d_row = d_ptr + row * stride_d
    lse = tl.load(lse_ptr + row)
    gs = tl.load(gs_ptr + row)
    t = tl.load(tgt_ptr + row) - v0
    for c0 in range(0, n_cols, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        mask = cols < n_cols
        x = tl.load(z_row + cols, mask=mask, other=0.0)
        if HAS_BIAS:
            x += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if SOFTCAP:
            x = _softcap(x, softcap)
        p = tl.exp(x * inv_temp - lse)
        d = (tl.where(cols == t, 1.0, 0.0) - p) * gs
        if SOFTCAP:
            d = _softcap_grad(d, x, softcap)
        tl.store(d_row + cols, d.to(d_ptr.dtype.element_ty), mask=mask)


def dlogits(z, bias_v, targets, lse, gscale, v0, inv_temp, dtype, block_v=None, softcap=None):
    """``d = (onehot(target - v0) - softmax) * gscale`` in ``dtype`` for the float32 chunk
    ``z [C, Vc]`` (``gscale`` is ``g / temperature`` per row), times ``1 - tanh(z / softcap)^2``
    when the logits are capped (``softcap``, see :func:`lse_update`). Returns ``d [C, Vc]``.

    Race-free by construction. For float32 ``d`` is written over ``z`` in place: element ``i``
    is loaded and stored by the same thread at the same address (the load and the store use one
    index tensor, hence one layout), so no thread ever writes bytes another thread reads. For
    bf16/fp16 ``d`` gets a buffer of its own: writing 2-byte ``d`` over the 4-byte ``z`` would
    put warp w's stores on float32 elements that other warps of the same program may not have
    read yet (Triton gives no ordering between the warps of a program, and the compiled code
    has no barrier), a write-after-read race. Memory cost: ``2 * C * Vc`` bytes next to the
    ``4 * C * Vc`` of the tile (+50% of the tile, freed with it; the ops layer's chunk size
    bounds both)."""
    C, n_cols = z.shape
    assert z.dtype == torch.float32 and z.stride(1) == 1
    d = z if dtype == torch.float32 else torch.empty((C, n_cols), device=z.device, dtype=dtype)
    if C == 0:
        return d
    bv, warps = _row_config(n_cols, z.device)
    cap, has_cap = _cap_args(softcap)
    _dlogits_kernel[(C,)](
        z, z.stride(0), d, d.stride(0), bias_v if bias_v is not None else z, targets, lse, gscale,
        v0, n_cols, float(inv_temp), cap,
        HAS_BIAS=bias_v is not None, SOFTCAP=has_cap, BLOCK_V=block_v or bv, num_warps=warps)
    return d


# ----------------------------------------------------------------------------------------------
# triton strategy: logit tiles from tl.dot, reduced on the fly (never written to memory)
# ----------------------------------------------------------------------------------------------


# Element offsets that multiply a runtime stride are formed in int64: (H - 1) * V alone passes
# 2^31 for a [V, H] view of an [H, V] matrix at H 8192, V 262208 (the launchers pass such a
# weight contiguous, these stay exact whatever they are given). With the usual stride 1 (a
# specialised constant) the cast costs nothing. `python -m bpo_fast.tools.gpu_check` fails any
# 32-bit product of a runtime integer argument.
@triton.jit
def _h_offsets(roff, ks, stride_hk):
    return roff[:, None] + ks[None, :].to(tl.int64) * stride_hk


@triton.jit
def _w_offsets(cols, ks, stride_wv, stride_wk):
    return cols[:, None].to(tl.int64) * stride_wv + ks[None, :].to(tl.int64) * stride_wk


@triton.jit
def _logit_tile(h_ptr, roff, rmask, stride_hk, w_ptr, cols, cmask, stride_wv, stride_wk, H,
                BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    acc = tl.zeros((BM, BV), dtype=tl.float32)
    for k0 in range(0, H, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < H
        a = tl.load(h_ptr + _h_offsets(roff, ks, stride_hk),
                    mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(w_ptr + _w_offsets(cols, ks, stride_wv, stride_wk),
                    mask=cmask[:, None] & kmask[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PREC)
    return acc


@triton.jit
def _row_offsets(roff_ptr, rows, rmask, ROW_ALIGN: tl.constexpr):
    roff = tl.load(roff_ptr + rows, mask=rmask, other=0)
    if ROW_ALIGN > 1:
        # the launcher checked that every row of hidden starts 16 bytes aligned
        roff = tl.multiple_of(roff, ROW_ALIGN)
    return roff


@triton.jit
def _d_tile(acc, b_ptr, cols, cmask, rows, rmask, lse_ptr, gs_ptr, tgt_ptr, inv_temp, has_bias,
            softcap, SOFTCAP: tl.constexpr):
    """``d = (onehot(target) - softmax) * gscale`` of a logit tile (times the cap's derivative
    with ``SOFTCAP``), 0 outside the bounds."""
    if has_bias:
        acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    gs = tl.load(gs_ptr + rows, mask=rmask, other=0.0)
    tgt = tl.load(tgt_ptr + rows, mask=rmask, other=-1)
    if SOFTCAP:
        acc = _softcap(acc, softcap)
    p = tl.exp(acc * inv_temp - lse[:, None])
    d = (tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0) - p) * gs[:, None]
    if SOFTCAP:
        d = _softcap_grad(d, acc, softcap)
    return tl.where(rmask[:, None] & cmask[None, :], d, 0.0)


# Flags that only switch whole blocks of work on or off (a bias, which gradients) are runtime
# arguments, not constexprs: one compiled variant per (dtype, tile) instead of one per flag
# combination (fewer first-step JIT compiles for users, fewer variants for the gate to prove);
# the branches are uniform per program and cost nothing measurable next to the tile products.
# V is not specialised either: it only bounds the vocabulary masks (rows of the weight tile,
# whose loads are vectorised along H; the bias vector), so whether it is a multiple of 16
# changes nothing but a [BV] bias load per tile, and 32000 and 32001 share a variant.
_FLAGS = ["has_bias", "need_gh", "need_gw", "need_gb"]


@triton.jit(do_not_specialize=["S", "V", "SPLIT"] + _FLAGS)
def _fused_fwd_kernel(h_ptr, roff_ptr, stride_hk, w_ptr, stride_wv, stride_wk, b_ptr, tgt_ptr,
                      m_ptr, s_ptr, t_ptr, S, V, H, inv_temp, softcap, SPLIT, has_bias,
                      ROW_ALIGN: tl.constexpr, BM: tl.constexpr,
                      BV: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
                      SOFTCAP: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    # this program's share of the vocabulary: whole BV blocks (a share may be empty, which the
    # host-side combine reads as m = -inf, s = 0)
    v_per_split = tl.cdiv(tl.cdiv(V, BV), SPLIT) * BV
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < S
    roff = _row_offsets(roff_ptr, rows, rmask, ROW_ALIGN)
    tgt = tl.load(tgt_ptr + rows, mask=rmask, other=-1)
    m = tl.full((BM,), float("-inf"), tl.float32)
    s = tl.zeros((BM,), tl.float32)
    tlog = tl.zeros((BM,), tl.float32)
    v_start = pid_s * v_per_split
    v_end = tl.minimum(V, v_start + v_per_split)
    for v0 in range(v_start, v_end, BV):
        cols = v0 + tl.arange(0, BV)
        cmask = cols < v_end
        acc = _logit_tile(h_ptr, roff, rmask, stride_hk, w_ptr, cols, cmask, stride_wv, stride_wk,
                          H, BM, BV, BK, PREC)
        if has_bias:
            acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if SOFTCAP:
            acc = _softcap(acc, softcap)
        x = tl.where(cmask[None, :], acc * inv_temp, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m = m_new
        tlog += tl.sum(tl.where(cols[None, :] == tgt[:, None], x, 0.0), axis=1)
    out = pid_s.to(tl.int64) * S + rows
    tl.store(m_ptr + out, m, mask=rmask)
    tl.store(s_ptr + out, s, mask=rmask)
    tl.store(t_ptr + out, tlog, mask=rmask)


@triton.jit(do_not_specialize=["S", "V"] + _FLAGS)
def _fused_bwd_kernel(h_ptr, roff_ptr, stride_hk, w_ptr, stride_wv, stride_wk, b_ptr, tgt_ptr,
                      lse_ptr, gs_ptr, gh_ptr, gw_ptr, gb_ptr, S, V, H, inv_temp, softcap,
                      has_bias, need_gh, need_gw, need_gb,
                      ROW_ALIGN: tl.constexpr, BM: tl.constexpr,
                      BV: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
                      SOFTCAP: tl.constexpr, GROUP: tl.constexpr):
    # Program order: GROUP row blocks at a time, the row block fastest within the group, so the
    # programs running at once cover GROUP row blocks x (resident / GROUP) vocabulary blocks:
    # the float32 atomics into grad_weight (per vocabulary block) and grad_hidden (per row
    # block) each see few concurrent writers. The K loop also starts at a per-program offset,
    # so writers of the same block rarely hit the same addresses at the same time.
    pid = tl.program_id(0)
    n_m = tl.cdiv(S, BM)
    n_v = tl.cdiv(V, BV)
    width = GROUP * n_v
    first_m = (pid // width) * GROUP
    gsize = tl.minimum(n_m - first_m, GROUP)
    pid_m = first_m + (pid % width) % gsize
    pid_v = (pid % width) // gsize
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < S
    cols = pid_v * BV + tl.arange(0, BV)
    cmask = cols < V
    roff = _row_offsets(roff_ptr, rows, rmask, ROW_ALIGN)
    acc = _logit_tile(h_ptr, roff, rmask, stride_hk, w_ptr, cols, cmask, stride_wv, stride_wk,
                      H, BM, BV, BK, PREC)
    d = _d_tile(acc, b_ptr, cols, cmask, rows, rmask, lse_ptr, gs_ptr, tgt_ptr, inv_temp,
                has_bias, softcap, SOFTCAP)
    if need_gb:
        tl.atomic_add(gb_ptr + cols, tl.sum(d, axis=0), mask=cmask, sem="relaxed")
    # the two gradient products take d in the matmul dtype (tensor cores), accumulate in fp32
    dc = d.to(w_ptr.dtype.element_ty)
    nk = tl.cdiv(H, BK)
    rot = pid_m + pid_v
    for i in range(0, nk):
        ks = ((i + rot) % nk) * BK + tl.arange(0, BK)
        kmask = ks < H
        if need_gh:
            wt = tl.load(w_ptr + _w_offsets(cols, ks, stride_wv, stride_wk),
                         mask=cmask[:, None] & kmask[None, :], other=0.0)
            gh = tl.dot(dc, wt, input_precision=PREC)
            tl.atomic_add(gh_ptr + rows[:, None].to(tl.int64) * H + ks[None, :], gh,
                          mask=rmask[:, None] & kmask[None, :], sem="relaxed")
        if need_gw:
            ht = tl.load(h_ptr + _h_offsets(roff, ks, stride_hk),
                         mask=rmask[:, None] & kmask[None, :], other=0.0)
            gw = tl.dot(tl.trans(dc), ht, input_precision=PREC)
            tl.atomic_add(gw_ptr + cols[:, None].to(tl.int64) * H + ks[None, :], gw,
                          mask=cmask[:, None] & kmask[None, :], sem="relaxed")


@triton.jit(do_not_specialize=["S", "V"] + _FLAGS)
def _fused_bwd_det_kernel(h_ptr, roff_ptr, stride_hk, w_ptr, stride_wv, stride_wk, b_ptr,
                          tgt_ptr, lse_ptr, gs_ptr, gh_ptr, gw_ptr, gb_ptr, S, V, H, inv_temp,
                          softcap, has_bias, need_gh, need_gw, need_gb, ROWS: tl.constexpr,
                          ROW_ALIGN: tl.constexpr, BM: tl.constexpr,
                          BV: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
                          SOFTCAP: tl.constexpr):
    # Deterministic backward, no atomics: each program owns a block of outputs and adds into
    # it in a fixed order. ROWS: a row block of grad_hidden, looping over the vocabulary;
    # else a vocabulary block of grad_weight (and grad_bias), looping over the rows. Each pass
    # recomputes its logit tiles (4/3 of the atomic path's FLOPs for both gradients).
    # The read-add-write of a grad_hidden / grad_weight tile (`cur = tl.load(ptrs)`, then
    # `tl.store(ptrs, cur + ...)`) is not race-free by same-thread ownership, as `_dlogits_kernel`
    # is: the load and the store use different layouts (the load's blocked layout is converted
    # to the dot's MMA layout, the sum to a store layout), so threads store elements that other
    # threads loaded. It is safe because the compiler routes those conversions through shared
    # memory behind a barrier (bar.sync), which no thread passes before every thread's load of
    # `cur` is done: a property of the compiled code (seen in the TTGIR/PTX of Triton 3.6-3.9),
    # not a guarantee of the language. Should a Triton ever convert between the two layouts
    # without that barrier, a `tl.debug_barrier()` between the load and the store is needed.
    if ROWS:
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        rmask = rows < S
        roff = _row_offsets(roff_ptr, rows, rmask, ROW_ALIGN)
        for v0 in range(0, V, BV):
            cols = v0 + tl.arange(0, BV)
            cmask = cols < V
            acc = _logit_tile(h_ptr, roff, rmask, stride_hk, w_ptr, cols, cmask, stride_wv,
                              stride_wk, H, BM, BV, BK, PREC)
            d = _d_tile(acc, b_ptr, cols, cmask, rows, rmask, lse_ptr, gs_ptr, tgt_ptr,
                        inv_temp, has_bias, softcap, SOFTCAP)
            dc = d.to(w_ptr.dtype.element_ty)
            for k0 in range(0, H, BK):
                ks = k0 + tl.arange(0, BK)
                kmask = ks < H
                wt = tl.load(w_ptr + _w_offsets(cols, ks, stride_wv, stride_wk),
                             mask=cmask[:, None] & kmask[None, :], other=0.0)
                ptrs = gh_ptr + rows[:, None].to(tl.int64) * H + ks[None, :]
                m2 = rmask[:, None] & kmask[None, :]
                cur = tl.load(ptrs, mask=m2, other=0.0)
                tl.store(ptrs, cur + tl.dot(dc, wt, input_precision=PREC), mask=m2)
    else:
        cols = tl.program_id(0) * BV + tl.arange(0, BV)
        cmask = cols < V
        gb = tl.zeros((BV,), tl.float32)
        for m0 in range(0, S, BM):
            rows = m0 + tl.arange(0, BM)
            rmask = rows < S
            roff = _row_offsets(roff_ptr, rows, rmask, ROW_ALIGN)
            acc = _logit_tile(h_ptr, roff, rmask, stride_hk, w_ptr, cols, cmask, stride_wv,
                              stride_wk, H, BM, BV, BK, PREC)
            d = _d_tile(acc, b_ptr, cols, cmask, rows, rmask, lse_ptr, gs_ptr, tgt_ptr,
                        inv_temp, has_bias, softcap, SOFTCAP)
            if need_gb:
                gb += tl.sum(d, axis=0)
            if need_gw:
                dc = d.to(w_ptr.dtype.element_ty)
                for k0 in range(0, H, BK):
                    ks = k0 + tl.arange(0, BK)
                    kmask = ks < H
                    ht = tl.load(h_ptr + _h_offsets(roff, ks, stride_hk),
                                 mask=rmask[:, None] & kmask[None, :], other=0.0)
                    ptrs = gw_ptr + cols[:, None].to(tl.int64) * H + ks[None, :]
                    m2 = cmask[:, None] & kmask[None, :]
                    cur = tl.load(ptrs, mask=m2, other=0.0)
                    tl.store(ptrs, cur + tl.dot(tl.trans(dc), ht, input_precision=PREC), mask=m2)
        if need_gb:
            cur_b = tl.load(gb_ptr + cols, mask=cmask, other=0.0)
            tl.store(gb_ptr + cols, cur_b + gb, mask=cmask)


# (BM, BV, BK, num_warps, num_stages) per (kind, arch, dtype): the only tiles the launchers
# use on a GPU. Chosen so that `python -m bpo_fast.tools.gpu_check` finds no spills on any
# supported Triton and shared memory within each arch's per-block limit; bench/linear.py times
# them. float32 (ieee products, no tensor cores worth the name) gets small tiles of its own.
# An arch uses the rows of the nearest arch at or below it that has rows (:func:`tile_arch`).
#
# sm_80 (A100: 163 KB shared memory per block; 64K registers and 2048 threads per SM) and sm_90
# (H100: 227 KB; wgmma) keep their rows. sm_86/sm_89 (A10, L4, L40S, RTX 30/40: 99 KB per block,
# 1536 threads per SM) use sm_80's: the same mma.sync code, and every sm_80 tile fits their
# shared memory (the largest, the 2-byte forward's 4 stages of 128x32 + 128x32, is 64 KB)
# without spills on Triton 3.6-3.9. That forward holds a 128x128 float32 accumulator in 8 warps
# (~220 registers a thread): one 256-thread block per SM (56K of 64K registers) on every arch;
# its 4-stage pipeline, not more blocks, hides the load latency.
# sm_100 (B200: 227 KB, tcgen05) compiles sm_90's forward and un-capped atomic backward cleanly
# but ptxas spills 4-44 B in the deterministic 2-byte backward at 4 warps (3.8, 3.9) and 16 B in
# the capped atomic backward at BK 64 (3.6): its rows take the deterministic passes at 8 warps
# (same 64x64 tile, half the registers per thread: 105-186 on 3.6/3.9; the capped float32 ones
# at 2 warps: 4 B spilled at 4 warps on 3.6, and 8 warps read a 32x16 float32 tile with
# 8-byte copies) and the capped atomic backward at BK 32 (the same 128x64 output tile and
# atomics, 36 KB of shared memory instead of 72).
# sm_120 (RTX 50, RTX PRO Blackwell: 99 KB, 1536 threads per SM, mma.sync, no wgmma) spills
# 12-60 B with sm_90's 2-byte forward (128x128x64: the 255-register cap): its rows are sm_80's
# tiles (BK 32 halves the operand registers; 64 KB of shared memory), but the capped atomic
# backward, which spills 12 B at 128x64 on 3.6, takes 64x64 in 8 warps (80 registers; a third
# more float32 atomics than 128x64: 1/64 + 1/64 instead of 1/128 + 1/64 per logit and H), and
# the float32 deterministic passes take 32x32 (4 B spilled at 32x64 on 3.8).
_TILES = {
    ("fwd", 80, "half"): (128, 128, 32, 8, 4),
    ("fwd", 90, "half"): (128, 128, 64, 8, 3),
    ("fwd", 100, "half"): (128, 128, 64, 8, 3),
    ("fwd", 120, "half"): (128, 128, 32, 8, 4),
    ("bwd", 80, "half"): (128, 64, 32, 8, 3),
    ("bwd", 90, "half"): (128, 64, 64, 8, 3),
    ("bwd", 100, "half"): (128, 64, 64, 8, 3),
    ("bwd", 120, "half"): (128, 64, 32, 8, 3),
    ("det", 80, "half"): (64, 64, 32, 4, 3),
    ("det", 90, "half"): (64, 64, 32, 4, 3),
    ("det", 100, "half"): (64, 64, 32, 8, 3),
    ("det", 120, "half"): (64, 64, 32, 4, 3),
    ("fwd", 80, "float32"): (64, 64, 16, 4, 2),
    ("fwd", 90, "float32"): (64, 64, 16, 4, 2),
    ("fwd", 100, "float32"): (64, 64, 16, 4, 2),
    ("fwd", 120, "float32"): (64, 64, 16, 4, 2),
    ("bwd", 80, "float32"): (32, 64, 16, 4, 2),
    ("bwd", 90, "float32"): (32, 64, 16, 4, 2),
    ("bwd", 100, "float32"): (32, 64, 16, 4, 2),
    ("bwd", 120, "float32"): (32, 64, 16, 4, 2),
    ("det", 80, "float32"): (32, 64, 16, 4, 2),
    ("det", 90, "float32"): (32, 64, 16, 4, 2),
    ("det", 100, "float32"): (32, 64, 16, 4, 2),
    ("det", 120, "float32"): (32, 32, 16, 4, 2),
    # the deterministic vocabulary pass (grad_weight/grad_bias; "det" is the grad_hidden pass,
    # and the vocabulary pass where it has no row here): sm_80's float32 one at 32x64 in 4
    # warps spills 16 B on Triton 3.6 since V is unspecialised (the capped 32x32 one: 4 B on
    # 3.6 and 3.7.1, at 96 registers). 64x64 in 8 warps compiles cleanly on 3.6-3.9 (80-128
    # registers on sm_80/86/89): each thread holds the same 16 logits as 32x64 in 4 warps and
    # the same 2 blocks of 8 warps fit an SM (128 registers x 256 threads), with a third more
    # FMAs per loaded element; 32x64 at 2 warps spills more (344 B) and 8 warps at 32 rows read
    # the 32x16 hidden tile with 8-byte copies. sm_86/89 take it with the rest of sm_80's rows.
    ("det_vocab", 80, "float32"): (64, 64, 16, 8, 2),
}
# With the logit soft-cap (SOFTCAP) the deterministic grad_hidden pass (ROWS) holds the tanh's
# temporaries next to its d tile and the grad_hidden tile: at 4 warps Triton 3.6's register
# budget spills (8 B, fp32 and 2-byte sm_80); 8 warps halve each thread's share of the tiles.
# The capped atomic backward of sm_100/sm_120: see above. The un-capped kernels keep the tiles
# above.
_SOFTCAP_TILES = {
    ("bwd", 100, "half"): (128, 64, 32, 8, 3),
    ("bwd", 120, "half"): (64, 64, 32, 8, 3),
    ("det", 80, "half"): (64, 64, 32, 8, 3),
    ("det", 90, "half"): (64, 64, 32, 8, 3),
    ("det", 100, "half"): (64, 64, 32, 8, 3),
    ("det", 120, "half"): (64, 64, 32, 8, 3),
    ("det", 80, "float32"): (32, 32, 16, 4, 2),
    ("det", 90, "float32"): (32, 32, 16, 4, 2),
    ("det", 100, "float32"): (32, 32, 16, 2, 2),
    ("det", 120, "float32"): (32, 32, 16, 4, 2),
    # sm_80's capped float32 vocabulary pass: 64x32 in 4 warps (96-128 registers on sm_80/86/89,
    # no spill on 3.6-3.9; twice the rows of the 32x32 that spills 4 B on 3.6/3.7.1; 8 warps
    # would read the 32x16 weight tile with 8-byte copies); the grad_hidden pass keeps 32x32
    ("det_vocab", 80, "float32"): (64, 32, 16, 4, 2),
}
_INTERPRETER_TILE = (16, 32, 16, 4, 1)  # small tiles: speed of the CPU emulation
_GROUP = 8
_TILE_ARCHS = sorted({a for _, a, _ in _TILES})


def tile_arch(arch):
    """The arch whose rows of the tile tables sm_``arch`` uses: the nearest at or below it with
    rows of its own (sm_86/sm_89 -> sm_80, sm_103 -> sm_100, sm_121 -> sm_120; below sm_80,
    sm_80's)."""
    return max((a for a in _TILE_ARCHS if a <= arch), default=_TILE_ARCHS[0])


def tile_config(kind, dtype, arch, softcap=False):
    """(BM, BV, BK, num_warps, num_stages) of a fused kernel (``kind``: "fwd", "bwd", "det"
    (the deterministic grad_hidden pass) or "det_vocab" (its vocabulary pass: "det"'s row
    where it has none of its own)) for ``dtype`` on sm_``arch`` (``None``: the interpreter),
    with the logit soft-cap or not."""
    if arch is None:
        return _INTERPRETER_TILE
    key = (kind, tile_arch(arch), "float32" if dtype == torch.float32 else "half")
    if kind == "det_vocab" and key not in _TILES:
        key = ("det",) + key[1:]
    return (_SOFTCAP_TILES.get(key) if softcap else None) or _TILES[key]


def _row_block_cap(device):
    """Largest BLOCK_V of the row kernels: 4096, but 2048 on sm_120, whose ptxas keeps them at
    48 registers in 8 warps: 4096-element blocks spill 4 B there (2-byte d over an odd
    vocabulary, Triton 3.6-3.9); 2048 halve each thread's share. (Defined down here, like the
    tile tables, so that editing it moves no kernel's line: Triton's kernel hash, the gate's
    cache key, counts them.)"""
    target = gpu_target(device)
    return 2048 if target is not None and tile_arch(target[0]) == 120 else 4096


def _prec(dtype):
    # fp32 inputs must give fp32 products (the reference is fp32); tf32 would cost ~1e-3
    return "ieee" if dtype == torch.float32 else "tf32"


def _row_align(hidden):
    """``tl.multiple_of`` hint for the hidden row offsets, in elements: 16 bytes when every
    row of ``hidden`` (any element offset built from its strides) starts 16-byte aligned."""
    vec = 16 // hidden.element_size()
    ok = (hidden.stride(-1) == 1 and (hidden.storage_offset() * hidden.element_size()) % 16 == 0
          and all(st % vec == 0 for st in hidden.stride()[:-1])
          and (hidden.device.type != "cuda" or hidden.data_ptr() % 16 == 0))
    return vec if ok else 1


def _aligned_rows(hidden, row_off):
    """``(hidden, row_off, ROW_ALIGN)`` for the kernels: as given when every row of ``hidden``
    starts 16-byte aligned, else a compacted copy of the ``S`` scored rows (row stride padded
    to 16 bytes; ``S * H`` elements, only for such inputs), so the kernels always read hidden
    rows with 16-byte vectors and have one variant per dtype."""
    assert row_off.dtype == torch.int64 and row_off.dim() == 1, "row_off: int64 [S]"
    vec = _row_align(hidden)
    if vec > 1:
        return hidden, row_off, vec
    H = hidden.shape[-1]
    vec = 16 // hidden.element_size()
    hp = triton.cdiv(H, vec) * vec
    flat = hidden.as_strided((hidden.untyped_storage().nbytes() // hidden.element_size()
                              - hidden.storage_offset(),), (1,))
    cols = torch.arange(H, device=hidden.device) * hidden.stride(-1)
    rows = torch.empty((row_off.numel(), hp), device=hidden.device, dtype=hidden.dtype)
    rows[:, :H] = flat[row_off[:, None] + cols[None, :]]
    return rows, torch.arange(row_off.numel(), device=hidden.device) * hp, vec


def k_contiguous(weight):
    """``weight [V, H]`` with unit stride over ``H`` (a copy for a transposed view, e.g. an LM head
    tied to an ``[H, V]`` matrix), so the fused kernels always read weight rows with 16-byte
    vectors and have one variant per dtype. The backward of ``bpo_fast.ops.linear`` calls it
    once, before its chunk loop (here it is then a no-op)."""
    return weight if weight.stride(1) == 1 or weight.shape[1] == 1 else weight.contiguous()


def fused_forward(hidden, row_off, weight, bias, targets, inv_temp, config=None, softcap=None):
    """Per scored row (``row_off`` element offsets into ``hidden``'s storage of row starts,
    i.e. combinations of ``hidden``'s strides; last dim stride ``hidden.stride(-1)``):
    ``(stats [S, 2], target_logit [S])`` float32 of ``x = cap(h @ W.T + b) / temperature``, where
    ``stats`` is (row max, log-sum) (``logsumexp(x) = max + log-sum``) and ``cap`` the optional
    logit soft-cap (``softcap * tanh(. / softcap)``).
    ``config=(BM, BV, BK, num_warps, num_stages)`` overrides :func:`tile_config`."""
    S = row_off.numel()
    V, H = weight.shape
    dev = weight.device
    if S == 0:
        z = torch.zeros(0, device=dev, dtype=torch.float32)
        return z.view(0, 2), z.clone()
    hidden, row_off, row_align = _aligned_rows(hidden, row_off)
    weight = k_contiguous(weight)
    target = gpu_target(dev)
    BM, BV, BK, warps, stages = config or tile_config("fwd", hidden.dtype,
                                                      target and target[0], softcap is not None)
    # split the vocabulary across programs when there are too few row blocks to fill the GPU
    sms = target[1] if target else 1
    split = max(1, min(triton.cdiv(V, BV), triton.cdiv(4 * sms, triton.cdiv(S, BM))))
    m, s, t = (torch.empty((split, S), device=dev, dtype=torch.float32) for _ in range(3))
    cap, has_cap = _cap_args(softcap)
    _fused_fwd_kernel[(triton.cdiv(S, BM), split)](
        hidden, row_off, hidden.stride(-1), weight, weight.stride(0), weight.stride(1),
        bias if bias is not None else weight, targets, m, s, t,
        S, V, H, float(inv_temp), cap, split, int(bias is not None),
        ROW_ALIGN=row_align, BM=BM, BV=BV, BK=BK,
        PREC=_prec(hidden.dtype), SOFTCAP=has_cap, num_warps=warps, num_stages=stages)
    mx = m.max(0).values
    return torch.stack([mx, torch.log((s * torch.exp(m - mx)).sum(0))], 1), t.sum(0)


def fused_backward(hidden, row_off, weight, bias, targets, lse, gscale, inv_temp,
                   gh=None, gw=None, gb=None, config=None, deterministic=None, softcap=None):
    """Accumulate into ``gh [S, H]``, ``gw [V, H]``, ``gb [V]`` (each optional, each float32,
    contiguous) the gradients of ``sum(gscale * temperature * logp)``; ``gscale`` is
    ``g / temperature`` per scored row, ``lse [S]`` the log-sum-exp of the forward's
    (capped, tempered) logits, ``softcap`` the cap of :func:`fused_forward`.

    ``deterministic`` (default: ``torch.are_deterministic_algorithms_enabled()``): two
    non-atomic passes (grad_hidden by row blocks, grad_weight/grad_bias by vocabulary blocks),
    each output added to by one program in a fixed order, so results are bitwise reproducible;
    else one pass with relaxed float32 atomics (faster, order-dependent rounding)."""
    S = row_off.numel()
    V, H = weight.shape
    dev = weight.device
    if S == 0 or (gh is None and gw is None and gb is None):
        return
    hidden, row_off, row_align = _aligned_rows(hidden, row_off)
    weight = k_contiguous(weight)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    target = gpu_target(dev)

    cap, has_cap = _cap_args(softcap)

    def out(t):  # a private 1-element stand-in for an absent output
        return t if t is not None else torch.zeros(1, device=dev, dtype=torch.float32)

    args = (hidden, row_off, hidden.stride(-1), weight, weight.stride(0), weight.stride(1),
            bias if bias is not None else weight, targets, lse, gscale, out(gh), out(gw), out(gb),
            S, V, H, float(inv_temp), cap, int(bias is not None), int(gh is not None),
            int(gw is not None), int(gb is not None))

    def launch(kernel, kind, grid, **kw):
        BM, BV, BK, warps, stages = config or tile_config(kind, hidden.dtype,
                                                          target and target[0],
                                                          softcap is not None)
        kernel[grid(BM, BV)](*args, **kw, ROW_ALIGN=row_align, BM=BM, BV=BV, BK=BK,
                             PREC=_prec(hidden.dtype), SOFTCAP=has_cap, num_warps=warps,
                             num_stages=stages)

    if not deterministic:
        launch(_fused_bwd_kernel, "bwd",
               lambda BM, BV: (triton.cdiv(S, BM) * triton.cdiv(V, BV),), GROUP=_GROUP)
        return
    # ROWS reads only need_gh, the vocabulary pass only need_gw / need_gb
    if gh is not None:
        launch(_fused_bwd_det_kernel, "det", lambda BM, BV: (triton.cdiv(S, BM),), ROWS=True)
    if gw is not None or gb is not None:
        launch(_fused_bwd_det_kernel, "det_vocab", lambda BM, BV: (triton.cdiv(V, BV),),
               ROWS=False)
