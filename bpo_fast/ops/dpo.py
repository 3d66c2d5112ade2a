"""DPO losses (TRL 1.16 ``DPOTrainer`` formulas) from per-sequence log-probs, and the fused
logits -> loss path.

The loss types, their formulas, parameters and ranges live in one place, the registry
:mod:`bpo_fast.ops.losses` (its table: ``docs/losses.md``); this module validates through it
(:func:`bpo_fast.ops.losses.loss_config`) and evaluates its reference formulas.

``loss`` is the mean over pairs; ``chosen_rewards = b c`` and ``rejected_rewards = b r`` are
detached (as in TRL), ``reward_accuracy`` is the fraction of pairs with chosen reward > rejected
reward. Reference log-probs carry no gradient.

Implementations: :func:`dpo_loss_reference` (plain PyTorch + autograd: the spec), and a Triton
kernel (``kernels/dpo.py``) that computes the losses *and their closed-form derivatives* in one
launch; :func:`dpo_loss_and_grad` exposes the latter for other fused paths (the LM-head op), and
:func:`fused_dpo_loss` runs it straight on the token log-probs of the logits kernel. Token counts
of the length-normalised types (``ipo``, ``sigmoid_norm``) are the scored labels
(``labels[:, 1:] != ignore_index``) in :func:`fused_dpo_loss`; :func:`bpo_fast.ops.preference.
preference_loss` also offers TRL's count (``length_count="completion"``).
"""

import os
from dataclasses import dataclass
from typing import Optional

import torch

from bpo_fast.ops.losses import LENGTH_NORMALISED, LOSS_TYPES, REGISTRY, loss_config  # noqa: F401
from bpo_fast.ops.losses import check_finite as _check_finite, check_temperature


@dataclass
class DPOOutput:
    """Result of a DPO loss. ``loss`` is a float32 scalar (mean over the ``B`` pairs); the
    per-pair fields are float32 ``[B]``; ``reward_accuracy`` a float32 scalar. The policy
    log-probs are filled in by the fused calls (they computed them) and ``None`` otherwise."""

    loss: torch.Tensor
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    reward_margins: torch.Tensor
    reward_accuracy: torch.Tensor
    policy_chosen_logps: Optional[torch.Tensor] = None
    policy_rejected_logps: Optional[torch.Tensor] = None


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------


def validate_dpo_params(beta=0.1, loss_type="sigmoid", label_smoothing=0.0, discopop_tau=0.05):
    """Check the DPO hyper-parameters against the registry (:func:`bpo_fast.ops.losses.
    loss_config`: ranges, and parameters the loss type does not read left at their defaults);
    return them normalised as ``(beta: float, loss_type: str, label_smoothing: float,
    discopop_tau: float)``. Raises ``ValueError`` / ``TypeError`` naming the argument."""
    cfg = loss_config(loss_type, beta, label_smoothing, discopop_tau)
    return cfg.beta, cfg.loss_type, cfg.label_smoothing, cfg.discopop_tau


def _check_vector(name, x, B=None, device=None, floating=True):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 1:
        raise ValueError(f"{name} must be 1-D [B], got shape {tuple(x.shape)}")
    if B is not None and x.shape[0] != B:
        raise ValueError(f"{name} must be [B] = [{B}] like policy_chosen_logps, "
                         f"got shape {tuple(x.shape)}")
    if floating and not x.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating tensor, got {x.dtype}")
    if not floating and (x.dtype.is_complex or x.dtype == torch.bool):
        raise ValueError(f"{name} must be a real (integer or floating) tensor, got {x.dtype}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} must be on {device}, got {x.device}")


