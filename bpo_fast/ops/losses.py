"""The preference-loss registry: one entry per loss type, and everything else derives from it.

An entry (:class:`LossSpec`) holds the loss type's name, its id in the Triton pair kernel
(``kernels/dpo.py``: the named constants at its top; ``tests/test_losses.py`` checks they
agree), its reference formula (the plain-PyTorch twin every fast path must match), whether it
divides by token counts, the hyper-parameters it reads, its formula as text and its doc line.
:data:`LOSS_TYPES`, :data:`LENGTH_NORMALISED`, the CLI's ``--loss-type`` choices, the table in
:func:`docs_table` (and ``docs/losses.md``, generated from it), and all validation
(:func:`loss_config`) come from :data:`REGISTRY`.

Adding a loss type = one :class:`LossSpec` here + its branch in the pair kernel (the loss and
its closed-form derivatives w.r.t. the chosen and rejected log-ratios).

Notation per pair: ``c = policy_chosen - ref_chosen``, ``r = policy_rejected - ref_rejected``
(log-ratios), ``d = c - r``, ``b = beta``, ``e = label_smoothing``, ``s = sigmoid``,
``ls = logsigmoid``; ``lc``/``lr``: the chosen/rejected token counts clamped to >= 1.

Decisions (TRL 1.16 ``DPOTrainer._compute_loss`` is the spec, read from its source):

- ``sigmoid`` is TRL's: it does not read ``label_smoothing`` (TRL 1.16 ignores it there; older
  TRL and this package used to compute conservative DPO). ``sigmoid`` with
  ``label_smoothing > 0`` is refused; conservative DPO (cDPO, Mitchell 2023) is its own entry,
  ``cdpo``. In general a parameter a loss type does not read must stay at its default.
- The RPO term is not a loss type: it is ``rpo_alpha`` of
  :func:`bpo_fast.ops.preference.preference_loss` (TRL 1.16 has no ``rpo_alpha``; its
  equivalent is ``loss_type=["sigmoid", "sft"]``, ``loss_weights=[1, rpo_alpha]``).
- ``discopop``: ``exp(-z) * m`` is evaluated as ``exp(ls(z / tau) - z)``: the same number, but
  finite where TRL's literal product is ``inf * 0 = NaN`` (fp32, z below about -88).
- TRL loss types not here: ``aot`` and ``aot_unpaired`` sort the log-ratios across the batch, so
  one pair's loss (and gradient) depends on every other pair's log-probs: that breaks the
  per-pair contract of the pair kernel and of the 3-GEMM LM-head path (which forms a group of
  pairs' gradients before the next group's log-probs exist). ``sft`` is ``rpo_alpha``.
  TRL's ``f_divergence_type``, ``ld_alpha`` and ``use_weighting`` (WPO) are not supported.
"""

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

TRL_VERSION = "1.16.0"  # the TRL release whose DPOTrainer._compute_loss the formulas follow


# ----------------------------------------------------------------------------------------------
# hyper-parameters
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """A hyper-parameter a loss type may read: its default and valid range ``[lo, hi]`` (``hi``
    open when ``hi_open``). The ranges keep every term of every formula finite in float32 (e.g.
    ``1 / (2 beta)`` squared in ``ipo``, ``beta * d`` in ``hinge``)."""

    name: str
    default: float
    lo: float
    hi: float
    hi_open: bool = False
    doc: str = ""

    def range_text(self):
        return f"[{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"


BETA = Param("beta", 0.1, 1e-6, 1e6, doc="strength of the KL regularisation (IPO's tau)")
LABEL_SMOOTHING = Param("label_smoothing", 0.0, 0.0, 0.5, hi_open=True,
                        doc="probability that a preference label is flipped")
DISCOPOP_TAU = Param("discopop_tau", 0.05, 1e-3, 1e3, doc="DiscoPOP's modulation temperature")
PARAMS = {p.name: p for p in (BETA, LABEL_SMOOTHING, DISCOPOP_TAU)}


