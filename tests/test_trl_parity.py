"""TRL parity: preference_loss (what `bpo-fast train` runs) against TRL 1.16's
``DPOTrainer._compute_loss`` for every loss type, with and without the RPO term, loss and
gradients, fp32 on both CPU paths of the [B]-sized loss (torch reference, Triton interpreter).

The truth is float64: TRL's own ``_compute_loss`` (the real one when ``trl`` is importable,
called on a stub trainer with a stub fused-LM-head model that returns float64 per-token
log-probs of the same hidden states and LM head), else the same function transcribed below
from TRL 1.16.0's source (trl/trainer/dpo_trainer.py, ``_compute_loss``). TRL has no
``rpo_alpha``: its equivalent, checked here, is ``loss_type=[<type>, "sft"]``,
``loss_weights=[1, rpo_alpha]``. ``cdpo`` is not a TRL 1.16 type (it is what TRL 0.x computed
for ``sigmoid`` with label smoothing): it is checked against the transcription only.
Install the real one with ``pip install -r bench/requirements-trl.txt`` (no torch change).
"""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from bpo_fast.ops.losses import LOSS_TYPES, TRL_VERSION
from bpo_fast.ops.preference import preference_loss

try:
    import trl
    from trl.trainer.dpo_trainer import DPOTrainer

    HAVE_TRL = trl.__version__.startswith("1.16")
except Exception:  # not installed, or its dependencies are missing
    HAVE_TRL = False

BETA, TAU = 0.3, 0.05
EPS = {"robust": 0.2, "exo_pair": 1e-3, "cdpo": 0.1}


# ----------------------------------------------------------------------------------------------
# TRL 1.16.0 DPOTrainer._compute_loss, transcribed (reverse_kl, ld_alpha None, no weighting)
# ----------------------------------------------------------------------------------------------


def trl_116_written(loss_types, loss_weights, per_token_logps, completion_mask, ref_c, ref_r,
                    beta, label_smoothing, discopop_tau):
    shift_completion_mask = completion_mask[..., 1:]
    logps = per_token_logps.sum(dim=1)
    chosen_logps, rejected_logps = logps.chunk(2, dim=0)
    chosen_logratios = chosen_logps - ref_c
    rejected_logratios = rejected_logps - ref_r
    chosen_scores, rejected_scores = chosen_logratios, rejected_logratios
    delta_score = chosen_scores - rejected_scores
    e = label_smoothing
    loss = 0.0
    for loss_type, w in zip(loss_types, loss_weights):
        if loss_type == "sigmoid":
            per = -F.logsigmoid(beta * delta_score)
        elif loss_type == "cdpo":  # TRL 0.x "sigmoid" with label smoothing (not in 1.16)
            per = (-F.logsigmoid(beta * delta_score) * (1 - e)
                   - F.logsigmoid(-beta * delta_score) * e)
        elif loss_type == "hinge":
            per = torch.relu(1 - beta * delta_score)
        elif loss_type in ("ipo", "sigmoid_norm"):
            cm, rm = completion_mask.chunk(2, dim=0)
            d = (chosen_scores / cm.sum(1).clamp(min=1.0)
                 - rejected_scores / rm.sum(1).clamp(min=1.0))
            per = (d - 1 / (2 * beta)) ** 2 if loss_type == "ipo" else -F.logsigmoid(beta * d)
        elif loss_type == "exo_pair":
            z = beta * delta_score
            per = (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-e))
                   + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(e)))
        elif loss_type == "nca_pair":
            cr, rr = beta * chosen_logratios, beta * rejected_logratios
            per = -F.logsigmoid(cr) - 0.5 * F.logsigmoid(-cr) - 0.5 * F.logsigmoid(-rr)
        elif loss_type == "robust":
            clean = -(1 - e) * F.logsigmoid(beta * delta_score)
            flipped = -e * F.logsigmoid(-beta * delta_score)
            per = (clean - flipped) / (1 - 2 * e)
        elif loss_type == "bco_pair":
            per = (-F.logsigmoid(beta * chosen_logratios)
                   - F.logsigmoid(-beta * rejected_logratios))
        elif loss_type == "sppo_hard":
            per = (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
        elif loss_type == "apo_zero":
            per = (1 - torch.sigmoid(beta * chosen_logratios)) + torch.sigmoid(
                beta * rejected_logratios)
        elif loss_type == "apo_down":
            per = torch.sigmoid(beta * chosen_logratios) + (
                1 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios)))
        elif loss_type == "discopop":
            z = delta_score * beta
            m = torch.sigmoid(z / discopop_tau)
            per = -F.logsigmoid(z) * (1 - m) + torch.exp(-z) * m
        elif loss_type == "sft":
            chosen_mask, _ = shift_completion_mask.chunk(2, dim=0)
            chosen_ptl, _ = per_token_logps.chunk(2, dim=0)
            per = (-chosen_ptl[chosen_mask.bool()].mean()).expand(chosen_ptl.size(0))
        else:
            raise AssertionError(loss_type)
        loss = loss + per.mean() * w
    return loss


