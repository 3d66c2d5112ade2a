"""The preference loss from hidden states and the LM head: the one op training runs.

``preference_loss(hidden, weight, labels, ref_chosen, ref_rejected, loss="sigmoid", beta=0.1,
rpo_alpha=0)`` is the whole loss side of a DPO step: the policy's per-sequence log-probs
straight from the hidden states (the fused LM head of :mod:`bpo_fast.ops.linear`, no logits),
the preference loss of any registry type (:mod:`bpo_fast.ops.losses`), the RPO term, the DPO
metrics, the log-probs and the token counts. :class:`PreferenceLoss` is its ``nn.Module``
(the loss configuration is validated once, when it is built).

The RPO term: ``loss = dpo_loss + rpo_alpha * nll`` with ``nll`` the mean negative log-prob over
all chosen answer tokens of the batch (TRL 1.16's ``sft`` loss term: ``-chosen_per_token_logps
[chosen_mask].mean()``; TRL 1.16 has no ``rpo_alpha``, its equivalent is
``loss_type=["sigmoid", "sft"], loss_weights=[1, rpo_alpha]``). Its gradient on each chosen
token is the constant ``-rpo_alpha / n_chosen_tokens``, known before the logits are, so it is
folded into the per-token gradient scale of the 3-GEMM path (``grad_in_forward``): DPO + RPO
cost 3 LM-head GEMMs per scored token (logits, ``grad_hidden``, ``grad_weight``), not 4.
"""

from dataclasses import dataclass

import torch

from bpo_fast.ops import linear as L
from bpo_fast.ops.dpo import DPOOutput, _check_vector, dpo_loss
from bpo_fast.ops.losses import (LossConfig, check_finite as _check_finite, check_length_count,
                                 check_logit_softcap, check_rpo_alpha, check_temperature,
                                 loss_config)


@dataclass
class PreferenceLossOutput:
    """What :func:`preference_loss` returns.

    ``loss``: the optimised float32 scalar, ``dpo.loss + rpo_alpha * nll`` (the same tensor as
    ``dpo.loss`` when ``rpo_alpha`` is 0). ``dpo``: the :class:`~bpo_fast.ops.dpo.DPOOutput` of
    the preference loss (``loss`` its mean over pairs, per-pair ``losses``, rewards, margins,
    accuracy, ``policy_chosen_logps``/``policy_rejected_logps``). ``nll``: the chosen tokens'
    mean NLL (0 when no chosen token is scored). Log-probs float32 ``[B]`` (differentiable),
    token counts int64 ``[B]`` (the scored tokens, ``labels[:, 1:] != ignore_index``)."""

    loss: torch.Tensor
    dpo: DPOOutput
    nll: torch.Tensor
    policy_chosen_logps: torch.Tensor
    policy_rejected_logps: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


def _settings(loss, beta, label_smoothing, discopop_tau, rpo_alpha, length_count):
    cfg = loss if isinstance(loss, LossConfig) else loss_config(loss, beta, label_smoothing,
                                                                discopop_tau)
    return cfg, check_rpo_alpha(rpo_alpha), check_length_count(length_count)


def _lengths(cfg, counts, labels, ignore_index, length_count):
    """Token counts ``[2B]`` for the length-normalised types (None for the others)."""
    if not cfg.needs_lengths:
        return None
    if length_count == "completion":  # TRL 1.16: completion_mask.sum(1), position 0 included
        return counts + (labels[:, 0] != ignore_index).long()
    return counts