# ----------------------------------------------------------------------------------------------
# the registry
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossSpec:
    """One loss type. ``reference(c, r, lc, lr, p)`` returns the per-pair losses (autograd-
    friendly, any float dtype); ``p`` is the :class:`LossConfig`. ``kernel_id``: the loss
    constant of ``kernels/dpo.py`` whose branch computes it (``cdpo`` shares ``SIGMOID``'s, which
    reads ``label_smoothing``). ``params``: the hyper-parameters it reads (``beta`` always).
    ``min_label_smoothing``: a lower bound above 0 when the formula needs one (exo_pair takes
    ``log(label_smoothing)``)."""

    name: str
    kernel_id: int
    reference: Callable
    formula: str
    doc: str
    params: Tuple[str, ...] = ("beta",)
    needs_lengths: bool = False
    min_label_smoothing: float = 0.0
    trl: Optional[str] = None  # the TRL 1.16 loss_type computing the same thing


# kernel ids: the named constants at the top of kernels/dpo.py (not imported: the registry must
# load without Triton; tests/test_losses.py asserts they are equal)
(_SIGMOID, _ROBUST, _HINGE, _IPO, _EXO_PAIR, _NCA_PAIR, _BCO_PAIR, _SPPO_HARD, _APO_ZERO,
 _APO_DOWN, _DISCOPOP, _SIGMOID_NORM) = range(12)
KERNEL_CONSTANTS = {"SIGMOID": _SIGMOID, "ROBUST": _ROBUST, "HINGE": _HINGE, "IPO": _IPO,
                    "EXO_PAIR": _EXO_PAIR, "NCA_PAIR": _NCA_PAIR, "BCO_PAIR": _BCO_PAIR,
                    "SPPO_HARD": _SPPO_HARD, "APO_ZERO": _APO_ZERO, "APO_DOWN": _APO_DOWN,
                    "DISCOPOP": _DISCOPOP, "SIGMOID_NORM": _SIGMOID_NORM}

ls, sg = F.logsigmoid, torch.sigmoid


def _sigmoid(c, r, lc, lr, p):
    return -ls(p.beta * (c - r))


def _cdpo(c, r, lc, lr, p):
    z, e = p.beta * (c - r), p.label_smoothing
    return -(1 - e) * ls(z) - e * ls(-z)


def _robust(c, r, lc, lr, p):
    z, e = p.beta * (c - r), p.label_smoothing
    return (-(1 - e) * ls(z) + e * ls(-z)) / (1 - 2 * e)


def _hinge(c, r, lc, lr, p):
    return torch.relu(1 - p.beta * (c - r))


def _ipo(c, r, lc, lr, p):
    return (c / lc - r / lr - 1 / (2 * p.beta)) ** 2


def _exo_pair(c, r, lc, lr, p):
    z, e = p.beta * (c - r), p.label_smoothing
    return sg(z) * (ls(z) - math.log1p(-e)) + sg(-z) * (ls(-z) - math.log(e))


def _nca_pair(c, r, lc, lr, p):
    b = p.beta
    return -ls(b * c) - 0.5 * ls(-b * c) - 0.5 * ls(-b * r)


def _bco_pair(c, r, lc, lr, p):
    return -ls(p.beta * c) - ls(-p.beta * r)


def _sppo_hard(c, r, lc, lr, p):
    return (c - 0.5 / p.beta) ** 2 + (r + 0.5 / p.beta) ** 2


def _apo_zero(c, r, lc, lr, p):
    return (1 - sg(p.beta * c)) + sg(p.beta * r)


def _apo_down(c, r, lc, lr, p):
    return sg(p.beta * c) + (1 - sg(p.beta * (c - r)))


def _discopop(c, r, lc, lr, p):
    z, tau = p.beta * (c - r), p.discopop_tau
    # exp(-z) * sigmoid(z / tau) as exp(ls(z / tau) - z): no inf * 0 for very negative z
    return -ls(z) * (1 - sg(z / tau)) + torch.exp(ls(z / tau) - z)


def _sigmoid_norm(c, r, lc, lr, p):
    return -ls(p.beta * (c / lc - r / lr))