def check_dpo_inputs(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                     ref_rejected_logps, loss_type="sigmoid", chosen_lengths=None,
                     rejected_lengths=None):
    """Shape / dtype / device checks of the per-sequence inputs of :func:`dpo_loss` (no device
    work). ``chosen_lengths``/``rejected_lengths`` are required for :data:`LENGTH_NORMALISED`
    loss types. Returns ``B``."""
    _check_vector("policy_chosen_logps", policy_chosen_logps)
    B, dev = policy_chosen_logps.shape[0], policy_chosen_logps.device
    if B == 0:
        raise ValueError("policy_chosen_logps must hold at least one pair, got B = 0")
    _check_vector("policy_rejected_logps", policy_rejected_logps, B, dev)
    _check_vector("ref_chosen_logps", ref_chosen_logps, B, dev)
    _check_vector("ref_rejected_logps", ref_rejected_logps, B, dev)
    for name, x in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
        if x is None:
            if loss_type in LENGTH_NORMALISED:
                raise ValueError(f"{name} is required for loss_type={loss_type!r} (it divides "
                                 f"each side's log-ratio by its token count)")
        else:
            _check_vector(name, x, B, dev, floating=False)
            if x.dtype.is_floating_point:
                raise ValueError(f"{name} must be an integer tensor of token counts, got {x.dtype}")
    return B


def _check_lengths_values(**lengths):
    # a [B] reduction (one host sync) for user-given counts only; 0 (an empty answer) is clamped
    # to 1 in the formulas, as TRL's clamp(min=1)
    for name, x in lengths.items():
        if x is not None and x.numel() and bool((x < 0).any()):
            raise ValueError(f"{name} must hold token counts >= 0, got a negative value")


# ----------------------------------------------------------------------------------------------
# reference (the spec): plain PyTorch, gradients by autograd
# ----------------------------------------------------------------------------------------------


def _reference_losses(c, r, lc, lr, beta, loss_type, e, tau):
    """Per-pair losses from the log-ratios (any float dtype, autograd-friendly): the registry's
    reference formula."""
    return loss_config(loss_type, beta, e, tau).losses(c, r, lc, lr)


def _acc_dtype(*xs):
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def dpo_loss_reference(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                       ref_rejected_logps, *, beta=0.1, loss_type="sigmoid", label_smoothing=0.0,
                       chosen_lengths=None, rejected_lengths=None, discopop_tau=0.05):
    """Plain-PyTorch spec of :func:`dpo_loss` (float32, float64 for float64 inputs);
    differentiable through autograd in the policy log-probs."""
    beta, loss_type, e, tau = validate_dpo_params(beta, loss_type, label_smoothing, discopop_tau)
    check_dpo_inputs(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                     ref_rejected_logps, loss_type, chosen_lengths, rejected_lengths)
    acc = _acc_dtype(policy_chosen_logps, policy_rejected_logps)
    pc, pr = policy_chosen_logps.to(acc), policy_rejected_logps.to(acc)
    c = pc - ref_chosen_logps.detach().to(acc)
    r = pr - ref_rejected_logps.detach().to(acc)
    lc = lr = None
    if loss_type in LENGTH_NORMALISED:
        lc, lr = chosen_lengths, rejected_lengths
    losses = _reference_losses(c, r, lc, lr, beta, loss_type, e, tau)
    chosen_rewards = (beta * c).detach()
    rejected_rewards = (beta * r).detach()
    return DPOOutput(
        loss=losses.mean(), losses=losses, chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards, reward_margins=chosen_rewards - rejected_rewards,
        reward_accuracy=(chosen_rewards > rejected_rewards).to(acc).mean())


# ----------------------------------------------------------------------------------------------
# loss + closed-form gradient (for fused callers)
# ----------------------------------------------------------------------------------------------


def _use_triton(device):
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _reference_loss_and_grad(pc, pr, rc, rr, lc, lr, beta, loss_type, e, tau):
    """CPU twin of the Triton pair kernel: reference losses, d losses_i / d policy logps by
    autograd on detached leaves. Returns (DPOOutput detached, dlosses/dpc, dlosses/dpr)."""
    with torch.enable_grad():
        pc_ = pc.detach().float().requires_grad_(True)
        pr_ = pr.detach().float().requires_grad_(True)
        out = dpo_loss_reference(pc_, pr_, rc, rr, beta=beta, loss_type=loss_type,
                                 label_smoothing=e, chosen_lengths=lc, rejected_lengths=lr,
                                 discopop_tau=tau)
        # each loss_i depends only on pair i, so the gradient of sum(losses) is per-pair
        dc, dr = torch.autograd.grad(out.losses.sum(), (pc_, pr_))
    out.loss, out.losses = out.loss.detach(), out.losses.detach()
    return out, dc, dr


