"""Token and sequence log-probs from logits: ``log_softmax(logits / temperature)[label]``.

Reference implementations (plain PyTorch, the spec) live here next to the public, differentiable
ops. Conventions (see DESIGN.md): ``labels`` is aligned with ``input_ids`` (Hugging Face), so
position ``t`` of the logits scores ``labels[:, t + 1]``; ``ignore_index`` positions score 0;
everything accumulates in float32 whatever the logits' dtype.
"""

import os

import torch

from bpo_fast.ops.losses import check_temperature

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------


def check_logits_labels(logits, labels, ignore_index=-100, temperature=1.0, *,
                        allow_float64=False):
    """Validate ``logits [N, T, V]`` / ``labels [N, T]`` / ``ignore_index`` / ``temperature``.

    Shapes and dtypes are always checked (no device work). Returns ``(N, T, V)``.
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if logits.dim() != 3:
        raise ValueError(f"logits must be [N, T, V], got shape {tuple(logits.shape)}")
    N, T, V = logits.shape
    ok = _FLOAT_DTYPES + ((torch.float64,) if allow_float64 else ())
    if logits.dtype not in ok:
        raise ValueError(f"logits must be a floating tensor of dtype "
                         f"{', '.join(str(d) for d in ok)}, got {logits.dtype}")
    if labels.dim() != 2 or tuple(labels.shape) != (N, T):
        raise ValueError(f"labels must be [N, T] = {(N, T)} like logits' first two dims, "
                         f"got shape {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be an int64 (or int32) tensor, got {labels.dtype}")
    if T < 1 or V < 1:
        raise ValueError(f"logits must have T >= 1 and V >= 1, got shape {tuple(logits.shape)}")
    if labels.device != logits.device:
        raise ValueError(f"labels must be on logits' device {logits.device}, got {labels.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    check_temperature(temperature)
    return N, T, V


def check_label_range(labels, V, ignore_index=-100):
    """Raise ``ValueError`` if a scored label (``labels[:, 1:]`` not ``ignore_index``) is outside
    ``[0, V)``. This reads the labels on the host, i.e. a device sync on CUDA: the public ops
    call it for CPU tensors always and for CUDA tensors only under ``BPO_FAST_DEBUG=1`` (without
    it, the kernels poison an out-of-range token's log-prob with NaN instead of reading out of
    bounds)."""
    nxt = labels[:, 1:]
    bad = (nxt != ignore_index) & ((nxt < 0) | (nxt >= V))
    if bool(bad.any()):
        first = bad.nonzero()[0].tolist()
        raise ValueError(f"labels must be in [0, V={V}) or equal ignore_index={ignore_index}; "
                         f"labels[{first[0]}, {first[1] + 1}] = {int(nxt[first[0], first[1]])}")


# ----------------------------------------------------------------------------------------------
# reference implementations (the spec)
# ----------------------------------------------------------------------------------------------


def token_logprobs_reference(logits, labels, *, ignore_index=-100, temperature=1.0):
    """Plain-PyTorch spec of :func:`token_logprobs`: float32 (float64 for float64 logits)
    ``[N, T - 1]``, entry ``t`` = ``log_softmax(logits[n, t] / temperature)[labels[n, t + 1]]``
    or 0 where ``labels[n, t + 1] == ignore_index``. Materialises ``[N, T-1, V]`` in float32:
    fine as a reference, not for big shapes. Differentiable through autograd."""
    N, T, V = check_logits_labels(logits, labels, ignore_index, temperature, allow_float64=True)
    check_label_range(labels, V, ignore_index)
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits[:, :-1].to(acc)
    if temperature != 1.0:
        z = z / temperature
    tgt = labels[:, 1:].long()
    scored = tgt != ignore_index
    safe = torch.where(scored, tgt, torch.zeros_like(tgt))
    lp = torch.log_softmax(z, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    # where (not multiply): an ignored row's gradient is exactly 0 even if its logits overflow
    return torch.where(scored, lp, torch.zeros_like(lp))


def sequence_logprobs_reference(logits, labels, *, ignore_index=-100, temperature=1.0):
    """Plain-PyTorch spec of :func:`sequence_logprobs`: ``(logps [N], n_tokens [N] int64)``."""
    lp = token_logprobs_reference(logits, labels, ignore_index=ignore_index,
                                  temperature=temperature)
    n_tokens = (labels[:, 1:] != ignore_index).sum(dim=1, dtype=torch.int64)
    return lp.sum(dim=1), n_tokens


# ----------------------------------------------------------------------------------------------
# Triton path: dispatch and autograd
# ----------------------------------------------------------------------------------------------


def use_triton(device):
    """Triton kernels on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (how the
    tests exercise them); the reference otherwise."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def debug_checks():
    """``BPO_FAST_DEBUG=1``: also run the checks that need a device sync (label range) on CUDA."""
    return os.environ.get("BPO_FAST_DEBUG", "0") not in ("", "0")