_SPECS = (
    LossSpec("sigmoid", _SIGMOID, _sigmoid, "-ls(b d)",
             "DPO (Rafailov et al. 2023)", trl="sigmoid"),
    LossSpec("cdpo", _SIGMOID, _cdpo, "-(1 - e) ls(b d) - e ls(-b d)",
             "conservative DPO (Mitchell 2023): TRL 0.x 'sigmoid' with label_smoothing > 0",
             params=("beta", "label_smoothing")),
    LossSpec("robust", _ROBUST, _robust, "(-(1 - e) ls(b d) + e ls(-b d)) / (1 - 2 e)",
             "robust DPO, unbiased under label noise e (Chowdhury et al. 2024)",
             params=("beta", "label_smoothing"), trl="robust"),
    LossSpec("hinge", _HINGE, _hinge, "relu(1 - b d)", "SLiC hinge loss", trl="hinge"),
    LossSpec("ipo", _IPO, _ipo, "(c / lc - r / lr - 1 / (2 b)) ** 2",
             "IPO (Azar et al. 2023), per-token log-ratios as TRL", needs_lengths=True,
             trl="ipo"),
    LossSpec("exo_pair", _EXO_PAIR, _exo_pair,
             "s(b d) (ls(b d) - log(1 - e)) + s(-b d) (ls(-b d) - log e)",
             "EXO pairwise (Ji et al. 2024); needs label_smoothing > 0 (paper: 1e-3)",
             params=("beta", "label_smoothing"), min_label_smoothing=1e-6, trl="exo_pair"),
    LossSpec("nca_pair", _NCA_PAIR, _nca_pair, "-ls(b c) - ls(-b c) / 2 - ls(-b r) / 2",
             "NCA pairwise (Chen et al. 2024)", trl="nca_pair"),
    LossSpec("bco_pair", _BCO_PAIR, _bco_pair, "-ls(b c) - ls(-b r)",
             "BCO pairwise, without the running reward shift", trl="bco_pair"),
    LossSpec("sppo_hard", _SPPO_HARD, _sppo_hard, "(c - 1 / (2 b)) ** 2 + (r + 1 / (2 b)) ** 2",
             "SPPO with hard win probabilities", trl="sppo_hard"),
    LossSpec("apo_zero", _APO_ZERO, _apo_zero, "1 - s(b c) + s(b r)",
             "APO-zero: chosen up, rejected down", trl="apo_zero"),
    LossSpec("apo_down", _APO_DOWN, _apo_down, "s(b c) + 1 - s(b d)",
             "APO-down: both down, rejected more", trl="apo_down"),
    LossSpec("discopop", _DISCOPOP, _discopop,
             "z = b d, m = s(z / tau): -ls(z) (1 - m) + exp(-z) m",
             "DiscoPOP log-ratio modulated loss (finite where TRL's fp32 form is NaN)",
             params=("beta", "discopop_tau"), trl="discopop"),
    LossSpec("sigmoid_norm", _SIGMOID_NORM, _sigmoid_norm, "-ls(b (c / lc - r / lr))",
             "DPO on per-token log-ratios", needs_lengths=True, trl="sigmoid_norm"),
)

REGISTRY = {s.name: s for s in _SPECS}
LOSS_TYPES = tuple(REGISTRY)
LENGTH_NORMALISED = tuple(s.name for s in _SPECS if s.needs_lengths)
# TRL 1.16 loss types with no entry here, and why (docs_table prints them)
TRL_NOT_SUPPORTED = {
    "aot": "sorts the log-ratios across the batch: a pair's loss depends on every other pair, "
           "which the per-pair kernel and the 3-GEMM LM-head path cannot do",
    "aot_unpaired": "the same (sorts chosen and rejected log-ratios separately)",
    "sft": "not a preference loss: use rpo_alpha (loss_type=['sigmoid', 'sft'] with "
           "loss_weights=[1, rpo_alpha] in TRL)",
}
# how the token counts of ipo / sigmoid_norm are taken: "scored" = labels[:, 1:] != ignore_index
# (the tokens whose log-probs are summed), "completion" = labels != ignore_index (TRL 1.16:
# completion_mask.sum(1), which also counts position 0 though nothing scores it). They differ
# only when position 0 is a completion token.
LENGTH_COUNTS = ("scored", "completion")