def dpo_loss_and_grad(policy_logps, ref_chosen_logps, ref_rejected_logps, *, beta=0.1,
                      loss_type="sigmoid", label_smoothing=0.0, lengths=None,
                      discopop_tau=0.05):
    """The DPO loss and its gradient with respect to the policy log-probs, without autograd.

    ``policy_logps``: float ``[2B]``, rows ``0..B-1`` chosen, ``B..2B-1`` rejected (the
    ``[chosen; rejected]`` batch layout). ``lengths``: ``[2B]`` token counts in the same layout
    (required for ``ipo`` / ``sigmoid_norm``). Returns ``(out, dlosses)``: ``out`` a detached
    :class:`DPOOutput` (with ``policy_chosen_logps``/``policy_rejected_logps`` set), and
    ``dlosses`` float32 ``[2B]`` with ``dlosses[j] = d losses[j mod B] / d policy_logps[j]``
    (each pair's loss depends only on its own two rows). The gradient of ``loss`` (the mean) is
    ``dlosses / B``; for an upstream ``g_loss`` and ``g_losses [B]`` the gradient w.r.t.
    ``policy_logps`` is ``(g_loss / B + g_losses.repeat(2)) * dlosses``.

    On CUDA (or under ``TRITON_INTERPRET=1``) this is one Triton launch; on CPU the reference
    with autograd.
    """
    beta, loss_type, e, tau = validate_dpo_params(beta, loss_type, label_smoothing, discopop_tau)
    _check_vector("policy_logps", policy_logps)
    n = policy_logps.shape[0]
    if n == 0 or n % 2:
        raise ValueError(f"policy_logps must be [2B] with B >= 1 ([chosen; rejected]), "
                         f"got shape {tuple(policy_logps.shape)}")
    B = n // 2
    lc = lr = None
    if lengths is not None:
        _check_vector("lengths", lengths, n, policy_logps.device, floating=False)
        lc, lr = lengths[:B], lengths[B:]
    pc, pr = policy_logps[:B], policy_logps[B:]
    check_dpo_inputs(pc, pr, ref_chosen_logps, ref_rejected_logps, loss_type, lc, lr)
    if _use_triton(policy_logps.device):
        out, dl = _kernel_loss_and_grad(pc.detach(), pr.detach(), ref_chosen_logps.detach(),
                                        ref_rejected_logps.detach(), lc, lr, beta, loss_type,
                                        e, tau)
    else:
        out, dc, dr = _reference_loss_and_grad(pc, pr, ref_chosen_logps, ref_rejected_logps,
                                               lc, lr, beta, loss_type, e, tau)
        dl = torch.cat([dc, dr])
    out.policy_chosen_logps = pc.detach().float()
    out.policy_rejected_logps = pr.detach().float()
    return out, dl


def _vec(x):
    return x if x.stride(0) == 1 else x.contiguous()


def _kernel_loss_and_grad(pc, pr, rc, rr, lc, lr, beta, loss_type, e, tau):
    from bpo_fast.kernels import dpo as K

    res = K.dpo_pairs(_vec(pc), _vec(pr), _vec(rc), _vec(rr),
                      None if lc is None else _vec(lc), None if lr is None else _vec(lr),
                      beta=beta, loss_type=REGISTRY[loss_type].kernel_id,
                      label_smoothing=e, tau=tau)
    return _output_from_kernel(res), res["dlosses"]


def _output_from_kernel(res):
    return DPOOutput(loss=res["loss"], losses=res["losses"],
                     chosen_rewards=res["chosen_rewards"],
                     rejected_rewards=res["rejected_rewards"],
                     reward_margins=res["reward_margins"],
                     reward_accuracy=res["reward_accuracy"])


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------