def prepare(logits, labels, ignore_index, temperature):
    """Validate for the Triton path; returns ``(logits, labels, V)`` with unit stride over V.

    Shapes and dtypes always; the label range eagerly on CPU (free there) and on CUDA only under
    ``BPO_FAST_DEBUG=1`` (it would sync; without it a bad label yields a NaN log-prob)."""
    N, T, V = check_logits_labels(logits, labels, ignore_index, temperature)
    if logits.device.type != "cuda" or debug_checks():
        check_label_range(labels, V, ignore_index)
    if logits.stride(2) != 1 and V > 1:
        # the kernels need unit stride over V (vector loads); other layouts are rare: copy
        logits = logits.contiguous()
    from bpo_fast.kernels.logprobs import int64_labels

    # widened once per op here (the kernels' launchers would otherwise widen per launch)
    return logits, int64_labels(labels), V


def _bump_version(t):
    # the in-place backward overwrote t's storage: make autograd refuse any later use of t that
    # saved it (e.g. a softcap before the logits) instead of silently reading the gradient
    try:
        torch.autograd.graph.increment_version(t)
    except (AttributeError, RuntimeError):  # older torch, or inference tensors
        pass


class _LogprobsFn(torch.autograd.Function):
    """Token log-probs ``[N, T-1]`` (``sequence=False``) or ``(logps [N], n_tokens [N])``
    (``sequence=True``) through the Triton kernels."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index, temperature, sequence, inplace):
        from bpo_fast.kernels import logprobs as K

        lp, lse = K.forward(logits, labels, ignore_index, temperature)
        ctx.save_for_backward(logits, labels, lse)
        ctx.cfg = (ignore_index, temperature, sequence, inplace)
        ctx.set_materialize_grads(False)
        if not sequence:
            return lp
        sums, cnt = K.sequence_sums(lp, labels, ignore_index)
        ctx.mark_non_differentiable(cnt)
        return sums, cnt

    @staticmethod
    def backward(ctx, g, *unused):
        from bpo_fast.kernels import logprobs as K

        logits, labels, lse = ctx.saved_tensors
        ignore_index, temperature, sequence, inplace = ctx.cfg
        if g is None or not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        g = g.float().contiguous()
        mode = K.MODE_SEQUENCE if sequence else K.MODE_TOKEN
        out = logits if inplace else None
        grad = K.backward(logits, labels, lse, ignore_index, temperature, mode=mode, g=g,
                          out=out)
        if inplace:
            _bump_version(logits)
            # a plain alias of the storage: the saved logits may be a leaf that requires grad
            grad = grad.detach()
        return grad, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------


def _check_inplace(inplace_backward):
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"inplace_backward must be a bool, got {inplace_backward!r}")


def _maybe_check_finite(check_finite, logits):
    if check_finite:
        from bpo_fast.ops.losses import check_finite as _check_finite

        _check_finite(logits=logits)


def token_logprobs(logits, labels, *, ignore_index=-100, temperature=1.0,
                   inplace_backward=False, check_finite=False):
    """Per-token log-probs: float32 ``[N, T - 1]`` with entry ``t`` =
    ``log_softmax(logits[n, t] / temperature)[labels[n, t + 1]]``, or 0 where
    ``labels[n, t + 1] == ignore_index``.

    ``logits [N, T, V]`` fp32/bf16/fp16, any strides with unit stride over ``V`` (no copy);
    ``labels [N, T]`` int64 aligned with ``input_ids`` (Hugging Face convention). One streaming
    pass over the logits (Triton on CUDA; the reference on CPU unless ``TRITON_INTERPRET=1``);
    only a float32 ``[N, T-1]`` log-sum-exp is saved for backward, which writes the logits'
    gradient in their dtype in one pass. ``inplace_backward=True`` writes that gradient into the
    logits' own storage, **destroying the logits** (saves one logits-sized buffer; autograd then
    refuses any other use of the logits that saved them). Float64 logits use the reference.
    Labels outside ``[0, V)`` raise ``ValueError`` on CPU and, on CUDA, under
    ``BPO_FAST_DEBUG=1`` (no sync otherwise; the token's log-prob is then NaN).
    ``check_finite=True`` raises a ``ValueError`` if the logits hold NaN or inf.
    """
    _check_inplace(inplace_backward)
    _maybe_check_finite(check_finite, logits)
    if isinstance(logits, torch.Tensor) and (logits.dtype == torch.float64
                                             or not use_triton(logits.device)):
        return token_logprobs_reference(logits, labels, ignore_index=ignore_index,
                                        temperature=temperature)
    logits, labels, _ = prepare(logits, labels, ignore_index, temperature)
    return _LogprobsFn.apply(logits, labels, ignore_index, float(temperature), False,
                             inplace_backward)


def sequence_logprobs(logits, labels, *, ignore_index=-100, temperature=1.0,
                      inplace_backward=False, check_finite=False):
    """``(logps [N] float32, n_tokens [N] int64)``: per-sequence sums of
    :func:`token_logprobs` and the number of scored tokens (an all-masked row gives
    ``(0, 0)``). Same arguments, dispatch and backward as :func:`token_logprobs`."""
    _check_inplace(inplace_backward)
    _maybe_check_finite(check_finite, logits)
    if isinstance(logits, torch.Tensor) and (logits.dtype == torch.float64
                                             or not use_triton(logits.device)):
        return sequence_logprobs_reference(logits, labels, ignore_index=ignore_index,
                                           temperature=temperature)
    logits, labels, _ = prepare(logits, labels, ignore_index, temperature)
    return _LogprobsFn.apply(logits, labels, ignore_index, float(temperature), True,
                             inplace_backward)