# ----------------------------------------------------------------------------------------------
# validation: once, when a config / op / module is built
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossConfig:
    """A validated loss configuration (built by :func:`loss_config`)."""

    loss_type: str
    beta: float
    label_smoothing: float = 0.0
    discopop_tau: float = 0.05
    spec: LossSpec = field(default=None, repr=False, compare=False)

    @property
    def kernel_id(self):
        return self.spec.kernel_id

    @property
    def needs_lengths(self):
        return self.spec.needs_lengths

    def as_tuple(self):
        return self.loss_type, self.beta, self.label_smoothing, self.discopop_tau

    def losses(self, c, r, lc=None, lr=None):
        """The reference per-pair losses from the log-ratios (``lc``/``lr``: token counts, only
        read by length-normalised types; clamped to >= 1 here)."""
        if self.spec.needs_lengths:
            lc, lr = lc.to(c.dtype).clamp(min=1.0), lr.to(c.dtype).clamp(min=1.0)
        return self.spec.reference(c, r, lc, lr, self)


def _number(name, x):
    if isinstance(x, torch.Tensor) and x.numel() == 1 and not x.requires_grad:
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a number, got {x!r}")
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x!r}")
    return x


def check_param(name, value):
    """``value`` as a float within :data:`PARAMS` ``[name]``'s range, else ValueError/TypeError
    naming it."""
    p = PARAMS[name]
    v = _number(name, value)
    if not (p.lo <= v and (v < p.hi if p.hi_open else v <= p.hi)):
        raise ValueError(f"{name} must be in {p.range_text()} ({p.doc}), got {value!r}")
    return v


def loss_config(loss_type="sigmoid", beta=0.1, label_smoothing=0.0, discopop_tau=0.05):
    """Validate a loss configuration against the registry; return a :class:`LossConfig`.

    ``loss_type`` in :data:`LOSS_TYPES`; every parameter in its range (:data:`PARAMS`); a
    parameter the loss type does not read must be at its default (``sigmoid`` with
    ``label_smoothing`` > 0 is refused: TRL 1.16 ignores it, ``cdpo`` is conservative DPO).
    Raises ``ValueError``/``TypeError`` naming the argument.
    """
    if isinstance(loss_type, LossConfig):
        return loss_type
    if not isinstance(loss_type, str) or loss_type not in REGISTRY:
        raise ValueError(f"loss_type must be one of {list(LOSS_TYPES)}, got {loss_type!r}")
    spec = REGISTRY[loss_type]
    vals = {"beta": beta, "label_smoothing": label_smoothing, "discopop_tau": discopop_tau}
    out = {}
    for name, v in vals.items():
        v = check_param(name, v)
        if name not in spec.params and v != PARAMS[name].default:
            hint = (" (TRL 1.16 ignores it for sigmoid; loss_type='cdpo' is conservative DPO)"
                    if loss_type == "sigmoid" and name == "label_smoothing" else "")
            raise ValueError(f"{name} is not read by loss_type={loss_type!r}: leave it at "
                             f"{PARAMS[name].default:g}, got {v:g}{hint}")
        out[name] = v
    if "label_smoothing" in spec.params and out["label_smoothing"] < spec.min_label_smoothing:
        raise ValueError(f"label_smoothing must be >= {spec.min_label_smoothing:g} for "
                         f"loss_type={loss_type!r} (its formula takes log(label_smoothing); the "
                         f"EXO paper recommends 1e-3), got {out['label_smoothing']:g}")
    return LossConfig(loss_type, out["beta"], out["label_smoothing"], out["discopop_tau"],
                      spec=spec)


def check_rpo_alpha(rpo_alpha):
    """``rpo_alpha`` as a float in ``[0, 1e6]`` (``None`` is 0)."""
    if rpo_alpha is None:
        return 0.0
    v = _number("rpo_alpha", rpo_alpha)
    if not 0.0 <= v <= 1e6:
        raise ValueError(f"rpo_alpha must be in [0, 1e6] (the weight of the chosen answers' "
                         f"NLL), got {rpo_alpha!r}")
    return v


def _finite_positive(x):
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def check_temperature(temperature):
    """``temperature``: a finite number > 0 (the logits are divided by it), else ValueError."""
    if not _finite_positive(temperature):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return temperature