# ----------------------------------------------------------------------------------------------
# the real one: DPOTrainer._compute_loss on a stub trainer and a stub fused-LM-head model
# ----------------------------------------------------------------------------------------------


class _Acc:
    device = torch.device("cpu")

    @staticmethod
    def gather_for_metrics(x):
        return x

    gather = gather_for_metrics


def trl_116_real(loss_types, loss_weights, per_token_logps, completion_mask, ref_c, ref_r,
                 beta, label_smoothing, discopop_tau):
    stub = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_Acc(), aux_loss_enabled=False,
        ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=list(loss_types), loss_weights=list(loss_weights), beta=beta,
        label_smoothing=label_smoothing, args=SimpleNamespace(discopop_tau=discopop_tau),
        use_weighting=False, _metrics={"train": defaultdict(list)}, _total_train_tokens=0,
        _tp_size=1)

    def fused_model(**kw):  # what add_fused_lm_head's forward returns, from our float64 truth
        assert kw["fused_lm_head"] is True
        lp = per_token_logps
        return SimpleNamespace(log_probs=lp, entropy=torch.zeros_like(lp),
                               mean_logits=torch.zeros_like(lp),
                               is_top1=torch.zeros_like(lp, dtype=torch.bool))

    n = completion_mask.shape[0]
    inputs = {"input_ids": torch.zeros_like(completion_mask),
              "attention_mask": torch.ones_like(completion_mask),
              "completion_mask": completion_mask,
              "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    assert n % 2 == 0
    return DPOTrainer._compute_loss(stub, fused_model, inputs, False)


# ----------------------------------------------------------------------------------------------


def _inputs(seed, B=3, T=10, H=20, V=53):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.3
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[:, :3] = -100
    labels[B + 1, 7:] = -100          # a shorter rejected answer (right padding)
    labels[2, 0] = 7                  # position 0 a completion token: TRL counts it for ipo
    completion_mask = (labels != -100).long()
    return hidden, weight, labels, completion_mask


def _per_token64(hidden, weight, labels):
    """float64 per-token log-probs [2B, T-1] as TRL's fused head returns them (0 where the
    next label is -100)."""
    lsm = torch.log_softmax(hidden[:, :-1] @ weight.t(), -1)
    nxt = labels[:, 1:]
    return lsm.gather(-1, nxt.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (nxt != -100)


@pytest.mark.parametrize("rpo_alpha", [0.0, 0.5])
@pytest.mark.parametrize("lt", LOSS_TYPES)
def test_preference_loss_equals_trl_116(lt, rpo_alpha, loss_path):
    real = HAVE_TRL and lt != "cdpo"
    trl_fn = trl_116_real if real else trl_116_written
    hidden, weight, labels, cm = _inputs(seed=LOSS_TYPES.index(lt))
    B = hidden.shape[0] // 2
    with torch.no_grad():  # references near the policy: every loss type in its useful range
        lp = _per_token64(hidden.double(), weight.double(), labels).sum(1)
    g = torch.Generator().manual_seed(99)
    ref_c = (lp[:B] + torch.randn(B, generator=g, dtype=torch.float64) * 3).float()
    ref_r = (lp[B:] + torch.randn(B, generator=g, dtype=torch.float64) * 3).float()

    p64 = [hidden.double().requires_grad_(True), weight.double().requires_grad_(True)]
    types, weights = [lt], [1.0]
    if rpo_alpha:
        types, weights = [lt, "sft"], [1.0, rpo_alpha]
    want = trl_fn(types, weights, _per_token64(p64[0], p64[1], labels), cm, ref_c.double(),
                  ref_r.double(), BETA, EPS.get(lt, 0.0), TAU)
    g_want = torch.autograd.grad(want, p64)

    p32 = [hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)]
    out = preference_loss(*p32, labels, ref_c, ref_r, loss=lt, beta=BETA,
                          label_smoothing=EPS.get(lt, 0.0), discopop_tau=TAU,
                          rpo_alpha=rpo_alpha, length_count="completion", impl="torch",
                          chunk_sizes=(8, 64))
    g_ours = torch.autograd.grad(out.loss, p32)
    torch.testing.assert_close(out.loss.double(), want.detach(), rtol=2e-5, atol=2e-5)
    for a, b in zip(g_ours, g_want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=2e-5)


def test_trl_version_named():
    assert TRL_VERSION == "1.16.0"
    if HAVE_TRL:  # the transcription is the real thing, on the same inputs
        hidden, weight, labels, cm = _inputs(seed=5)
        pt = _per_token64(hidden.double(), weight.double(), labels)
        rc, rr = pt.sum(1)[:3] + 1.0, pt.sum(1)[3:] - 2.0
        for lt in [t for t in LOSS_TYPES if t != "cdpo"]:
            args = ([lt, "sft"], [1.0, 0.3], pt, cm, rc, rr, BETA, EPS.get(lt, 0.0), TAU)
            torch.testing.assert_close(trl_116_written(*args), trl_116_real(*args))