class _DPOPairsFn(torch.autograd.Function):
    """dpo_loss through the pair kernel: outputs (loss, losses, chosen_rewards,
    rejected_rewards, reward_margins, reward_accuracy); the last four carry no gradient."""

    @staticmethod
    def forward(ctx, pc, pr, rc, rr, lc, lr, params):
        out, dl = _kernel_loss_and_grad(pc.detach(), pr.detach(), rc, rr, lc, lr, *params)
        ctx.save_for_backward(dl)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(out.chosen_rewards, out.rejected_rewards, out.reward_margins,
                                    out.reward_accuracy)
        ctx.dtypes = (pc.dtype, pr.dtype)
        return (out.loss, out.losses, out.chosen_rewards, out.rejected_rewards,
                out.reward_margins, out.reward_accuracy)

    @staticmethod
    def backward(ctx, g_loss, g_losses, *unused):
        (dl,) = ctx.saved_tensors
        B = dl.shape[0] // 2
        coef = None
        if g_loss is not None:
            coef = g_loss.float() / B
        if g_losses is not None:
            coef = g_losses.float() if coef is None else coef + g_losses.float()
        if coef is None:
            return (None,) * 7
        gc = (coef * dl[:B]).to(ctx.dtypes[0])
        gr = (coef * dl[B:]).to(ctx.dtypes[1])
        return gc, gr, None, None, None, None, None


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
             beta=0.1, loss_type="sigmoid", label_smoothing=0.0, chosen_lengths=None,
             rejected_lengths=None, discopop_tau=0.05, check_finite=False):
    """DPO loss from per-sequence log-probs (``[B]`` each); returns a :class:`DPOOutput`.

    See the module doc for the formulas (TRL 1.16 ``DPOTrainer``). ``chosen_lengths`` /
    ``rejected_lengths`` (token counts, ``[B]``) are needed by ``ipo`` and ``sigmoid_norm``.
    Differentiable in the policy log-probs (``loss`` and ``losses``); rewards are detached and
    the reference log-probs get no gradient. Float32 results (float64 inputs use the float64
    reference). On CUDA (or under ``TRITON_INTERPRET=1``) one Triton launch computes
    everything, with the closed-form gradient saved for backward. ``check_finite=True``
    raises a ``ValueError`` naming the input that holds NaN or inf (host syncs; off by default).
    """
    beta, loss_type, e, tau = validate_dpo_params(beta, loss_type, label_smoothing, discopop_tau)
    check_dpo_inputs(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                     ref_rejected_logps, loss_type, chosen_lengths, rejected_lengths)
    if loss_type in LENGTH_NORMALISED:
        _check_lengths_values(chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    if check_finite:
        _check_finite(policy_chosen_logps=policy_chosen_logps,
                      policy_rejected_logps=policy_rejected_logps,
                      ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    if (not _use_triton(policy_chosen_logps.device)
            or torch.float64 in (policy_chosen_logps.dtype, policy_rejected_logps.dtype)):
        return dpo_loss_reference(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                  ref_rejected_logps, beta=beta, loss_type=loss_type,
                                  label_smoothing=e, chosen_lengths=chosen_lengths,
                                  rejected_lengths=rejected_lengths, discopop_tau=tau)
    lc = lr = None
    if loss_type in LENGTH_NORMALISED:
        lc, lr = chosen_lengths, rejected_lengths
    res = _DPOPairsFn.apply(policy_chosen_logps, policy_rejected_logps,
                            ref_chosen_logps.detach(), ref_rejected_logps.detach(), lc, lr,
                            (beta, loss_type, e, tau))
    return DPOOutput(*res)


class _FusedDPOFn(torch.autograd.Function):
    """logits [2B, T, V] -> (loss, losses, logps [2B], chosen_rewards, rejected_rewards,
    reward_margins, reward_accuracy, n_tokens [2B]): the logits kernel, then one pair kernel
    that reduces the token log-probs per sequence and evaluates the loss and its gradient.
    Backward: one logits-gradient kernel that combines the upstream gradients of loss, losses
    and logps with the saved d losses / d logps per row."""

    @staticmethod
    def forward(ctx, logits, labels, rc, rr, ignore_index, temperature, params, inplace):
        from bpo_fast.kernels import dpo as KD
        from bpo_fast.kernels import logprobs as KL

        beta, loss_type, e, tau = params
        lp, lse = KL.forward(logits, labels, ignore_index, temperature)
        res = KD.dpo_pairs(None, None, _vec(rc), _vec(rr), beta=beta,
                           loss_type=REGISTRY[loss_type].kernel_id, label_smoothing=e, tau=tau,
                           token_logps=lp, labels=labels, ignore_index=ignore_index)
        ctx.save_for_backward(logits, labels, lse, res["dlosses"])
        ctx.cfg = (ignore_index, temperature, inplace)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(res["chosen_rewards"], res["rejected_rewards"],
                                    res["reward_margins"], res["reward_accuracy"],
                                    res["n_tokens"])
        return (res["loss"], res["losses"], res["logps"], res["chosen_rewards"],
                res["rejected_rewards"], res["reward_margins"], res["reward_accuracy"],
                res["n_tokens"])

    @staticmethod
    def backward(ctx, g_loss, g_losses, g_logps, *unused):
        from bpo_fast.kernels import logprobs as KL
        from bpo_fast.ops.logprobs import _bump_version

        logits, labels, lse, dl = ctx.saved_tensors
        ignore_index, temperature, inplace = ctx.cfg
        none = (None,) * 8
        if not ctx.needs_input_grad[0] or (g_loss is None and g_losses is None
                                           and g_logps is None):
            return none
        B = dl.shape[0] // 2
        grad = KL.backward(
            logits, labels, lse, ignore_index, temperature, mode=KL.MODE_DPO,
            g=None if g_logps is None else g_logps.float().contiguous(),
            g_loss=None if g_loss is None else g_loss.float(),
            g_losses=None if g_losses is None else g_losses.float().contiguous(),
            dlosses=dl, B=B, out=logits if inplace else None)
        if inplace:
            _bump_version(logits)
            # a plain alias of the storage: the saved logits may be a leaf that requires grad
            grad = grad.detach()
        return (grad,) + none[1:]


def fused_dpo_loss(logits, labels, ref_chosen_logps, ref_rejected_logps, *, beta=0.1,
                   loss_type="sigmoid", label_smoothing=0.0, ignore_index=-100, temperature=1.0,
                   discopop_tau=0.05, inplace_backward=False, check_finite=False):
    """The whole DPO step from logits, in one call.

    Rows ``0..B-1`` of ``logits [2B, T, V]`` / ``labels [2B, T]`` are the chosen sequences, rows
    ``B..2B-1`` the rejected ones (log-probs as in :func:`~bpo_fast.ops.logprobs.
    sequence_logprobs`: HF label shift, ``ignore_index``, ``temperature``; the token counts
    feed the length-normalised loss types). ``ref_chosen_logps`` / ``ref_rejected_logps``:
    ``[B]``, no gradient. Returns a :class:`DPOOutput` that also carries
    ``policy_chosen_logps`` / ``policy_rejected_logps`` (float32 ``[B]``, differentiable).

    On CUDA: two forward launches (the logits pass; one kernel for the per-sequence reduction,
    the loss, metrics and d loss / d log-probs) and one backward launch that writes the
    gradient w.r.t. ``logits`` directly in their dtype: no ``[2B, T, V]`` float32 temporary.
    ``inplace_backward=True`` writes that gradient into the logits' storage, destroying them.
    Token counts (``ipo``, ``sigmoid_norm``): the scored labels, ``labels[:, 1:] !=
    ignore_index``. ``check_finite=True`` raises a ``ValueError`` naming the input that holds
    NaN or inf.
    """
    from bpo_fast.ops.logprobs import (_check_inplace, check_logits_labels, prepare,
                                       sequence_logprobs_reference, use_triton)

    beta, loss_type, e, tau = validate_dpo_params(beta, loss_type, label_smoothing, discopop_tau)
    _check_inplace(inplace_backward)
    N, _, _ = check_logits_labels(logits, labels, ignore_index, temperature, allow_float64=True)
    if N == 0 or N % 2:
        raise ValueError(f"logits must hold an even, non-zero number of rows [chosen; rejected] "
                         f"(2B), got {N}")
    B = N // 2
    _check_vector("ref_chosen_logps", ref_chosen_logps, B, logits.device)
    _check_vector("ref_rejected_logps", ref_rejected_logps, B, logits.device)
    if check_finite:
        _check_finite(logits=logits, ref_chosen_logps=ref_chosen_logps,
                      ref_rejected_logps=ref_rejected_logps)
    if logits.dtype == torch.float64 or not use_triton(logits.device):
        logps, n_tok = sequence_logprobs_reference(logits, labels, ignore_index=ignore_index,
                                                   temperature=temperature)
        out = dpo_loss_reference(logps[:B], logps[B:], ref_chosen_logps, ref_rejected_logps,
                                 beta=beta, loss_type=loss_type, label_smoothing=e,
                                 chosen_lengths=n_tok[:B], rejected_lengths=n_tok[B:],
                                 discopop_tau=tau)
        out.policy_chosen_logps, out.policy_rejected_logps = logps[:B], logps[B:]
        return out
    logits, labels, _ = prepare(logits, labels, ignore_index, temperature)
    (loss, losses, logps, crew, rrew, marg, acc, _) = _FusedDPOFn.apply(
        logits, labels, ref_chosen_logps.detach(), ref_rejected_logps.detach(), ignore_index,
        float(temperature), (beta, loss_type, e, tau), inplace_backward)
    return DPOOutput(loss=loss, losses=losses, chosen_rewards=crew, rejected_rewards=rrew,
                     reward_margins=marg, reward_accuracy=acc,
                     policy_chosen_logps=logps[:B], policy_rejected_logps=logps[B:])


class DPOLoss(torch.nn.Module):
    """Module wrapper for training loops. ``DPOLoss(beta=0.1, loss_type="sigmoid", ...)``;
    called with ``(logits, labels, ref_chosen_logps, ref_rejected_logps)`` it runs
    :func:`fused_dpo_loss`; called with four ``[B]`` log-prob tensors (policy chosen, policy
    rejected, ref chosen, ref rejected) it runs :func:`dpo_loss`."""

    def __init__(self, beta=0.1, loss_type="sigmoid", label_smoothing=0.0, *, ignore_index=-100,
                 temperature=1.0, discopop_tau=0.05, inplace_backward=False, check_finite=False):
        super().__init__()
        from bpo_fast.ops.logprobs import _check_inplace

        self.beta, self.loss_type, self.label_smoothing, self.discopop_tau = \
            validate_dpo_params(beta, loss_type, label_smoothing, discopop_tau)
        # the settings of the logits path are checked here, not at the first call
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
        check_temperature(temperature)
        _check_inplace(inplace_backward)
        self.ignore_index = ignore_index
        self.temperature = temperature
        self.inplace_backward = inplace_backward
        self.check_finite = bool(check_finite)

    def extra_repr(self):
        return (f"beta={self.beta}, loss_type={self.loss_type!r}, "
                f"label_smoothing={self.label_smoothing}")

    def forward(self, a, b, ref_chosen_logps, ref_rejected_logps, *, chosen_lengths=None,
                rejected_lengths=None):
        kw = dict(beta=self.beta, loss_type=self.loss_type, label_smoothing=self.label_smoothing,
                  discopop_tau=self.discopop_tau, check_finite=self.check_finite)
        if isinstance(a, torch.Tensor) and a.dim() == 3:
            return fused_dpo_loss(a, b, ref_chosen_logps, ref_rejected_logps,
                                  ignore_index=self.ignore_index, temperature=self.temperature,
                                  inplace_backward=self.inplace_backward, **kw)
        return dpo_loss(a, b, ref_chosen_logps, ref_rejected_logps,
                        chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths, **kw)