def check_logit_softcap(logit_softcap):
    """``logit_softcap``: ``None`` (no cap) or a finite number > 0 (the LM head's logits become
    ``logit_softcap * tanh(z / logit_softcap)``, Gemma 2's ``final_logit_softcapping``);
    returned as a float (or None), else ValueError naming it."""
    if logit_softcap is None:
        return None
    if not _finite_positive(logit_softcap):
        raise ValueError(f"logit_softcap must be None or a finite number > 0 (the LM head's "
                         f"logits are capped to logit_softcap * tanh(z / logit_softcap)), got "
                         f"{logit_softcap!r}")
    return float(logit_softcap)


def check_length_count(length_count):
    if length_count not in LENGTH_COUNTS:
        raise ValueError(f"length_count must be one of {list(LENGTH_COUNTS)}, got "
                         f"{length_count!r}")
    return length_count


def check_finite(**tensors):
    """Raise ``ValueError`` naming the first floating input that holds NaN or inf (one host
    sync per tensor; the ops call it only with ``check_finite=True``)."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.dtype.is_floating_point and t.numel():
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} holds NaN or inf")


# ----------------------------------------------------------------------------------------------
# docs
# ----------------------------------------------------------------------------------------------


def docs_table():
    """The loss-type table in Markdown (``docs/losses.md`` is this, see :func:`docs_page`)."""
    rows = ["| loss_type | per-pair loss | reads | token counts | TRL 1.16 | what |",
            "|---|---|---|---|---|---|"]
    for s in _SPECS:
        reads = ", ".join(f"`{p}` {PARAMS[p].range_text()}" for p in s.params)
        if s.min_label_smoothing:
            reads += f" (label_smoothing >= {s.min_label_smoothing:g})"
        rows.append(f"| `{s.name}` | `{s.formula}` | {reads} | "
                    f"{'yes' if s.needs_lengths else 'no'} | "
                    f"{'`' + s.trl + '`' if s.trl else '-'} | {s.doc} |")
    return "\n".join(rows)


def docs_page():
    """The whole of ``docs/losses.md`` (generated: ``python -m bpo_fast.ops.losses``)."""
    out = ["# Preference loss types", "",
           "Generated from `bpo_fast/ops/losses.py` (`python -m bpo_fast.ops.losses > "
           "docs/losses.md`); a test checks the two agree.", "",
           "Per pair: `c = policy_chosen - ref_chosen`, `r = policy_rejected - ref_rejected` "
           "(summed log-probs), `d = c - r`, `b = beta`, `e = label_smoothing`, `s` = sigmoid, "
           "`ls` = logsigmoid, `lc`/`lr` = the chosen/rejected token counts clamped to >= 1. "
           "`loss` is the mean over pairs; rewards are `b c` and `b r`.", "",
           docs_table(), "",
           f"Formulas follow TRL {TRL_VERSION} `DPOTrainer._compute_loss`. "
           "A parameter a loss type does not read must stay at its default: `sigmoid` with "
           "`label_smoothing > 0` is refused (TRL 1.16 silently ignores it there); conservative "
           "DPO is `cdpo`.", "",
           "**RPO** (`rpo_alpha`): the loss becomes `loss + rpo_alpha * nll`, `nll` = the mean "
           "negative log-prob over all chosen answer tokens of the batch (token-level mean, "
           "as TRL 1.16's `sft` loss term: TRL has no `rpo_alpha`; its equivalent is "
           "`loss_type=[\"sigmoid\", \"sft\"]`, `loss_weights=[1, rpo_alpha]`).", "",
           "**Token counts** (`ipo`, `sigmoid_norm`): `length_count=\"scored\"` (default) counts "
           "the tokens whose log-probs are summed, `labels[:, 1:] != ignore_index`; "
           "`length_count=\"completion\"` counts `labels != ignore_index` as TRL 1.16 does "
           "(`completion_mask.sum(1)`). They differ only when position 0 is a completion "
           "token.", "",
           "TRL 1.16 loss types not supported:", ""]
    out += [f"- `{k}`: {v}" for k, v in TRL_NOT_SUPPORTED.items()]
    out += ["- TRL's `f_divergence_type`, `ld_alpha` and `use_weighting` (WPO) options are not "
            "supported either.", ""]
    return "\n".join(out)


if __name__ == "__main__":  # pragma: no cover
    print(docs_page(), end="")
