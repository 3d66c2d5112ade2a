"""The gradient of each term of the training loss, measured apart (``log_term_grads``).

The optimised loss is ``dpo_loss + rpo_alpha * nll`` (:func:`bpo_fast.ops.preference.
preference_loss`); one backward gives only their sum. To tell how much of an update comes from
the preference term and how much from the RPO term, :class:`TermGradients` runs one more
backward per micro-batch for the DPO term alone (the graph is kept for the full backward that
follows) and sums it over the micro-batches of the step. Before the gradient is clipped, the
full gradient minus that sum is the RPO term's (the loss is linear in its terms), so the step
logs:

- ``grad_norm_dpo``: the L2 norm of the DPO term's gradient over the trainable parameters,
- ``grad_norm_rpo``: the RPO term's (``rpo_alpha`` times the chosen NLL's gradient; 0 without
  RPO),
- ``grad_cos_dpo_rpo``: the cosine between the two (None when either is 0): near 1, the
  preference term pushes where the NLL term already does.

It costs one more backward pass per micro-batch, so it is off unless asked for; it runs in one
process only (FSDP2's sharded gradients reduce in the backward hooks, which a second backward
would run again).
"""

import math

import torch

__all__ = ["TermGradients", "TERM_KEYS"]

TERM_KEYS = ("grad_norm_dpo", "grad_norm_rpo", "grad_cos_dpo_rpo")


class TermGradients:
    """The DPO term's gradient, summed over a step's micro-batches (see the module doc)."""

    def __init__(self, params, rpo=True):
        self.params = list(params)
        self.rpo = bool(rpo)   # False: the loss has no RPO term, its gradient is 0
        self.dpo = None

    def reset(self):
        self.dpo = None

    def add(self, out, scale):
        """Before the full backward of a micro-batch: the gradient of ``scale * out.dpo.loss``
        (``out``: a :class:`~bpo_fast.models.preference.PreferenceOutput`; ``scale``: the
        micro-batch's share, ``1 / grad_accum``), added to the step's sum. Without an RPO term
        the full gradient is the DPO term's: no extra backward."""
        if not self.rpo:
            return
        grads = torch.autograd.grad(out.dpo.loss * scale, self.params, retain_graph=True,
                                    allow_unused=True)
        if self.dpo is None:
            self.dpo = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        for acc, g in zip(self.dpo, grads):
            if g is not None:
                acc.add_(g.float())

    def norms(self):
        """The step's term norms, from the parameters' full gradients (call it before they are
        clipped); resets the sum."""
        d2 = r2 = dot = 0.0
        if not self.rpo:
            sq = [p.grad.float().pow(2).sum() for p in self.params if p.grad is not None]
            d2 = float(torch.stack(sq).double().sum()) if sq else 0.0
        elif self.dpo is not None:
            sq = torch.zeros(3, dtype=torch.float64, device=self.dpo[0].device)
            for p, g_d in zip(self.params, self.dpo):
                g_r = (p.grad.float() - g_d) if p.grad is not None else -g_d
                sq += torch.stack([g_d.pow(2).sum(), g_r.pow(2).sum(), (g_d * g_r).sum()]).double()
            d2, r2, dot = sq.tolist()  # one copy to the host
        self.reset()
        nd, nr = math.sqrt(max(d2, 0.0)), math.sqrt(max(r2, 0.0))
        return {"grad_norm_dpo": nd, "grad_norm_rpo": nr,
                "grad_cos_dpo_rpo": dot / (nd * nr) if nd > 0 and nr > 0 else None}