def preference_loss(hidden, weight, labels, ref_chosen_logps, ref_rejected_logps, *,
                    loss="sigmoid", beta=0.1, label_smoothing=0.0, discopop_tau=0.05,
                    rpo_alpha=0.0, bias=None, ignore_index=-100, temperature=1.0,
                    length_count="scored", impl="auto", chunk_bytes=None, chunk_sizes=None,
                    grad_in_forward=None, check_finite=False, logit_softcap=None):
    """Preference loss (+ RPO) from hidden states; returns a :class:`PreferenceLossOutput`.

    ``hidden [2B, T, H]`` / ``labels [2B, T]``: rows ``0..B-1`` chosen, ``B..2B-1`` rejected
    (HF labels: position ``t`` scores ``labels[t + 1]``; ``ignore_index`` scores nothing);
    ``weight [V, H]`` (+ ``bias [V]``): the LM head, same dtype as ``hidden`` (fp32/bf16/fp16);
    ``ref_*_logps [B]``: the reference's summed log-probs (no gradient). ``loss``: a loss type
    of :data:`bpo_fast.ops.losses.LOSS_TYPES` or a :class:`~bpo_fast.ops.losses.LossConfig`;
    ``beta``, ``label_smoothing``, ``discopop_tau``: checked by the registry (ranges; a
    parameter the type does not read must stay at its default). ``rpo_alpha >= 0``: weight of
    the chosen tokens' mean NLL. ``length_count`` (``ipo``, ``sigmoid_norm``): ``"scored"``
    (``labels[:, 1:] != ignore_index``) or ``"completion"`` (TRL 1.16's
    ``completion_mask.sum(1)``: ``labels != ignore_index``).

    ``grad_in_forward`` (default: when a gradient is needed and ``impl`` resolves to
    ``"torch"`` or ``"cublas"``): the gradients are formed during the forward pass, group of
    pairs by group of pairs, so that each token's logits are computed once (3 LM-head GEMMs
    per scored token instead of 4); a group's float32 logits ``[S_group, V]`` are held at once
    (``chunk_bytes`` bounds them; one pair is never split). The gradients are exact either way;
    ``False`` gives the composed path (forward, then a recomputing backward), which the
    ``"triton"``/``"hybrid"`` impls always take. ``check_finite=True`` raises a ``ValueError``
    naming the input (hidden, weight, bias, ref log-probs) that holds NaN or inf.

    ``logit_softcap``: ``None`` or a finite number ``> 0``: the LM head's logits are
    ``logit_softcap * tanh(z / logit_softcap)`` (Gemma 2 / PaliGemma 2
    ``final_logit_softcapping``), capped before ``temperature`` divides them, as HF and TRL do.
    """
    cfg, rpo_alpha, length_count = _settings(loss, beta, label_smoothing, discopop_tau,
                                             rpo_alpha, length_count)
    N, T, H, V = L._check_inputs(hidden, weight, labels, bias, ignore_index, temperature)
    softcap = check_logit_softcap(logit_softcap)
    if N == 0 or N % 2:
        raise ValueError(f"hidden must hold an even, non-zero number of rows [chosen; rejected] "
                         f"(2B), got {N}")
    B = N // 2
    dev = weight.device
    _check_vector("ref_chosen_logps", ref_chosen_logps, B, dev)
    _check_vector("ref_rejected_logps", ref_rejected_logps, B, dev)
    if check_finite:
        _check_finite(hidden=hidden, weight=weight, bias=bias, ref_chosen_logps=ref_chosen_logps,
                      ref_rejected_logps=ref_rejected_logps)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    resolved = L._resolve_impl(impl, dev)
    if grad_in_forward is None:
        grad_in_forward = needs_grad and resolved in ("torch", "cublas")
    if grad_in_forward and resolved not in ("torch", "cublas"):
        raise ValueError(f"grad_in_forward=True needs impl 'torch' or 'cublas', got {resolved!r}")
    ref_c = ref_chosen_logps.detach().float()
    ref_r = ref_rejected_logps.detach().float()
    dpo_kw = dict(beta=cfg.beta, loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing,
                  discopop_tau=cfg.discopop_tau)

    if grad_in_forward:
        n_idx, t_idx, targets = L._compact(labels, ignore_index, V)
        # per-row token counts on the host (a second, [N]-sized sync) to cut groups of pairs
        counts_t = torch.bincount(n_idx, minlength=N)
        counts = counts_t.tolist()
        chunk_bytes = L._chunk_budget(chunk_bytes, chunk_sizes)
        plan = L._plan(n_idx.numel(), V, chunk_bytes, chunk_sizes)
        group_tokens = (chunk_sizes[0] if chunk_sizes is not None
                        else max(1, chunk_bytes // (4 * V)))
        lengths = _lengths(cfg, counts_t, labels, ignore_index, length_count)
        total, dpo_part, losses, nll, logps = L._LinearPreferenceGradInForward.apply(
            hidden, weight, bias, ref_c, ref_r, n_idx, t_idx, targets, counts, lengths,
            float(temperature), resolved, plan, group_tokens, dpo_kw, rpo_alpha, softcap)
        if not rpo_alpha:
            dpo_part = total  # one tensor: its backward is the stored 3-GEMM gradient
        dpo = _dpo_output(dpo_part, losses, logps, ref_c, ref_r, cfg.beta)
        n_tok = counts_t
    else:
        logps, n_tok = L.linear_sequence_logprobs(
            hidden, weight, labels, bias=bias, ignore_index=ignore_index,
            temperature=temperature, impl=impl, chunk_bytes=chunk_bytes,
            chunk_sizes=chunk_sizes, logit_softcap=softcap)
        lengths = _lengths(cfg, n_tok, labels, ignore_index, length_count)
        lc, lr = (None, None) if lengths is None else (lengths[:B], lengths[B:])
        dpo = dpo_loss(logps[:B], logps[B:], ref_c, ref_r, chosen_lengths=lc,
                       rejected_lengths=lr, **dpo_kw)
        dpo.policy_chosen_logps, dpo.policy_rejected_logps = logps[:B], logps[B:]
        nll = -logps[:B].sum() / n_tok[:B].sum().clamp(min=1)
        total = dpo.loss + rpo_alpha * nll if rpo_alpha else dpo.loss
    return PreferenceLossOutput(loss=total, dpo=dpo, nll=nll,
                                policy_chosen_logps=dpo.policy_chosen_logps,
                                policy_rejected_logps=dpo.policy_rejected_logps,
                                chosen_tokens=n_tok[:B], rejected_tokens=n_tok[B:])


def _dpo_output(loss, losses, logps, ref_c, ref_r, beta):
    B = losses.shape[0]
    chosen_rewards = (beta * (logps[:B] - ref_c)).detach()
    rejected_rewards = (beta * (logps[B:] - ref_r)).detach()
    return DPOOutput(loss=loss, losses=losses, chosen_rewards=chosen_rewards,
                     rejected_rewards=rejected_rewards,
                     reward_margins=chosen_rewards - rejected_rewards,
                     reward_accuracy=(chosen_rewards > rejected_rewards).float().mean(),
                     policy_chosen_logps=logps[:B], policy_rejected_logps=logps[B:])


class PreferenceLoss(torch.nn.Module):
    """``nn.Module`` form of :func:`preference_loss`: every setting is validated here, when the
    module is built; ``forward(hidden, weight, labels, ref_chosen_logps, ref_rejected_logps,
    bias=None)`` returns a :class:`PreferenceLossOutput`."""

    def __init__(self, loss="sigmoid", beta=0.1, label_smoothing=0.0, *, discopop_tau=0.05,
                 rpo_alpha=0.0, ignore_index=-100, temperature=1.0, length_count="scored",
                 impl="auto", chunk_bytes=None, chunk_sizes=None, grad_in_forward=None,
                 check_finite=False, logit_softcap=None):
        super().__init__()
        self.config, self.rpo_alpha, self.length_count = _settings(
            loss, beta, label_smoothing, discopop_tau, rpo_alpha, length_count)
        if impl not in L.IMPLS:
            raise ValueError(f"impl must be one of {L.IMPLS}, got {impl!r}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
        check_temperature(temperature)
        self.logit_softcap = check_logit_softcap(logit_softcap)
        L._chunk_budget(chunk_bytes, chunk_sizes)
        if grad_in_forward not in (None, True, False):
            raise TypeError(f"grad_in_forward must be None, True or False, got "
                            f"{grad_in_forward!r}")
        self.ignore_index, self.temperature = ignore_index, float(temperature)
        self.impl, self.chunk_bytes, self.chunk_sizes = impl, chunk_bytes, chunk_sizes
        self.grad_in_forward, self.check_finite = grad_in_forward, bool(check_finite)

    # the settings under the names the older modules used
    loss_type = property(lambda self: self.config.loss_type)
    beta = property(lambda self: self.config.beta)
    label_smoothing = property(lambda self: self.config.label_smoothing)
    discopop_tau = property(lambda self: self.config.discopop_tau)

    def forward(self, hidden, weight, labels, ref_chosen_logps, ref_rejected_logps, bias=None):
        return preference_loss(
            hidden, weight, labels, ref_chosen_logps, ref_rejected_logps, loss=self.config,
            rpo_alpha=self.rpo_alpha, bias=bias, ignore_index=self.ignore_index,
            temperature=self.temperature, length_count=self.length_count, impl=self.impl,
            chunk_bytes=self.chunk_bytes, chunk_sizes=self.chunk_sizes,
            grad_in_forward=self.grad_in_forward, check_finite=self.check_finite,
            logit_softcap=self.logit_softcap)

    def extra_repr(self):
        c = self.config
        return (f"loss={c.loss_type!r}, beta={c.beta}, label_smoothing={c.label_smoothing}, "
                f"rpo_alpha={self.rpo_alpha}, temperature={self.temperature}"
                + (f", logit_softcap={self.logit_softcap}" if self.logit_softcap else ""))


class LinearDPOLoss(PreferenceLoss):
    """The DPO loss from hidden states without the RPO term (the older name):
    ``LinearDPOLoss(beta=0.1, loss_type="sigmoid", ...)``; ``forward`` returns the
    :class:`~bpo_fast.ops.dpo.DPOOutput` (``PreferenceLoss(...)(...).dpo``)."""

    def __init__(self, beta=0.1, loss_type="sigmoid", label_smoothing=0.0, **kwargs):
        super().__init__(loss_type, beta, label_smoothing, **kwargs)

    def forward(self, hidden, weight, labels, ref_chosen_logps, ref_rejected_logps, bias=None):
        return super().forward(hidden, weight, labels, ref_chosen_logps, ref_rejected_logps,
                               bias=bias).dpo

