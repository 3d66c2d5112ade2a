"""Fused LM head: token / sequence log-probs and the DPO loss straight from hidden states.

``linear_token_logprobs(hidden, weight, labels)`` gives the same numbers as
``token_logprobs(hidden @ weight.T (+ bias), labels)`` without ever building the ``[N, T, V]``
logits (nor their gradient). How:

1. **Compact** the scored positions (``labels[:, t+1] != ignore_index``, HF shift) with a single
   ``nonzero`` -- the only host sync of a call; the label range check rides on the same sync.
   Everything after scales with the number of scored tokens ``S``, not with ``N * T`` (image
   tokens, prompts and padding cost nothing).
2. **Chunk** the ``[S, V]`` logits into ``[ct, cv]`` tiles whose float32 size is bounded by
   ``chunk_bytes``: each tile is produced with float32 accumulation *and float32 output* (a
   logit rounded to bf16 before the log-sum-exp biases training), folded into a running
   (max, sum-exp) per token, and dropped. Only the float32 per-token (max, log-sum) (and the
   compacted index) is saved for backward, by every implementation.
3. **Backward** recomputes each tile, forms ``d = (onehot - softmax) * g / temperature`` in the
   matmul dtype and runs the two gradient GEMMs; ``grad_hidden``, ``grad_weight`` and
   ``grad_bias`` accumulate in float32 and are written in the input dtype. An input with
   ``requires_grad=False`` costs nothing (frozen LM head: no ``grad_weight`` GEMM).

**Logit soft-capping** (``logit_softcap=cap``, Gemma 2 / PaliGemma 2's
``final_logit_softcapping``): each float32 tile becomes ``cap * tanh(z / cap)`` (``z`` with the
bias) before the temperature and the log-sum-exp, and the backward multiplies ``d`` by
``1 - tanh(z / cap)^2``, in every implementation. That is HF's order (``lm_head``, then the cap)
followed by TRL's (the temperature divides the model's capped logits). The Triton kernels take
it as a constexpr (``SOFTCAP``), so the un-capped kernels are compiled exactly as without it;
the torch reducer holds one more float32 tile while a capped tile is reduced.

Implementations (``impl=``), all computing the same thing:

* ``"torch"``: the chunked reference in plain PyTorch (CPU default; bounded memory on CPU too).
* ``"cublas"``: the same chunk loop, float32 logit tiles from cuBLAS
  (``torch.mm(..., out_dtype=torch.float32)``) reduced by the Triton row kernels of
  ``kernels/linear.py`` (``d`` in place over a float32 tile, in a buffer of its own (+50% of
  the tile) for bf16/fp16: see ``kernels.linear.dlogits``).
* ``"triton"``: CCE-style Triton kernels that compute logit tiles with ``tl.dot`` and reduce
  them in registers (forward), and recompute them to accumulate the gradients with float32
  atomics (backward; a deterministic two-pass backward without atomics when
  ``torch.use_deterministic_algorithms(True)`` is on).
* ``"hybrid"``: the ``"triton"`` forward with the ``"cublas"`` backward (lets the benchmark
  pick the best forward and the best backward separately).

``"auto"`` picks ``"torch"`` off-GPU and ``"cublas"`` on CUDA (``"triton"`` when this torch's
cuBLAS cannot write float32 from bf16/fp16 inputs); ``BPO_FAST_LINEAR_IMPL`` overrides it.
This is a heuristic until ``bench/linear.py`` has numbers on the target GPU (see BENCH results).

The preference loss on top (:func:`bpo_fast.ops.preference.preference_loss`, of which
:func:`fused_linear_dpo_loss` is a thin name) uses :func:`bpo_fast.ops.dpo.dpo_loss` /
``dpo_loss_and_grad`` on ``[B]`` tensors (they cost nothing next to the LM head). Because every
loss type is a mean of per-pair terms (and the RPO term's gradient is a constant per chosen
token), the gradient of a pair's log-probs is known as soon as that pair's logits are: by
default (``grad_in_forward``) the forward pass runs pair group by pair group, keeps the group's
float32 logits, and writes ``grad_hidden`` / ``grad_weight`` right away -- 3 GEMMs per token
instead of 4 (no recompute). Extra gradient terms on the per-pair losses or the policy log-probs
take the recomputing backward.
"""

import os

import torch

from bpo_fast.ops.losses import check_logit_softcap, check_temperature

IMPLS = ("auto", "torch", "cublas", "triton", "hybrid")
DEFAULT_CHUNK_BYTES = 512 << 20
# fp32 accumulators are read and written once per GEMM; with K >= MIN_TILE the GEMM's FLOPs
# outweigh that traffic by >= ~4x on an H100 (the accumulation GEMM has K = the tile's other side)
_MIN_TILE = 4096
_ALIGN = 128

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------
# validation and compaction
# ----------------------------------------------------------------------------------------------


