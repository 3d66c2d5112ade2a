"""Token and sequence log-probs from logits: ``log_softmax(logits / temperature)[label]``.

Reference implementations (plain PyTorch, the spec) live here next to the public, differentiable
ops. Conventions (see DESIGN.md): ``labels`` is aligned with ``input_ids`` (Hugging Face), so
position ``t`` of the logits scores ``labels[:, t + 1]``; ``ignore_index`` positions score 0;
everything accumulates in float32 whatever the logits' dtype.
"""

import math

import torch

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
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
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
# public API
# ----------------------------------------------------------------------------------------------


def token_logprobs(logits, labels, *, ignore_index=-100, temperature=1.0, inplace_backward=False):
    """Per-token log-probs, float32 ``[N, T - 1]``; see :func:`token_logprobs_reference`."""
    return token_logprobs_reference(logits, labels, ignore_index=ignore_index,
                                    temperature=temperature)


def sequence_logprobs(logits, labels, *, ignore_index=-100, temperature=1.0,
                      inplace_backward=False):
    """``(logps [N] float32, n_tokens [N] int64)``; see :func:`sequence_logprobs_reference`."""
    return sequence_logprobs_reference(logits, labels, ignore_index=ignore_index,
                                       temperature=temperature)