def _check_inputs(hidden, weight, labels, bias, ignore_index, temperature):
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [N, T, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be the LM head [V, H], got shape {tuple(weight.shape)}")
    N, T, H = hidden.shape
    V, Hw = weight.shape
    if Hw != H:
        raise ValueError(f"weight must be [V, H] with H = hidden.shape[-1] = {H}, "
                         f"got shape {tuple(weight.shape)}")
    if V == 0 or H == 0:
        raise ValueError(f"weight must have V > 0 and H > 0, got shape {tuple(weight.shape)}")
    if tuple(labels.shape) != (N, T):
        raise ValueError(f"labels must be [N, T] = {(N, T)} like hidden's first two dims, "
                         f"got shape {tuple(labels.shape)}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hidden must be float32, bfloat16 or float16, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight and hidden must have the same dtype, got weight {weight.dtype} "
                        f"and hidden {hidden.dtype}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (V,):
            raise ValueError(f"bias must be [V] = ({V},), got shape {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias must have weight's dtype {weight.dtype}, got {bias.dtype}")
    devs = {t.device for t in (hidden, weight, labels) + ((bias,) if bias is not None else ())}
    if len(devs) != 1:
        raise ValueError(f"hidden, weight, labels and bias must be on one device, got {devs}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    check_temperature(temperature)
    return N, T, H, V


def _compact(labels, ignore_index, V):
    """(n_idx, t_idx, targets): the scored positions (position t scores labels[t + 1])."""
    N, T = labels.shape
    dev = labels.device
    if T < 2 or N == 0:
        e = torch.zeros(0, dtype=torch.long, device=dev)
        return e, e.clone(), e.clone()
    nxt = labels[:, 1:].long()
    scored = (nxt != ignore_index).reshape(-1)
    bad = scored & ((nxt.reshape(-1) < 0) | (nxt.reshape(-1) >= V))
    # One nonzero is the one host sync of a call. The range check rides on it: a bad label
    # appends numel+1 extra hits, so "more hits than positions" <=> some label is out of range.
    flags = torch.cat([scored, bad.any().expand(scored.numel() + 1)])
    idx = torch.nonzero(flags).squeeze(1)
    if idx.numel() > scored.numel():
        raise ValueError(f"labels must be in [0, V={V}) or equal ignore_index={ignore_index} "
                         f"at scored positions")
    return idx // (T - 1), idx % (T - 1), nxt.reshape(-1)[idx]


def _chunk_budget(chunk_bytes, chunk_sizes):
    """Validated float32 tile budget in bytes (argument, else env BPO_FAST_LINEAR_CHUNK_MB,
    else DEFAULT_CHUNK_BYTES); also checks ``chunk_sizes``."""
    if chunk_sizes is not None:
        if not (isinstance(chunk_sizes, (tuple, list)) and len(chunk_sizes) == 2 and all(
                isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in chunk_sizes)):
            raise ValueError(f"chunk_sizes must be (tokens, vocab) positive ints, got "
                             f"{chunk_sizes!r}")
    if chunk_bytes is None:
        env = os.environ.get("BPO_FAST_LINEAR_CHUNK_MB")
        try:
            chunk_bytes = int(float(env) * 2 ** 20) if env else DEFAULT_CHUNK_BYTES
        except ValueError:
            raise ValueError(f"BPO_FAST_LINEAR_CHUNK_MB must be a number of MiB, got {env!r}")
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
    return chunk_bytes


def _plan(S, V, chunk_bytes, chunk_sizes=None):
    """Token and vocabulary ranges of the logit tiles: ``[ct, cv]`` float32 within chunk_bytes,
    both sides >= _MIN_TILE where they can be (GEMM efficiency and accumulator traffic)."""
    if chunk_sizes is not None:
        ct, cv = (max(1, int(c)) for c in chunk_sizes)
    else:
        elems = max(1, chunk_bytes // 4)
        if S * V <= elems:
            ct, cv = S, V
        else:
            ct = min(S, max(_MIN_TILE, elems // V // _ALIGN * _ALIGN))
            cv = min(V, max(_ALIGN, elems // max(ct, 1) // _ALIGN * _ALIGN))
    ct, cv = max(1, min(ct, S)), min(cv, V)
    return ([(t, min(S, t + ct)) for t in range(0, S, ct)],
            [(v, min(V, v + cv)) for v in range(0, V, cv)])


# ----------------------------------------------------------------------------------------------
# float32-output matmuls
# ----------------------------------------------------------------------------------------------

_CAPS = {}


def _cuda_caps(device):
    """Whether this torch's cuBLAS writes float32 from bf16 inputs: ``mm(out_dtype=)`` and the
    in-place accumulating ``addmm(acc, a, b, out_dtype=float32, out=acc)`` (checked numerically
    once per device)."""
    key = str(device)
    if key not in _CAPS:
        caps = {"mm": False, "addmm": False}
        try:
            # deterministic operands: the probe must not consume the caller's RNG stream
            a = (torch.arange(64 * 32, device=device).view(64, 32) % 7 - 3).to(torch.bfloat16)
            b = (torch.arange(32 * 48, device=device).view(32, 48) % 5 - 2).to(torch.bfloat16)
            ref = a.float() @ b.float()
            out = torch.mm(a, b, out_dtype=torch.float32)
            caps["mm"] = out.dtype == torch.float32 and torch.allclose(out, ref, atol=1e-3)
            acc = torch.ones(64, 48, device=device)
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            caps["addmm"] = torch.allclose(acc, ref + 1, atol=1e-3)
        except (RuntimeError, TypeError):
            pass
        _CAPS[key] = caps
    return _CAPS[key]


def _mm_f32(a, w):
    """``a @ w.T`` as float32 with float32 accumulation; ``a [m, k]``, ``w [n, k]``."""
    if a.dtype == torch.float32:
        return a @ w.t()
    if a.is_cuda and _cuda_caps(a.device)["mm"]:
        return torch.mm(a, w.t(), out_dtype=torch.float32)
    return a.float() @ w.float().t()  # CPU reference: chunk-sized upcasts


def _addmm_f32_(acc, a, b):
    """``acc += a @ b`` with ``acc`` float32."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif a.is_cuda and _cuda_caps(a.device)["addmm"]:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    elif a.is_cuda:
        acc.add_(a @ b)  # old torch: each tile's product is rounded once before accumulation
    else:
        acc.addmm_(a.float(), b.float())


# ----------------------------------------------------------------------------------------------
# tile reducers: PyTorch reference and Triton row kernels
# ----------------------------------------------------------------------------------------------


class _TorchReducer:
    """The plain-PyTorch tile reducer. ``stats [C, 2]`` = (row max, log-sum) of the logits
    ``x = cap(z + b) / T``: the softmax is formed as ``exp((x - max) - log-sum)``, never the
    difference of two large numbers (relative error ~1e-7 also at ``|x| ~ 1e4``)."""

    @staticmethod
    def _logits(z, bias_v, inv_temp, softcap):
        """``x = cap(z + b) / T`` of a float32 tile; in place (``x`` is ``z``) without a cap; with
        one ``z`` becomes ``tanh((z + b) / cap)`` (the derivative's input) and ``x`` is a new
        tile."""
        if bias_v is not None:
            z.add_(bias_v.float())
        if softcap is None:
            return z.mul_(inv_temp)
        return z.div_(softcap).tanh_().mul(softcap * inv_temp)

    @staticmethod
    def update(z, bias_v, targets, m, s, tlog, v0, inv_temp, softcap=None):
        """Fold the tile into the running (max ``m``, sum-exp ``s``) and gather the target
        logits. Leaves in ``z`` what :meth:`dlogits_from_state` reads: ``exp(x - max)``
        without a cap, ``tanh((z + b) / cap)`` with one."""
        cv = z.shape[1]
        x = _TorchReducer._logits(z, bias_v, inv_temp, softcap)
        t = targets - v0
        hit = (t >= 0) & (t < cv)
        tlog.copy_(torch.where(hit, x.gather(1, t.clamp(0, cv - 1)[:, None]).squeeze(1), tlog))
        m_new = torch.maximum(m, x.max(1).values)
        s.mul_(torch.exp(m - m_new)).add_(x.sub_(m_new[:, None]).exp_().sum(1))
        m.copy_(m_new)

    @staticmethod
    def _d(x, th, targets, stats, gscale, v0, dtype, need_gb):
        """``d = gscale * (onehot - softmax(x))`` (times ``1 - th^2`` with a cap), in place over
        ``x``; ``th`` is overwritten."""
        cv = x.shape[1]
        d = x.sub_(stats[:, :1]).sub_(stats[:, 1:]).exp_().neg_()
        t = targets - v0
        hit = (t >= 0) & (t < cv)
        d.scatter_add_(1, t.clamp(0, cv - 1)[:, None], hit.to(d.dtype)[:, None])
        d.mul_(gscale[:, None])
        if th is not None:
            d.mul_(th.mul_(th).neg_().add_(1.0))
        gb = d.sum(0) if need_gb else None
        return d.to(dtype), gb

    @staticmethod
    def dlogits(z, bias_v, targets, stats, gscale, v0, inv_temp, dtype, need_gb, softcap=None):
        """``d logp / d z`` of a recomputed tile ``z`` (before bias), scaled by ``gscale``."""
        x = _TorchReducer._logits(z, bias_v, inv_temp, softcap)
        return _TorchReducer._d(x, None if softcap is None else z, targets, stats, gscale, v0,
                                dtype, need_gb)

    @staticmethod
    def dlogits_from_state(z, bias_v, targets, stats, gscale, inv_temp, dtype, need_gb,
                           softcap=None):
        """:meth:`dlogits` of a whole-vocabulary tile from what :meth:`update` left in ``z``, in
        place: no second GEMM (the 3-GEMM path on CPU). Without a cap ``z = exp(x - max)``, so
        ``d = gscale * (onehot - z * exp(-log-sum))`` costs no second ``exp`` pass; with one
        ``z = tanh((z + b) / cap)`` and the logits are rebuilt from it (``bias_v`` is already
        in)."""
        if softcap is None:
            d = z.mul_((-gscale * torch.exp(-stats[:, 1]))[:, None])
            d.scatter_add_(1, targets[:, None], gscale[:, None])
            gb = d.sum(0) if need_gb else None
            return d.to(dtype), gb
        return _TorchReducer._d(z.mul(softcap * inv_temp), z, targets, stats, gscale, 0, dtype,
                                need_gb)


class _TritonReducer:
    """The Triton row kernels of ``kernels/linear.py`` over cuBLAS tiles; ``z`` is left as it is
    (their backward recomputes from ``z`` itself); they take the log-sum-exp ``max + log-sum``
    of :func:`_row_stats`."""

    @staticmethod
    def update(z, bias_v, targets, m, s, tlog, v0, inv_temp, softcap=None):
        from bpo_fast.kernels import linear as K

        K.lse_update(z, bias_v, targets, m, s, tlog, v0, inv_temp, softcap=softcap)

    @staticmethod
    def dlogits(z, bias_v, targets, stats, gscale, v0, inv_temp, dtype, need_gb, softcap=None):
        from bpo_fast.kernels import linear as K

        d = K.dlogits(z, bias_v, targets, stats.sum(1), gscale, v0, inv_temp, dtype,
                      softcap=softcap)
        gb = d.sum(0, dtype=torch.float32) if need_gb else None
        return d, gb

    @staticmethod
    def dlogits_from_state(z, bias_v, targets, stats, gscale, inv_temp, dtype, need_gb,
                           softcap=None):
        return _TritonReducer.dlogits(z, bias_v, targets, stats, gscale, 0, inv_temp, dtype,
                                      need_gb, softcap)


# ----------------------------------------------------------------------------------------------
# chunked forward / backward (impl "torch" and "cublas")
# ----------------------------------------------------------------------------------------------


def _gather(hidden, n_idx, t_idx, lo, hi):
    return hidden[n_idx[lo:hi], t_idx[lo:hi]]


def _chunked_forward(reducer, hidden, weight, bias, n_idx, t_idx, targets, inv_temp, plan,
                     softcap):
    S = n_idx.numel()
    dev = weight.device
    m = torch.full((S,), float("-inf"), device=dev, dtype=torch.float32)
    s = torch.zeros(S, device=dev, dtype=torch.float32)
    tlog = torch.zeros(S, device=dev, dtype=torch.float32)
    t_chunks, v_chunks = plan
    for t0, t1 in t_chunks:
        h_c = _gather(hidden, n_idx, t_idx, t0, t1)
        for v0, v1 in v_chunks:
            z = _mm_f32(h_c, weight[v0:v1])
            reducer.update(z, None if bias is None else bias[v0:v1], targets[t0:t1],
                           m[t0:t1], s[t0:t1], tlog[t0:t1], v0, inv_temp, softcap)
            del z  # let the allocator hand the same block to the next tile
    return _row_stats(m, s), tlog


def _row_stats(m, s):
    """What backward needs per token from the running (max, sum-exp), for every impl:
    ``[S, 2]`` = (max, log-sum); the log-sum-exp is their sum."""
    return torch.stack([m, torch.log(s)], 1)


def _logp(tlog, stats):
    """Token log-probs from the target logit and :func:`_row_stats`."""
    return (tlog - stats[:, 0]) - stats[:, 1]


def _chunked_backward(reducer, hidden, weight, bias, n_idx, t_idx, targets, stats, gscale,
                      inv_temp, plan, need_h, need_w, need_b, softcap):
    S = n_idx.numel()
    V, H = weight.shape
    dtype, dev = weight.dtype, weight.device
    f32 = torch.float32
    t_chunks, v_chunks = plan
    nt, nv = len(t_chunks), len(v_chunks)
    gh = torch.zeros_like(hidden, memory_format=torch.contiguous_format) if need_h else None
    gw = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_w else None
    gb32 = torch.zeros(V, device=dev, dtype=f32) if need_b else None

    # One of grad_hidden / grad_weight can be written straight from one GEMM per tile (fp32
    # accumulation inside cuBLAS) when its reduction dim is not split; the other needs an fp32
    # accumulator across tiles. Looping vocab-outer keeps a full [S, H] accumulator and a
    # [cv, H] one; token-outer a [ct, H] and a full [V, H]: take the smaller.
    v_outer = S <= V

    def tile(t0, t1, v0, v1, h_c, gh_acc, gw_acc):
        w_v = weight[v0:v1]
        z = _mm_f32(h_c, w_v)
        d, gb = reducer.dlogits(z, None if bias is None else bias[v0:v1], targets[t0:t1],
                                stats[t0:t1], gscale[t0:t1], v0, inv_temp, dtype, need_b, softcap)
        if need_b:
            gb32[v0:v1] += gb
        if need_h:
            if gh_acc is None:  # the whole vocabulary in this tile
                gh[n_idx[t0:t1], t_idx[t0:t1]] = d @ w_v
            else:
                _addmm_f32_(gh_acc, d, w_v)
        if need_w:
            if gw_acc is None:  # all scored tokens in this tile
                torch.mm(d.t(), h_c, out=gw[v0:v1])
            else:
                _addmm_f32_(gw_acc, d.t(), h_c)

    if v_outer:
        gh32 = torch.zeros(S, H, device=dev, dtype=f32) if need_h and nv > 1 else None
        h_all = _gather(hidden, n_idx, t_idx, 0, S) if nt == 1 else None
        for v0, v1 in v_chunks:
            gw32 = torch.zeros(v1 - v0, H, device=dev, dtype=f32) if need_w and nt > 1 else None
            for t0, t1 in t_chunks:
                h_c = h_all if h_all is not None else _gather(hidden, n_idx, t_idx, t0, t1)
                tile(t0, t1, v0, v1, h_c, None if gh32 is None else gh32[t0:t1], gw32)
            if gw32 is not None:
                gw[v0:v1] = gw32
        if gh32 is not None:
            gh[n_idx, t_idx] = gh32.to(dtype)
    else:
        gw32 = torch.zeros(V, H, device=dev, dtype=f32) if need_w and nt > 1 else None
        for t0, t1 in t_chunks:
            h_c = _gather(hidden, n_idx, t_idx, t0, t1)
            gh32 = torch.zeros(t1 - t0, H, device=dev, dtype=f32) if need_h and nv > 1 else None
            for v0, v1 in v_chunks:
                tile(t0, t1, v0, v1, h_c, gh32, None if gw32 is None else gw32[v0:v1])
            if gh32 is not None:
                gh[n_idx[t0:t1], t_idx[t0:t1]] = gh32.to(dtype)
        if gw32 is not None:
            gw.copy_(gw32)
    return gh, gw, None if gb32 is None else gb32.to(dtype)


# ----------------------------------------------------------------------------------------------
# fused Triton (impl "triton")
# ----------------------------------------------------------------------------------------------


def _row_offsets(hidden, n_idx, t_idx):
    return n_idx * hidden.stride(0) + t_idx * hidden.stride(1)


def _triton_forward(hidden, weight, bias, n_idx, t_idx, targets, inv_temp, softcap):
    from bpo_fast.kernels import linear as K

    return K.fused_forward(hidden, _row_offsets(hidden, n_idx, t_idx), weight, bias, targets,
                           inv_temp, softcap=softcap)


def _triton_backward(hidden, weight, bias, n_idx, t_idx, targets, stats, gscale, inv_temp, plan,
                     need_h, need_w, need_b, softcap):
    from bpo_fast.kernels import linear as K

    V, H = weight.shape
    dev, f32 = weight.device, torch.float32
    weight = K.k_contiguous(weight)  # once, not per chunk
    gh = torch.zeros_like(hidden, memory_format=torch.contiguous_format) if need_h else None
    gw32 = torch.zeros(V, H, device=dev, dtype=f32) if need_w else None
    gb32 = torch.zeros(V, device=dev, dtype=f32) if need_b else None
    row_off = _row_offsets(hidden, n_idx, t_idx)
    lse = stats.sum(1)
    # token chunks bound the fp32 grad_hidden accumulator. A hidden whose rows are not 16-byte
    # aligned is copied by K.fused_backward chunk by chunk, each chunk only its own scored rows:
    # the S rows are copied once per backward in all, with a chunk's rows held at a time
    for t0, t1 in plan[0]:
        gh32 = torch.zeros(t1 - t0, H, device=dev, dtype=f32) if need_h else None
        K.fused_backward(hidden, row_off[t0:t1], weight, bias, targets[t0:t1], lse[t0:t1],
                         gscale[t0:t1], inv_temp, gh=gh32, gw=gw32, gb=gb32, softcap=softcap)
        if need_h:
            gh[n_idx[t0:t1], t_idx[t0:t1]] = gh32.to(hidden.dtype)
    return (gh, None if gw32 is None else gw32.to(weight.dtype),
            None if gb32 is None else gb32.to(weight.dtype))


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------


def _resolve_impl(impl, device):
    if impl is None or impl == "auto":
        impl = os.environ.get("BPO_FAST_LINEAR_IMPL", "auto")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        if device.type != "cuda":
            return "torch"
        return "cublas" if _cuda_caps(device)["mm"] else "triton"
    if impl in ("cublas", "triton", "hybrid") and device.type != "cuda" \
            and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"impl={impl!r} needs a CUDA device (or TRITON_INTERPRET=1), "
                         f"got tensors on {device}")
    return impl


def _no_autocast(device):
    """The ops run their GEMMs in the dtype they are given (the caller casts, as
    PreferenceModel._head does) with float32 outputs and accumulators; an enclosing autocast
    must not recast them (on CPU it would turn the float32 logit tiles into bf16)."""
    return torch.autocast(device.type, enabled=False)


class _LinearLogprobs(torch.autograd.Function):
    """Per scored token log-prob ``[S]`` float32 from hidden [N, T, H] and weight [V, H]."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, n_idx, t_idx, targets, temperature, impl, plan,
                softcap):
        with _no_autocast(weight.device):
            return _LinearLogprobs._forward(ctx, hidden, weight, bias, n_idx, t_idx, targets,
                                            temperature, impl, plan, softcap)

    @staticmethod
    def _forward(ctx, hidden, weight, bias, n_idx, t_idx, targets, temperature, impl, plan,
                 softcap):
        inv_temp = 1.0 / temperature
        if n_idx.numel() == 0:
            stats = torch.zeros(0, 2, device=weight.device, dtype=torch.float32)
            tlog = stats[:, 0]
        elif impl in ("triton", "hybrid"):
            stats, tlog = _triton_forward(hidden, weight, bias, n_idx, t_idx, targets, inv_temp,
                                          softcap)
        else:
            reducer = _TritonReducer if impl == "cublas" else _TorchReducer
            stats, tlog = _chunked_forward(reducer, hidden, weight, bias, n_idx, t_idx, targets,
                                           inv_temp, plan, softcap)
        ctx.save_for_backward(hidden, weight, bias, n_idx, t_idx, targets, stats)
        ctx.inv_temp, ctx.impl, ctx.plan, ctx.softcap = inv_temp, impl, plan, softcap
        return _logp(tlog, stats)

    @staticmethod
    def backward(ctx, g):
        hidden, weight, bias, n_idx, t_idx, targets, stats = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        if not (need_h or need_w or need_b):
            return (None,) * 10
        if n_idx.numel() == 0:
            gh = torch.zeros_like(hidden) if need_h else None
            gw = torch.zeros_like(weight) if need_w else None
            gb = torch.zeros_like(bias) if need_b else None
        else:
            gscale = g.float().contiguous() * ctx.inv_temp
            args = (hidden, weight, bias, n_idx, t_idx, targets, stats, gscale, ctx.inv_temp,
                    ctx.plan, need_h, need_w, need_b, ctx.softcap)
            if ctx.impl == "triton":
                gh, gw, gb = _triton_backward(*args)
            else:
                reducer = _TorchReducer if ctx.impl == "torch" else _TritonReducer
                gh, gw, gb = _chunked_backward(reducer, *args)
        return (gh, gw, gb) + (None,) * 7


def _scored_logprobs(hidden, weight, labels, bias, ignore_index, temperature, impl,
                     chunk_bytes, chunk_sizes, check_finite=False, logit_softcap=None):
    """(per scored token log-probs [S] float32, n_idx, t_idx, N, T): the common core."""
    N, T, H, V = _check_inputs(hidden, weight, labels, bias, ignore_index, temperature)
    softcap = check_logit_softcap(logit_softcap)
    if check_finite:
        from bpo_fast.ops.losses import check_finite as _check_finite

        _check_finite(hidden=hidden, weight=weight, bias=bias)
    impl = _resolve_impl(impl, weight.device)
    n_idx, t_idx, targets = _compact(labels, ignore_index, V)
    chunk_bytes = _chunk_budget(chunk_bytes, chunk_sizes)
    plan = _plan(n_idx.numel(), V, chunk_bytes, chunk_sizes)
    logp = _LinearLogprobs.apply(hidden, weight, bias, n_idx, t_idx, targets,
                                 float(temperature), impl, plan, softcap)
    return logp, n_idx, t_idx, N, T


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------


def linear_token_logprobs(hidden, weight, labels, *, bias=None, ignore_index=-100,
                          temperature=1.0, impl="auto", chunk_bytes=None, chunk_sizes=None,
                          check_finite=False, logit_softcap=None):
    """Per-token log-probs ``[N, T - 1]`` float32 of ``labels`` under
    ``cap(hidden @ weight.T + bias) / temperature``, without building the logits: the same as
    :func:`bpo_fast.ops.logprobs.token_logprobs` on those logits
    (:func:`linear_token_logprobs_reference` materialises them).

    ``logit_softcap``: ``None`` (no cap) or a finite number ``> 0``: the logits are
    ``logit_softcap * tanh(z / logit_softcap)`` before the temperature, as Gemma 2 /
    PaliGemma 2 (``config.final_logit_softcapping``) and TRL (temperature applied to the
    model's capped logits) compute them.

    ``hidden [N, T, H]`` (fp32/bf16/fp16, any strides), ``weight [V, H]`` (same dtype),
    ``labels [N, T]`` in the HF convention: entry ``t`` scores ``labels[:, t + 1]`` from
    position ``t``; entries whose label is ``ignore_index`` hold 0. Differentiable w.r.t.
    ``hidden``, ``weight`` and ``bias``. ``impl``: ``"auto"``, ``"torch"``, ``"cublas"``,
    ``"triton"``, ``"hybrid"`` (see the module doc); ``chunk_bytes`` bounds the float32 logit tile
    (default 512 MiB, env ``BPO_FAST_LINEAR_CHUNK_MB``); ``chunk_sizes=(tokens, vocab)`` forces
    the tile shape. ``check_finite=True`` raises a ``ValueError`` naming the input (hidden,
    weight, bias) that holds NaN or inf.
    """
    logp, n_idx, t_idx, N, T = _scored_logprobs(hidden, weight, labels, bias, ignore_index,
                                                temperature, impl, chunk_bytes, chunk_sizes,
                                                check_finite, logit_softcap)
    out = torch.zeros(N, max(T - 1, 0), device=weight.device, dtype=torch.float32)
    return out.index_put((n_idx, t_idx), logp)


def linear_sequence_logprobs(hidden, weight, labels, *, bias=None, ignore_index=-100,
                             temperature=1.0, impl="auto", chunk_bytes=None, chunk_sizes=None,
                             check_finite=False, logit_softcap=None):
    """``(logps [N] float32, n_tokens [N] int64)``: the summed log-prob of each sequence's scored
    tokens and their count; see :func:`linear_token_logprobs`. An all-masked row gives (0, 0)."""
    logp, n_idx, _, N, _ = _scored_logprobs(hidden, weight, labels, bias, ignore_index,
                                            temperature, impl, chunk_bytes, chunk_sizes,
                                            check_finite, logit_softcap)
    dev = weight.device
    logps = torch.zeros(N, device=dev, dtype=torch.float32).index_add(0, n_idx, logp)
    n_tokens = torch.zeros(N, device=dev, dtype=torch.long).index_add_(
        0, n_idx, torch.ones_like(n_idx))
    return logps, n_tokens


def linear_token_logprobs_reference(hidden, weight, labels, *, bias=None, ignore_index=-100,
                                    temperature=1.0, logit_softcap=None):
    """Plain-PyTorch spec of :func:`linear_token_logprobs`: materialises the float32 logits
    ``z = hidden @ weight.T (+ bias)``, caps them (``logit_softcap * tanh(z / logit_softcap)``,
    as HF Gemma 2 / PaliGemma 2 do) and runs
    :func:`bpo_fast.ops.logprobs.token_logprobs_reference` with ``temperature`` (TRL divides the
    model's capped logits by it). Differentiable through autograd; ``[N, T, V]`` float32: for
    tests, not for big shapes."""
    from bpo_fast.ops.logprobs import token_logprobs_reference

    _check_inputs(hidden, weight, labels, bias, ignore_index, temperature)
    cap = check_logit_softcap(logit_softcap)
    z = hidden.float() @ weight.float().t()
    if bias is not None:
        z = z + bias.float()
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    return token_logprobs_reference(z, labels, ignore_index=ignore_index, temperature=temperature)


# ----------------------------------------------------------------------------------------------
# DPO with the gradient formed in the forward pass (3 GEMMs instead of 4)
# ----------------------------------------------------------------------------------------------


def _pair_groups(counts, B, max_tokens):
    """Consecutive pair ranges [(i0, i1)] whose scored tokens (chosen + rejected rows) stay
    within max_tokens; a single pair above it forms its own group."""
    groups, i0, acc = [], 0, 0
    for i in range(B):
        n = counts[i] + counts[B + i]
        if i > i0 and acc + n > max_tokens:
            groups.append((i0, i))
            i0, acc = i, 0
        acc += n
    if B:
        groups.append((i0, B))
    return groups


class _LinearPreferenceGradInForward(torch.autograd.Function):
    """The preference loss from hidden states with each pair's gradient formed as soon as its
    own log-probs are known (every loss type of the registry is a mean of per-pair terms, and
    the RPO term's gradient on a chosen row is the constant ``-rpo_alpha / n_chosen_tokens``):
    the forward runs over groups of pairs, keeps a group's float32 logits ``[S_group, V]``,
    reduces them, gets ``d loss / d logp`` from :func:`bpo_fast.ops.dpo.dpo_loss_and_grad`, adds
    the RPO term's, turns the same buffer into ``d logits`` and runs both gradient GEMMs right
    away: one logits GEMM per token instead of a forward one plus a backward recompute (3 GEMMs
    per token, not 4).

    Outputs ``(loss, dpo_loss, losses, nll, logps)`` with ``loss = dpo_loss + rpo_alpha * nll``.
    The backward scales the stored gradients by ``d out / d loss``; gradients that reach the
    other outputs (extra terms on the per-pair losses, the DPO part alone, the NLL or the policy
    log-probs) take the recomputing path."""

    @staticmethod
    def forward(ctx, *args):
        with _no_autocast(args[1].device):
            return _LinearPreferenceGradInForward._forward(ctx, *args)

    @staticmethod
    def _forward(ctx, hidden, weight, bias, ref_c, ref_r, n_idx, t_idx, targets, counts, lengths,
                 temperature, impl, plan, group_tokens, dpo_kw, rpo_alpha, softcap):
        from bpo_fast.ops.dpo import dpo_loss_and_grad

        ctx.set_materialize_grads(False)
        N, T, H = hidden.shape
        V = weight.shape[0]
        B = N // 2
        dev, dtype, f32 = weight.device, weight.dtype, torch.float32
        inv_temp = 1.0 / temperature
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        reducer = _TritonReducer if impl == "cublas" else _TorchReducer
        S = n_idx.numel()
        starts = [0]
        for c in counts:
            starts.append(starts[-1] + c)
        n_chosen = max(1, sum(counts[:B]))
        rpo_grad = rpo_alpha / n_chosen  # -d (rpo_alpha * nll) / d logp of each chosen row

        stats = torch.zeros(S, 2, device=dev, dtype=f32)
        logps = torch.zeros(N, device=dev, dtype=f32)
        gh = torch.zeros_like(hidden, memory_format=torch.contiguous_format) if need_h else None
        gb32 = torch.zeros(V, device=dev, dtype=f32) if need_b else None
        groups = _pair_groups(counts, B, group_tokens) if S else []
        # fully overwritten below when there is any scored token (one GEMM or the fp32 copy)
        gw = None if not need_w else (
            torch.empty_like(weight, memory_format=torch.contiguous_format) if groups
            else torch.zeros_like(weight, memory_format=torch.contiguous_format))
        gw32 = torch.zeros(V, H, device=dev, dtype=f32) if need_w and len(groups) > 1 else None
        for i0, i1 in groups:
            lo_c, hi_c, lo_r, hi_r = starts[i0], starts[i1], starts[B + i0], starts[B + i1]
            tok = torch.cat([torch.arange(lo_c, hi_c, device=dev),
                             torch.arange(lo_r, hi_r, device=dev)])
            if tok.numel() == 0:
                continue
            rows = n_idx[tok]
            h_g = hidden[rows, t_idx[tok]]
            tgt = targets[tok]
            z = _mm_f32(h_g, weight)
            m = torch.full((tok.numel(),), float("-inf"), device=dev, dtype=f32)
            s_ = torch.zeros_like(m)
            tlog = torch.zeros_like(m)
            # the torch reducer folds in place (z keeps what its gradient reuses: exp(x - max),
            # or tanh with a cap); the Triton one leaves z as it is
            reducer.update(z, bias, tgt, m, s_, tlog, 0, inv_temp, softcap)
            stats_g = _row_stats(m, s_)
            stats[tok] = stats_g
            logps.index_add_(0, rows, _logp(tlog, stats_g))
            if not (need_h or need_w or need_b):
                continue
            # this group's rows [chosen i0..i1; rejected i0..i1] as a [2P] DPO batch
            sel = torch.cat([torch.arange(i0, i1, device=dev),
                             torch.arange(B + i0, B + i1, device=dev)])
            _, dl = dpo_loss_and_grad(logps[sel], ref_c[i0:i1], ref_r[i0:i1],
                                      lengths=None if lengths is None else lengths[sel],
                                      **dpo_kw)
            # d loss / d logp_row = dlosses_row / B (- rpo_alpha / n_chosen on chosen rows)
            local = torch.where(rows < B, rows - i0, rows - B - i0 + (i1 - i0))
            g_tok = dl.float()[local] / B
            if rpo_alpha:
                g_tok = g_tok - torch.where(rows < B, rpo_grad, 0.0)
            d, gb = reducer.dlogits_from_state(z, bias, tgt, stats_g, g_tok * inv_temp, inv_temp,
                                               dtype, need_b, softcap)
            if need_b:
                gb32 += gb
            if need_h:
                gh[rows, t_idx[tok]] = d @ weight
            if need_w:
                if gw32 is None:
                    torch.mm(d.t(), h_g, out=gw)
                else:
                    _addmm_f32_(gw32, d.t(), h_g)
            del z, d
        if gw32 is not None:
            gw.copy_(gw32)
            del gw32
        out, dl_all = dpo_loss_and_grad(logps, ref_c, ref_r, lengths=lengths, **dpo_kw)
        nll = -logps[:B].sum() / n_chosen
        loss = out.loss.float() + rpo_alpha * nll
        ctx.save_for_backward(hidden, weight, bias, n_idx, t_idx, targets, stats, dl_all,
                              gh, gw, None if gb32 is None else gb32.to(dtype))
        ctx.inv_temp, ctx.impl, ctx.plan, ctx.B, ctx.n_chosen = inv_temp, impl, plan, B, n_chosen
        ctx.softcap = softcap
        ctx.need = (need_h, need_w, need_b)
        return loss, out.loss.float(), out.losses.float(), nll, logps

    @staticmethod
    def backward(ctx, g_loss, g_dpo, g_losses, g_nll, g_logps):
        (hidden, weight, bias, n_idx, t_idx, targets, stats, dl_all, gh_s, gw_s,
         gb_s) = ctx.saved_tensors
        need_h, need_w, need_b = ctx.need
        B = ctx.B
        grads = [None, None, None]
        if g_loss is not None:
            grads = [None if t is None else t * g_loss.to(t.dtype) for t in (gh_s, gw_s, gb_s)]
        # anything else: d out / d logp per row, then the recomputing backward
        g_row = None
        if g_dpo is not None:
            g_row = g_dpo.float() / B * dl_all.float()
        if g_losses is not None:
            g = g_losses.float().repeat(2) * dl_all.float()
            g_row = g if g_row is None else g_row + g
        if g_nll is not None:
            g = torch.cat([(-g_nll.float() / ctx.n_chosen).expand(B),
                           torch.zeros(B, device=dl_all.device)])
            g_row = g if g_row is None else g_row + g
        if g_logps is not None:
            g_row = g_logps.float() if g_row is None else g_row + g_logps.float()
        if g_row is not None and n_idx.numel() and (need_h or need_w or need_b):
            gscale = g_row[n_idx].contiguous() * ctx.inv_temp
            extra = _chunked_backward(_TritonReducer if ctx.impl == "cublas" else _TorchReducer,
                                      hidden, weight, bias, n_idx, t_idx, targets, stats, gscale,
                                      ctx.inv_temp, ctx.plan, need_h, need_w, need_b,
                                      ctx.softcap)
            grads = [e if g is None else (g if e is None else g + e)
                     for g, e in zip(grads, extra)]
        return (*grads,) + (None,) * 14


def fused_linear_dpo_loss(hidden, weight, labels, ref_chosen_logps, ref_rejected_logps, *,
                          bias=None, beta=0.1, loss_type="sigmoid", label_smoothing=0.0,
                          ignore_index=-100, temperature=1.0, discopop_tau=0.05, impl="auto",
                          chunk_bytes=None, chunk_sizes=None, grad_in_forward=None,
                          check_finite=False, logit_softcap=None):
    """The DPO loss from hidden states and the LM head: a thin name for
    :func:`bpo_fast.ops.preference.preference_loss` without the RPO term, returning its
    :class:`~bpo_fast.ops.dpo.DPOOutput` (``.dpo``: loss, per-pair losses, rewards, margins,
    accuracy, ``policy_chosen_logps`` / ``policy_rejected_logps``). Rows ``0..B-1`` of
    ``hidden [2B, T, H]`` / ``labels [2B, T]`` are the chosen sequences, rows ``B..2B-1`` the
    rejected ones; gradients reach ``hidden``, ``weight`` and ``bias``. See
    :func:`~bpo_fast.ops.preference.preference_loss` for ``impl``, ``grad_in_forward`` (3 GEMMs
    per token instead of 4), ``logit_softcap`` and the rest."""
    from bpo_fast.ops.preference import preference_loss

    return preference_loss(
        hidden, weight, labels, ref_chosen_logps, ref_rejected_logps, loss=loss_type, beta=beta,
        label_smoothing=label_smoothing, discopop_tau=discopop_tau, bias=bias,
        ignore_index=ignore_index, temperature=temperature, impl=impl, chunk_bytes=chunk_bytes,
        chunk_sizes=chunk_sizes, grad_in_forward=grad_in_forward, check_finite=check_finite,
        logit_softcap=logit_softcap).dpo


def __getattr__(name):
    # LinearDPOLoss lives with the op it wraps (bpo_fast.ops.preference imports this module)
    if name == "LinearDPOLoss":
        from bpo_fast.ops.preference import LinearDPOLoss

        return LinearDPOLoss
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
