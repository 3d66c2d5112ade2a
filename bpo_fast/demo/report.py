"""The report of a BPO run: PNG plots, a Markdown summary and a plain-text table.

Inputs
------
- Training metrics: the trainer's ``metrics.jsonl``, one JSON object a line with the keys in
  :data:`METRIC_KEYS` (``step``, ``loss``, ``nll``, rewards, margins, accuracy, gradient norms,
  ``lr``; others are kept and ignored). TRL's names (``rewards/chosen``, ``rewards/rejected``,
  ``rewards/margins``, ``rewards/accuracies``, ``learning_rate``) are accepted too. Where a
  line has ``dpo_loss`` (the trainer's DPO part of an objective with an extra term, e.g. RPO),
  that is the loss reported. A step logged twice (a resumed run) keeps its last line.
- CHAIR results of up to four arms: the SFT start (``chair_before``), BPO (``chair_after``),
  BPO with the paper's objective (``chair_paper``, optional) and the supervised-only control
  (``chair_control``, optional): :class:`bpo_fast.eval.chair.ChairResult`\\ s or dicts with
  ``chair_i``, ``chair_s``, ``recall`` (fractions in [0, 1] or None).
- POPE results (optional): ``{"before"|"after"|"paper"|"control": {seed: PopeResult or its
  dict}}``.

Each input is either one run or a dict ``{seed: run}`` for several seeds; the arms are paired
by seed.

API
---
- :func:`write_report(out_dir, *, metrics, chair_before, chair_after, chair_paper=None,
  chair_control=None, pope=None, paper_metrics=None, objectives=None, settings=None,
  seeds_text=None, stage_times=None, examples=None, notes=None, quick=False, title=...) ->
  dict` writes ``training.png`` (per arm: DPO loss, chosen NLL, each term's gradient norm,
  implicit reward margins in nats, reward accuracy), ``chair.png`` (CHAIR-i, CHAIR-s and
  recall of every arm, one line per seed, the mean with its bootstrap 95% CI), ``pope.png``
  (when POPE results are given), ``report.md`` and ``summary.json``; returns their paths, the
  text table (``"table"``) and the numbers (``"summary"``).
- :func:`format_table`, :func:`load_metrics`, :func:`plot_training`, :func:`plot_chair`,
  :func:`plot_pope`, :func:`summarize`, :func:`headline`.

The Markdown says what the numbers say: the summary, the conditions and every sentence are
chosen by comparing the numbers (BPO against the SFT start, the control and the paper's
objective, per seed and as the mean paired difference with its bootstrap 95% CI, recall cost
against ``recall_tolerance``), never written in advance. A seed counts as a win only when the
values differ as the table prints them (one decimal of a percent): a tie on the page is a tie.
"""

import json
import math
import os

from bpo_fast.eval.stats import ci_excludes_zero, mean_ci, paired_differences

__all__ = ["METRIC_KEYS", "METRIC_ALIASES", "load_metrics", "plot_training", "plot_chair",
           "plot_pope", "format_table", "summarize", "headline", "write_report", "compare_table",
           "readme_section", "update_readme", "main", "QUICK_NOTE"]

# The keys the report reads from each metrics line (the trainer writes these names).
METRIC_KEYS = ("step", "loss", "nll", "reward_chosen", "reward_rejected", "reward_margin",
               "reward_accuracy", "logratio_margin", "logratio_margin_per_token", "grad_norm",
               "grad_norm_dpo", "grad_norm_rpo", "grad_cos_dpo_rpo", "lr")
METRIC_ALIASES = {
    "rewards/chosen": "reward_chosen", "rewards/rejected": "reward_rejected",
    "rewards/margins": "reward_margin", "rewards/accuracies": "reward_accuracy",
    "rewards/accuracy": "reward_accuracy", "learning_rate": "lr", "global_step": "step",
}
CHAIR_KEYS = ("chair_i", "chair_s", "recall")
_CHAIR_LABELS = {"chair_i": "CHAIR-i", "chair_s": "CHAIR-s", "recall": "recall"}
LOWER_IS_BETTER = {"chair_i": True, "chair_s": True, "recall": False}
ARMS = ("before", "after", "paper", "control")
ARM_LABELS = {"before": "SFT start", "after": "BPO", "paper": "BPO, paper's loss",
              "control": "control"}
_SHORT = {"before": "SFT", "after": "BPO", "paper": "paper", "control": "control"}
# the paired differences the report shows: (key, arm, minus arm)
DIFFS = (("bpo_vs_sft", "after", "before"), ("bpo_vs_control", "after", "control"),
         ("paper_vs_control", "paper", "control"), ("bpo_vs_paper", "after", "paper"))
# POPE numbers the report shows: (name, setting/split, score, higher is better)
POPE_KEYS = (("prior accuracy", "settings", "prior", "accuracy"),
             ("prior F1", "settings", "prior", "f1"),
             ("random accuracy", "settings", "random", "accuracy"),
             ("prior yes-ratio", "settings", "prior", "yes_ratio"))
LN2 = math.log(2.0)
_ONE_RUN = "run"   # the key of a single run given without a seed (shown as "-")
QUICK_NOTE = ("a `--quick` run: it only checks that the pipeline runs, its numbers mean "
              "nothing")


def _shown(x):
    """A fraction as the tables print it: percent, one decimal. Wins and ties are counted on
    these values (:func:`bpo_fast.eval.stats.paired_differences` ``shown=``)."""
    return round(100 * x, 1)


# --------------------------------------------------------------------------- inputs


def load_metrics(path):
    """Rows of a metrics JSONL, aliases renamed, sorted by step (the last line of a step wins)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"metrics: no such file {path!r}")
    rows = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: invalid JSON: {exc.msg}") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
            rec = _rename(rec)
            if not isinstance(rec.get("step"), (int, float)) or isinstance(rec.get("step"), bool):
                raise ValueError(f"{path}:{n}: expected a numeric 'step'")
            rows[rec["step"]] = rec
    return [rows[s] for s in sorted(rows)]


def _rename(rec):
    rec = {METRIC_ALIASES.get(k, k): v for k, v in rec.items()}
    # the report is about the DPO loss: the trainer logs it apart from the optimised total
    # when an extra term (RPO's chosen NLL) is added
    if "dpo_loss" in rec:
        rec["loss"] = rec.pop("dpo_loss")
    return rec


def _as_runs(x, what):
    """``{label: value}`` from one run or a ``{seed: run}`` dict."""
    if x is None:
        return {}
    if isinstance(x, dict) and x and all(isinstance(v, (dict, list, str, os.PathLike))
                                         or hasattr(v, "scores") for v in x.values()) \
            and not any(k in x for k in CHAIR_KEYS):
        return {str(k): v for k, v in x.items()}
    return {_ONE_RUN: x}


def _metrics_rows(run):
    if isinstance(run, (str, os.PathLike)):
        return load_metrics(os.fspath(run))
    if isinstance(run, list):
        if not all(isinstance(r, dict) for r in run):
            raise TypeError("metrics: expected a list of dicts (one per logged step)")
        rows = {}
        for r in run:
            r = _rename(r)
            if "step" not in r:
                raise ValueError("metrics: every row needs a 'step'")
            rows[r["step"]] = r
        return [rows[s] for s in sorted(rows)]
    raise TypeError(f"metrics: expected a path or a list of dicts, got {type(run).__name__}")


def _chair_scores(x, what):
    if hasattr(x, "scores"):
        x = x.scores()
    if not isinstance(x, dict) or not all(k in x for k in CHAIR_KEYS):
        raise TypeError(f"{what}: expected a ChairResult or a dict with {list(CHAIR_KEYS)}")
    out = {}
    for k in CHAIR_KEYS:
        v = x[k]
        if v is not None and (not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise ValueError(f"{what}[{k!r}]: expected a finite number or None, got {v!r}")
        out[k] = None if v is None else float(v)
    return out


def _paired(chair_before, chair_after, chair_control=None, chair_paper=None):
    """``{arm: {seed: scores}}`` for the arms given (``paper``/``control`` only when given)."""
    arms = {"before": chair_before, "after": chair_after}
    if chair_paper is not None:
        arms["paper"] = chair_paper
    if chair_control is not None:
        arms["control"] = chair_control
    out = {a: {k: _chair_scores(v, f"chair_{a}[{k}]") for k, v in _as_runs(x, a).items()}
           for a, x in arms.items()}
    seeds = set(out["before"])
    if not seeds or any(set(v) != seeds for v in out.values()):
        raise ValueError("/".join(f"chair_{a}" for a in out)
                         + f": expected results for the same seeds, got "
                         f"{' and '.join(str(sorted(v)) for v in out.values())}")
    return out


def _pope_values(pope):
    """``{name: {arm: {seed: value}}}`` from ``{arm: {seed: PopeResult or dict}}``."""
    if pope is None:
        return {}
    if not isinstance(pope, dict) or not pope or not set(pope) <= set(ARMS):
        raise TypeError(f"pope: expected a dict with some of {list(ARMS)} -> {{seed: POPE result}}")
    out = {}
    for arm in [a for a in ARMS if a in pope]:
        runs = pope[arm]
        if isinstance(runs, dict) and "settings" not in runs:
            runs = {str(k): v for k, v in runs.items()}           # {seed: result}
        else:
            runs = {_ONE_RUN: runs}
        for seed, res in runs.items():
            d = res.to_dict(details=False) if hasattr(res, "to_dict") else res
            if not isinstance(d, dict) or "settings" not in d:
                raise TypeError(f"pope[{arm!r}][{seed}]: expected a PopeResult or its dict "
                                f"(with 'settings')")
            for name, part, key, score in POPE_KEYS:
                v = d[part].get(key, {}).get(score) if isinstance(d[part], dict) else None
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                      or not math.isfinite(v)):
                    raise ValueError(f"pope[{arm!r}][{seed}]: {name}: expected a finite number "
                                     f"or None, got {v!r}")
                out.setdefault(name, {}).setdefault(arm, {})[seed] = v
    return out


# --------------------------------------------------------------------------- numbers


def _mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def _compare(values, seed=0):
    """Per arm: mean with its bootstrap 95% CI; the paired differences of :data:`DIFFS` whose
    arms are there (BPO - SFT start, BPO - control, paper - control, BPO - paper), wins and
    ties counted on the printed values."""
    out = {"arms": {a: mean_ci(v, seed=seed) for a, v in values.items()}}
    for key, a, b in DIFFS:
        if a in values and b in values:
            out[key] = paired_differences(values[a], values[b], seed=seed, shown=_shown)
    return out


def _training_summary(rows):
    """Start / end (mean of the first / last tenth of the logged steps) and the mean over all
    steps of each metric of one run."""
    tr = {"steps": rows[-1]["step"], "n_logged": len(rows)}
    k10 = max(1, len(rows) // 10)
    for key in METRIC_KEYS[1:]:
        vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))
                and not isinstance(r.get(key), bool) and math.isfinite(r[key])]
        if vals:
            tr[key] = {"start": sum(vals[:k10]) / len(vals[:k10]),
                       "end": sum(vals[-k10:]) / len(vals[-k10:]),
                       "mean": sum(vals) / len(vals)}
    return tr


def summarize(chair_before, chair_after, metrics=None, chair_control=None, pope=None,
              extra_metrics=None, chair_paper=None, paper_metrics=None):
    """The numbers the report is written from.

    ``chair``: per metric, before/after values, means and standard deviations over seeds, the
    paired change, and in how many seeds it went down/up. ``compare``: per metric (CHAIR's,
    POPE's, ``extra_metrics``'), each arm's mean with its bootstrap 95% CI and the paired
    differences of :data:`DIFFS` with theirs. ``training``: per arm (``after``, ``paper``) and
    run, the curves' start and end (mean of the first/last tenth of the logged steps) and mean;
    ``diagnostics``: per arm, those averaged over the runs."""
    arms = _paired(chair_before, chair_after, chair_control, chair_paper)
    seeds = sorted(arms["before"], key=_seed_key)
    out = {"seeds": seeds, "arms": list(arms), "chair": {}, "compare": {}, "training": {},
           "diagnostics": {}}
    for k in CHAIR_KEYS:
        b = [arms["before"][s][k] for s in seeds]
        a = [arms["after"][s][k] for s in seeds]
        d = [_shown(y) - _shown(x) for x, y in zip(b, a) if x is not None and y is not None]
        raw = [y - x for x, y in zip(b, a) if x is not None and y is not None]
        mb, sb = _mean_std(b)
        ma, sa = _mean_std(a)
        md, sd = _mean_std(raw)
        out["chair"][k] = {"before": b, "after": a, "before_mean": mb, "before_std": sb,
                           "after_mean": ma, "after_std": sa, "change_mean": md, "change_std": sd,
                           "n_down": sum(x < 0 for x in d), "n_up": sum(x > 0 for x in d),
                           "n_paired": len(d)}
        for arm in ("paper", "control"):
            if arm in arms:
                out["chair"][k][arm] = [arms[arm][s][k] for s in seeds]
        out["compare"][k] = dict(_compare({a: {s: arms[a][s][k] for s in seeds} for a in arms}),
                                 label=_CHAIR_LABELS[k], lower_is_better=LOWER_IS_BETTER[k])
    for name, vals in _pope_values(pope).items():
        out["compare"][f"POPE {name}"] = dict(_compare(vals), label=f"POPE {name}",
                                              lower_is_better=False if "yes" not in name else None)
    for name, vals in _extra_values(extra_metrics).items():
        low = True if "lower is better" in name else False if "higher is better" in name else None
        out["compare"][name] = dict(_compare(vals), label=name, lower_is_better=low)
    for arm, runs in (("after", metrics), ("paper", paper_metrics)):
        per_run = {}
        for label, run in _as_runs(runs, "metrics").items():
            rows = _metrics_rows(run)
            if rows:
                per_run[label] = _training_summary(rows)
        if per_run:
            out["training"][arm] = per_run
            out["diagnostics"][arm] = _mean_over_runs(per_run)
    return out


def _mean_over_runs(per_run):
    """``{metric: {"start", "end", "mean"}}`` averaged over runs, and ``n_runs``."""
    out = {"n_runs": len(per_run)}
    for key in METRIC_KEYS[1:]:
        got = [tr[key] for tr in per_run.values() if key in tr]
        if got:
            out[key] = {p: sum(g[p] for g in got) / len(got) for p in ("start", "end", "mean")}
    return out


def _pct(x, signed=False):
    if x is None:
        return "n/a"
    return f"{_shown(x):+.1f}" if signed else f"{_shown(x):.1f}"


def _ci_txt(c, signed=False):
    """``12.3 [10.1, 14.0]`` (percent points) from a mean_ci/paired_differences dict."""
    if c is None or c.get("mean") is None:
        return "n/a"
    if c["n"] < 2:
        return f"{_pct(c['mean'], signed)} (1 seed, no CI)"
    return f"{_pct(c['mean'], signed)} [{_pct(c['lo'], signed)}, {_pct(c['hi'], signed)}]"


def _seed_label(s):
    return "-" if s == _ONE_RUN else str(s)


def format_table(chair_before, chair_after, chair_control=None, chair_paper=None):
    """Plain-text table: CHAIR-i, CHAIR-s, recall (%) of each arm (SFT start, BPO, the paper's
    objective, control) per seed; with several seeds, the mean and its bootstrap 95% CI."""
    arms = _paired(chair_before, chair_after, chair_control, chair_paper)
    seeds = sorted(arms["before"], key=_seed_key)
    names = [_SHORT[a] for a in arms]
    w = 9 if len(arms) < 4 else 8
    top = f"{'':<8}" + "".join(f"{_CHAIR_LABELS[k]:^{w * len(arms)}}" for k in CHAIR_KEYS)
    header = f"{'seed':<8}" + "".join(f"{n:>{w}}" for _ in CHAIR_KEYS for n in names)
    lines = [top.rstrip(), header, "-" * len(header)]
    for s in seeds:
        lines.append(f"{_seed_label(s):<8}" + "".join(f"{_pct(arms[a][s][k]):>{w}}"
                                                      for k in CHAIR_KEYS for a in arms))
    if len(seeds) > 1:
        cis = {(k, a): mean_ci([arms[a][s][k] for s in seeds]) for k in CHAIR_KEYS for a in arms}
        lines.append(f"{'mean':<8}" + "".join(f"{_pct(cis[k, a]['mean']):>{w}}"
                                              for k in CHAIR_KEYS for a in arms))
        for end in ("lo", "hi"):
            lines.append(f"{'CI ' + end:<8}" + "".join(f"{_pct(cis[k, a][end]):>{w}}"
                                                       for k in CHAIR_KEYS for a in arms))
    lines.append(f"(percent over {len(seeds)} seed{'s' if len(seeds) > 1 else ''}; "
                 + ("CI: bootstrap 95% over seeds; " if len(seeds) > 1 else "")
                 + "CHAIR-i/CHAIR-s: lower is better, recall: higher is better"
                 + ("; paper = BPO with the paper's loss (plain DPO, no NLL term)"
                    if "paper" in arms else "")
                 + ("; control = the same SFT start trained on the chosen answers only"
                    if "control" in arms else "") + ")")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path):
    tmp = f"{path}.tmp{os.getpid()}"
    fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    os.replace(tmp, path)


def _smooth(ys, window):
    out, acc = [], []
    for y in ys:
        acc.append(y)
        if len(acc) > window:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


_ARM_COLOURS = {"before": "#7f7f7f", "after": "#1f6fb4", "paper": "#2a9d4b",
                "control": "#e08a2c"}

# the panels of training.png: (metrics drawn, title, y-axis label, reference line)
_TRAIN_PANELS = (
    (("loss",), "DPO loss (ln 2 = policy equals reference)", "loss (nats)", LN2),
    (("nll",), "chosen answers' NLL per token (RPO term / weight)", "NLL (nats per token)", None),
    (("grad_norm_dpo", "grad_norm_rpo"), "gradient norm of each term (before clipping)",
     "L2 norm", None),
    (("logratio_margin_per_token",), "implicit reward margin per token",
     "chosen - rejected log-ratio\n(nats per token)", 0.0),
    (("logratio_margin",), "implicit reward margin per answer",
     "chosen - rejected log-ratio\n(nats per answer)", 0.0),
    (("reward_accuracy",), "reward accuracy (0 while policy = reference: all ties)",
     "share of pairs, chosen > rejected", 0.5),
)


def plot_training(metrics, path, paper_metrics=None):
    """Training curves of the BPO arm (``metrics``) and the paper's-objective arm
    (``paper_metrics``), each a run or ``{seed: run}``: per arm the mean over seeds at each
    step (thin), its moving average (thick) and the range over seeds (shaded). Panels: the DPO
    loss, the chosen answers' NLL, the gradient norm of each term (DPO solid, RPO dashed), the
    implicit reward margin in nats per token and per answer, and the reward accuracy."""
    plt = _pyplot()
    arms = {"after": metrics, "paper": paper_metrics}
    runs = {a: {k: _metrics_rows(v) for k, v in _as_runs(m, "metrics").items()}
            for a, m in arms.items() if m is not None}
    fig, axes = plt.subplots(2, 3, figsize=(11.5, 7))
    n_seeds = max(len(r) for r in runs.values())
    for ax, (keys, title, ylabel, ref) in zip(axes.flat, _TRAIN_PANELS):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimiser step")
        ax.set_ylabel(ylabel, fontsize=9)
        ax.grid(alpha=0.3)
        for arm, per_seed in runs.items():
            for j, key in enumerate(keys):
                by_step = {}
                for rows in per_seed.values():
                    for r in rows:
                        v = r.get(key)
                        if isinstance(v, (int, float)) and not isinstance(v, bool) \
                                and math.isfinite(v):
                            by_step.setdefault(r["step"], []).append(v)
                if not by_step or (key == "grad_norm_rpo" and
                                   not any(v for vs in by_step.values() for v in vs)):
                    continue   # the RPO term of an arm without one
                xs = sorted(by_step)
                mean = [sum(by_step[x]) / len(by_step[x]) for x in xs]
                c = _ARM_COLOURS[arm]
                style = "-" if j == 0 else "--"
                if n_seeds > 1:
                    ax.fill_between(xs, [min(by_step[x]) for x in xs],
                                    [max(by_step[x]) for x in xs], color=c, alpha=0.12, lw=0)
                ax.plot(xs, mean, style, color=c, lw=0.7, alpha=0.6)
                ax.plot(xs, _smooth(mean, max(3, len(xs) // 12)), style, color=c, lw=2.2)
        if ref is not None:
            ax.axhline(ref, color="black", ls=":", lw=1)
        if keys == ("reward_accuracy",):
            ax.set_ylim(-0.02, 1.02)
    # one legend for the figure: arms, terms, and what the line widths mean
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    objective = {"after": "BPO (the demo's objective)", "paper": "BPO, paper's loss"}
    handles = [Line2D([], [], color=_ARM_COLOURS[a], lw=2.2, label=objective[a]) for a in runs]
    handles += [Line2D([], [], color="gray", lw=0.7, label="mean over seeds, each step"),
                Line2D([], [], color="gray", lw=2.2, label="moving average"),
                Line2D([], [], color="gray", lw=2.2, ls="--",
                       label="gradient panel: RPO term (solid: DPO term)")]
    if n_seeds > 1:
        handles.append(Patch(color="gray", alpha=0.25, label="range over seeds"))
    handles.append(Line2D([], [], color="black", ls=":", lw=1,
                          label="ln 2 (loss), 0 (margins), 0.5 (accuracy)"))
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=9, frameon=False)
    fig.suptitle(f"DPO training ({n_seeds} seed{'s' if n_seeds > 1 else ''})", fontsize=12)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    _save(fig, path)
    plt.close(fig)
    return path


def _plot_arms(values, panels, path, title, ncols=None, ref_label=None):
    """One panel per metric: the arms side by side, one grey line per seed joining that
    seed's models (so a seed's differences are visible), and each arm's mean over seeds with
    its bootstrap 95% CI, labelled with its value. ``values``: ``{metric: {arm: {seed: v}}}``;
    ``panels``: ``{metric: (title, lower_is_better or None, reference line or None)}``;
    ``ref_label``: what the reference lines mean (the legend)."""
    plt = _pyplot()
    metrics = list(values)
    ncols = ncols or len(metrics)
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 3.9 * nrows), squeeze=False)
    n = len({s for m in values for a in values[m] for s in values[m][a]})
    for ax in axes.flat[len(metrics):]:
        ax.set_visible(False)
    for ax, m in zip(axes.flat, metrics):
        arms = [a for a in ARMS if a in values[m]]
        seeds = sorted({s for a in arms for s in values[m][a]}, key=_seed_key)
        xs = list(range(len(arms)))
        for s in seeds:
            pts = [(x, 100 * values[m][a][s]) for x, a in zip(xs, arms)
                   if values[m][a].get(s) is not None]
            if pts:
                ax.plot(*zip(*pts), color="0.72", lw=0.8, marker="o", ms=2.5, zorder=1)
        for x, arm in zip(xs, arms):
            c = mean_ci([values[m][arm].get(s) for s in seeds])
            if c["mean"] is None:
                continue
            y = 100 * c["mean"]
            err = [[y - 100 * c["lo"]], [100 * c["hi"] - y]]
            ax.errorbar([x], [y], yerr=err, fmt="o", color=_ARM_COLOURS[arm], ms=7, lw=2,
                        capsize=5, zorder=3)
            ax.annotate(f"{y:.1f}", (x, y), xytext=(9, 0), textcoords="offset points",
                        va="center", fontsize=9, color=_ARM_COLOURS[arm], fontweight="bold",
                        bbox=dict(facecolor="white", edgecolor="none", alpha=0.8, pad=0.5),
                        zorder=4)
        label, low, ref = panels[m]
        if ref is not None:
            ax.axhline(ref, color="black", ls=":", lw=1)
        better = "" if low is None else (" (\u2193 better)" if low else " (\u2191 better)")
        ax.set_title(label + better, fontsize=10)
        ax.set_ylabel("%")
        ax.set_xticks(xs)
        ax.set_xticklabels([ARM_LABELS[a].replace(", ", ",\n") for a in arms], fontsize=9)
        ax.set_xlim(-0.4, len(arms) - 0.25)   # room for the last arm's value label
        ax.grid(axis="y", alpha=0.3)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="0.72", lw=0.8, marker="o", ms=2.5,
                      label="one seed (its models joined)"),
               Line2D([], [], color="black", marker="o", ls="none", ms=7,
                      label="mean over seeds, bar: bootstrap 95% CI")]
    if ref_label:
        handles.append(Line2D([], [], color="black", ls=":", lw=1, label=ref_label))
    # one legend row under a one-row figure, stacked under a narrower grid
    fig.legend(handles=handles, loc="lower center", ncol=len(handles) if nrows == 1 else 1,
               fontsize=9, frameon=False)
    fig.suptitle(f"{title} ({n} seed{'s' if n > 1 else ''})", fontsize=11)
    fig.tight_layout(rect=(0, 0.07 if nrows == 1 else 0.03 + 0.025 * len(handles), 1, 1))
    _save(fig, path)
    plt.close(fig)
    return path


def plot_chair(chair_before, chair_after, path, chair_control=None, chair_paper=None,
               scored_on="held-out images"):
    """CHAIR-i, CHAIR-s and recall (%) of every arm (SFT start, BPO, the paper's objective and
    the control when given), one line per seed, and their means with bootstrap 95% CIs."""
    arms = _paired(chair_before, chair_after, chair_control, chair_paper)
    values = {k: {a: {s: v[k] for s, v in arms[a].items()} for a in arms} for k in CHAIR_KEYS}
    panels = {"chair_i": ("CHAIR-i: hallucinated mentions", True, None),
              "chair_s": ("CHAIR-s: captions with any", True, None),
              "recall": ("recall of true objects", False, None)}
    return _plot_arms(values, panels, path, f"Hallucination on {scored_on}")


def plot_pope(pope, path, scored_on="held-out images"):
    """POPE accuracy (prior-partner and random settings), prior F1 and yes-ratio (%) of every
    arm, one line per seed, with the means' bootstrap 95% CIs; the 50% line is chance accuracy
    (a coin flip) and a balanced yes-ratio."""
    values = _pope_values(pope)
    if not values:
        raise ValueError("pope: no POPE results to plot")
    panels = {"prior accuracy": ("prior accuracy", False, 50),
              "prior F1": ("prior F1", False, None),
              "random accuracy": ("random accuracy", False, 50),
              "prior yes-ratio": ("prior yes-ratio", None, 50)}
    return _plot_arms(values, panels, path, f"POPE yes/no probe on {scored_on}", ncols=2,
                      ref_label="50%: a coin flip's accuracy, a balanced yes-ratio")


# --------------------------------------------------------------------------- Markdown

_WHO = {"before": "the SFT start", "after": "BPO", "paper": "the paper's objective",
        "control": "the control"}
_DIFF_ARMS = {k: (a, b) for k, a, b in DIFFS}


def _record(d, low):
    """(wins, ties, losses) of the first arm of a paired difference, counted on the printed
    values."""
    wins = d["n_below"] if low else d["n_above"]
    losses = d["n_above"] if low else d["n_below"]
    return wins, d["n_equal"], losses


def _comparison(c, vs, unit="points"):
    """One sentence: one arm against another (``vs``: a key of :data:`DIFFS`) on one metric."""
    d = c.get(vs)
    if d is None or not d["n"]:
        return None
    low = c["lower_is_better"]
    a, b = _DIFF_ARMS[vs]
    who, other = _WHO[a], _WHO[b]
    n = d["n"]
    wins, ties, _ = _record(d, low)
    tie_txt = f" (tied in {ties})" if ties else ""
    if wins == n:
        where = f"in all {n} seeds" if n > 1 else "in its one seed"
        txt = f"{who} beats {other} on {c['label']} {where}"
    elif wins == 0:
        txt = (f"{who} does not beat {other} on {c['label']} in any of the {n} seeds{tie_txt}"
               if n > 1 else f"{who} does not beat {other} on {c['label']} in its one seed"
               + (" (a tie)" if ties else ""))
    else:
        txt = f"{who} beats {other} on {c['label']} in only {wins} of {n} seeds{tie_txt}"
    txt = txt[0].upper() + txt[1:]
    short = f"{_SHORT[a].replace('SFT', 'SFT start')} - {_SHORT[b].replace('SFT', 'SFT start')}"
    if n < 2:
        return (txt + f"; difference ({short}) {_pct(d['mean'], True)} {unit} (one seed: "
                "no confidence interval, so no claim beyond this seed).")
    txt += f"; mean difference ({short}) {_ci_txt(d, True)} {unit}"
    if ci_excludes_zero(d):
        good = (d["hi"] < 0) == bool(low)
        return txt + (", outside the seed noise (the 95% CI excludes 0)." if good else
                      f", and the 95% CI excludes 0: {who} is reliably worse than {other} here.")
    return txt + ": the 95% CI includes 0, so the difference is within the seed noise."


def _moved(new, old):
    """The verb for a CHAIR-i change as the tables print it."""
    a, b = _shown(new), _shown(old)
    return "lowered" if a < b else "raised" if a > b else "left unchanged"


def _summary(summ):
    """Two plain sentences: what BPO did to CHAIR-i against the SFT start and the control (the
    per-seed record and the mean difference with its CI), and where the paper's objective
    landed."""
    c = summ["compare"]["chair_i"]
    n = len(summ["seeds"])
    m = {a: c["arms"][a]["mean"] for a in c["arms"]}
    if not c["bpo_vs_sft"]["n"] or m.get("before") is None or m.get("after") is None:
        return ["CHAIR-i is undefined (no object mentions) for BPO or the SFT start, so the "
                "run says nothing about hallucination."]
    wins, ties, losses = _record(c["bpo_vs_sft"], True)
    s1 = (f"Over {n} seeds, BPO {_moved(m['after'], m['before'])} the share of hallucinated "
          f"object mentions (CHAIR-i) from {_pct(m['before'])}% at the SFT start to "
          f"{_pct(m['after'])}% on average (lower in {wins} of {n} seeds)" if n > 1 else
          f"In its one seed, BPO {_moved(m['after'], m['before'])} the share of hallucinated "
          f"object mentions (CHAIR-i) from {_pct(m['before'])}% at the SFT start to "
          f"{_pct(m['after'])}%")
    if m.get("control") is not None:
        s1 += (f", and the supervised control, trained on the same chosen answers without the "
               f"rejected ones, {_moved(m['control'], m['before'])} it to {_pct(m['control'])}%.")
    else:
        s1 += "."
    d = c.get("bpo_vs_control")
    if d is None or not d["n"]:
        s2 = ("No supervised control was run, so what the preference pairs add beyond more "
              "training on the chosen answers is not measured.")
    else:
        wins, ties, losses = _record(d, True)
        if d["n"] < 2:
            s2 = (f"Against the control BPO {'won' if wins else 'tied' if ties else 'lost'} by "
                  f"{_pct(d['mean'], True)} points (one seed: no confidence interval)")
        else:
            s2 = (f"Against the control BPO won in {wins}, tied in {ties} and lost in {losses} "
                  f"of the {d['n']} seeds, "
                  f"a mean difference of {_pct(d['mean'], True)} points (95% CI "
                  f"[{_pct(d['lo'], True)}, {_pct(d['hi'], True)}]), ")
            if not ci_excludes_zero(d):
                s2 += "within the seed noise"
            elif d["hi"] < 0:
                s2 += "in BPO's favour beyond the seed noise"
            else:
                s2 += "against BPO beyond the seed noise"
        if m.get("paper") is not None:
            s2 += (f"; with the paper's loss (plain DPO, no NLL term) BPO reached "
                   f"{_pct(m['paper'])}%")
            dp = c.get("paper_vs_control")
            if dp and dp["n"] > 1:
                s2 += f" ({_ci_txt(dp, True)} points against the control)"
        s2 += "."
    return [s1, s2]


def headline(summ, recall_tolerance=0.02, quick=False):
    """The report's opening, from :func:`summarize`'s numbers: (for ``quick``, a line saying
    the run only checks the pipeline), a plain two-sentence summary, then the conditions:
    whether the aim is met -- BPO beats the SFT start and the control on CHAIR-i (and POPE
    prior-partner accuracy when given) in every seed, the CI of BPO - control excludes 0, and
    recall drops by less than ``recall_tolerance`` -- and the sentences behind it."""
    cmp_ = summ["compare"]
    main = [k for k in ("chair_i", "POPE prior accuracy") if k in cmp_]
    out = []
    failures = []
    for k in main:
        c = cmp_[k]
        if not c["bpo_vs_sft"]["n"]:
            out.append(f"{c['label']} is undefined (no object mentions) for BPO or the SFT "
                       "start, so no comparison can be made.")
            failures.append(f"{c['label']} could not be compared")
            continue
        for vs in ("bpo_vs_sft", "bpo_vs_control", "bpo_vs_paper"):
            s = _comparison(c, vs)
            if s:
                out.append(s)
        for vs, who in (("bpo_vs_sft", "the SFT start"), ("bpo_vs_control", "the control")):
            d = c.get(vs)
            if d is None:
                continue
            wins, ties, _ = _record(d, c["lower_is_better"])
            if wins < d["n"]:
                failures.append(f"BPO beat {who} on {c['label']} in {wins} of {d['n']} seeds"
                                + (f" (tied in {ties})" if ties else ""))
        dc = c.get("bpo_vs_control")
        if dc is not None and not (ci_excludes_zero(dc) and
                                   (dc["hi"] < 0) == bool(c["lower_is_better"])):
            failures.append(f"the 95% CI of BPO minus the control on {c['label']} "
                            + ("rests on one seed" if dc["n"] < 2 else "does not exclude 0"
                               if not ci_excludes_zero(dc) else "lies on the wrong side of 0"))
    rc = cmp_["recall"]["bpo_vs_sft"]
    if rc["n"]:
        drop = -rc["mean"]
        if drop <= 0:
            out.append(f"Recall did not drop (BPO - SFT start {_ci_txt(rc, True)} points).")
        else:
            within = drop < recall_tolerance
            out.append(f"Recall dropped by {_pct(drop)} points (BPO - SFT start "
                       f"{_ci_txt(rc, True)}), {'within' if within else 'more than'} the "
                       f"tolerance of {_pct(recall_tolerance)} points"
                       + ("" if within else ": part of the lower hallucination rate comes from "
                                            "mentioning fewer objects") + ".")
            if not within:
                failures.append(f"recall dropped by {_pct(drop)} points")
    if "control" not in summ["arms"]:
        failures.append("no supervised control was run, so what the preference pairs add is "
                        "not measured")
    aim = (f"BPO below the SFT start and the control on {' and '.join(cmp_[k]['label'] for k in main)} "
           f"in every seed, the 95% CI of BPO minus the control excluding 0, recall loss under "
           f"{_pct(recall_tolerance)} points")
    verdict = (f"**The aim ({aim}) is met in this run.**" if not failures else
               f"**The aim ({aim}) is not met in this run: {'; '.join(failures)}.**")
    first = [f"**This is {QUICK_NOTE}.**", ""] if quick else []
    return first + [" ".join(_summary(summ)), "", verdict, ""] + out


def _verdict(summ):
    """Sentences about CHAIR before/after BPO chosen by the numbers."""
    ci, cs = summ["chair"]["chair_i"], summ["chair"]["chair_s"]
    n = ci["n_paired"]
    out = []
    if n == 0:
        return ["CHAIR-i is undefined (no object mentions) before or after BPO, so no "
                "comparison can be made."]
    seeds_txt = f"{n} seed{'s' if n > 1 else ''}"
    d = ci["change_mean"]
    rel = d / ci["before_mean"] if ci["before_mean"] else None
    rel_txt = f" ({100 * rel:+.0f}% relative)" if rel is not None else ""
    every = f" in all {seeds_txt}" if n > 1 else ""
    if ci["n_down"] == n:
        direction = f"BPO lowered CHAIR-i{every}"
    elif ci["n_up"] == n:
        direction = f"BPO raised CHAIR-i{every}"
    elif ci["n_down"] == 0 and ci["n_up"] == 0:
        direction = "CHAIR-i did not change" + (f" in any of the {seeds_txt}" if n > 1 else "")
    else:
        same = n - ci["n_down"] - ci["n_up"]
        direction = (f"CHAIR-i went down in {ci['n_down']} and up in {ci['n_up']} of the "
                     f"{seeds_txt}" + (f" (unchanged in {same})" if same else ""))
    out.append(f"{direction}: from {_pct(ci['before_mean'])}% to {_pct(ci['after_mean'])}% on "
               f"average, a change of {_pct(d, True)} points{rel_txt}.")
    if n > 1 and ci["change_std"] is not None:
        noisy = abs(d) <= ci["change_std"]
        out.append(f"The seed-to-seed standard deviation of that change is "
                   f"{_pct(ci['change_std'])} points, so the mean change is "
                   f"{'within' if noisy else 'larger than'} the spread between seeds"
                   f"{' and should not be read as an effect' if noisy else ''}.")
    if cs["n_paired"]:
        others = [f"{_pct(summ['compare']['chair_s']['arms'][a]['mean'])}% with "
                  f"{_WHO[a]}" for a in ("paper", "control") if a in summ["arms"]
                  and summ["compare"]["chair_s"]["arms"][a]["mean"] is not None]
        out.append(f"CHAIR-s (captions with any hallucination) went from "
                   f"{_pct(cs['before_mean'])}% to {_pct(cs['after_mean'])}%"
                   + (f" ({', '.join(others)})" if others else "") + ".")
    return out


def _objective_text(obj):
    if not obj:
        return ""
    txt = f"{obj['loss_type']}, beta {obj['beta']:g}"
    return txt + (f", + {obj['rpo_alpha']:g} x chosen NLL (RPO)" if obj.get("rpo_alpha")
                  else ", no NLL term")


def diagnostics_text(summ, objectives=None):
    """Per trained arm, from the logged terms (means over seeds): how far the DPO loss moved
    from ln 2, the implicit reward margin in nats per answer and per token, the argument the
    loss sees (beta x margin, per token for the length-normalised loss), the gradient norm of
    each term and their cosine, and the chosen NLL. Markdown list items."""
    out = []
    for arm, d in summ.get("diagnostics", {}).items():
        obj = (objectives or {}).get(arm)
        n = d["n_runs"]
        parts = []
        if "loss" in d:
            parts.append(f"the DPO loss went from {d['loss']['start']:.3f} to "
                         f"{d['loss']['end']:.3f} (first to last tenth of the steps; ln 2 = "
                         f"{LN2:.3f} while policy = reference)")
        if "logratio_margin" in d and "logratio_margin_per_token" in d:
            m, mt = d["logratio_margin"]["end"], d["logratio_margin_per_token"]["end"]
            txt = (f"the implicit reward margin (chosen minus rejected log-ratio to the "
                   f"reference) ended at {m:+.2f} nats per answer, {mt:+.3f} per token")
            if obj and obj["loss_type"] in ("sigmoid", "sigmoid_norm"):
                norm = obj["loss_type"] == "sigmoid_norm"
                z = obj["beta"] * (mt if norm else m)
                txt += (f"; the loss sees beta x margin{' per token' if norm else ''} = "
                        f"{z:+.3f}, where -log sigmoid is {math.log1p(math.exp(-z)):.3f}")
                if abs(z) < 0.2:   # the linear region: -log sigmoid(x) = ln 2 - x/2 + O(x^2)
                    txt += (" (ln 2 - x/2 while |x| is well below 1: the loss moves by half its "
                            "argument)")
            parts.append(txt)
        gd, gr = d.get("grad_norm_dpo"), d.get("grad_norm_rpo")
        if gd and gr and gr["mean"] > 0:
            ratio = gr["mean"] / gd["mean"] if gd["mean"] else math.inf
            txt = (f"gradient norms (mean over steps): DPO term {gd['mean']:.3g}, RPO term "
                   f"{gr['mean']:.3g} ({ratio:.1f} x the DPO term's)")
            cos = d.get("grad_cos_dpo_rpo")
            if cos:
                txt += f", cosine between them {cos['mean']:+.2f}"
            txt += (": the RPO term does most of the training" if ratio > 2 else
                    ": the DPO term does most of the training" if ratio < 0.5 else
                    ": the two terms pull with similar strength")
            parts.append(txt)
        elif gd:
            parts.append(f"the gradient norm (the DPO term alone) averaged {gd['mean']:.3g}")
        if "nll" in d:
            parts.append(f"the chosen answers' NLL went from {d['nll']['start']:.3f} to "
                         f"{d['nll']['end']:.3f} nats per token")
        if parts:
            head = f"**{ARM_LABELS[arm]}**" + (f" ({_objective_text(obj)})" if obj else "")
            out.append(f"- {head}, mean of {n} run{'s' if n != 1 else ''}: "
                       + "; ".join(parts) + ".")
    return out


def _training_table(summ):
    """Markdown rows: per arm and seed, the DPO loss and NLL (start -> end), the margins at the
    end, the terms' gradient norms (mean over steps)."""
    rows = ["| arm | seed | steps | DPO loss | chosen NLL / token | margin / answer (nats) | "
            "margin / token (nats) | grad DPO | grad RPO | cos | reward accuracy |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]

    def se(tr, k, f="{:.3f}"):
        return (f.format(tr[k]["start"]) + " -> " + f.format(tr[k]["end"])) if k in tr else ""

    def end(tr, k, f="{:+.3f}"):
        return f.format(tr[k]["end"]) if k in tr else ""

    def mean(tr, k, f="{:.3g}"):
        return f.format(tr[k]["mean"]) if k in tr else ""

    for arm, per_run in summ["training"].items():
        for label in sorted(per_run, key=_seed_key):
            tr = per_run[label]
            rows.append(f"| {ARM_LABELS[arm]} | {_seed_label(label)} | {tr['steps']} | "
                        f"{se(tr, 'loss')} | {se(tr, 'nll')} | "
                        f"{end(tr, 'logratio_margin', '{:+.2f}')} | "
                        f"{end(tr, 'logratio_margin_per_token')} | {mean(tr, 'grad_norm_dpo')} | "
                        f"{mean(tr, 'grad_norm_rpo') if tr.get('grad_norm_rpo', {}).get('mean') else '-'} | "
                        f"{mean(tr, 'grad_cos_dpo_rpo', '{:+.2f}')} "
                        f"| {se(tr, 'reward_accuracy', '{:.2f}')} |")
    return rows


def _md_escape(s):
    return str(s).replace("|", "\\|").replace("\n", " ")


def _atomic_write(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _extra_values(extra):
    """``{name: sides}`` -> ``{name: {arm: {seed: value}}}``; ``sides``: a ``(before, after[,
    control])`` tuple or a dict ``{arm: side}``, each side a number, None or ``{seed:
    number}``."""
    if extra is None:
        return {}
    if not isinstance(extra, dict):
        raise TypeError(f"extra_metrics: expected a dict name -> (before, after[, control]), got {type(extra).__name__}")
    out = {}
    for name, sides in extra.items():
        if isinstance(sides, dict) and set(sides) <= set(ARMS) and {"before", "after"} <= set(sides):
            pairs = [(a, sides[a]) for a in ARMS if a in sides]
        elif isinstance(sides, (tuple, list)) and len(sides) in (2, 3):
            pairs = list(zip(("before", "after", "control"), sides))
        else:
            raise TypeError(f"extra_metrics[{name!r}]: expected a (before, after) or (before, "
                            f"after, control) tuple, or a dict arm -> values")
        vals = {}
        for arm, side in pairs:
            side = {str(k): v for k, v in side.items()} if isinstance(side, dict) else {_ONE_RUN: side}
            for v in side.values():
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                      or not math.isfinite(v)):
                    raise ValueError(f"extra_metrics[{name!r}]: expected finite numbers or None, got {v!r}")
            vals[arm] = side
        if any(set(v) != set(vals["before"]) for v in vals.values()):
            raise ValueError(f"extra_metrics[{name!r}]: expected values for the same seeds in "
                             f"every arm")
        out[str(name)] = vals
    return out


_STAGES = ("world", "pretrain", "sft", "captions before", "pope before", "pairs", "bpo",
           "captions after", "pope after", "paper", "captions paper", "pope paper", "control",
           "captions control", "pope control")


def _stage_table(stage_times):
    """Markdown rows of ``{seed: {stage: seconds or None}}``: the stages' own times, kept from
    the run that computed them."""
    seeds = sorted(stage_times, key=_seed_key)
    stages = [s for s in _STAGES if any(s in stage_times[k] for k in seeds)]
    stages += sorted({s for k in seeds for s in stage_times[k]} - set(stages))
    rows = ["| stage | " + " | ".join(f"seed {k}" for k in seeds) + " |",
            "|---|" + "---|" * len(seeds)]
    tot = {k: 0.0 for k in seeds}
    unknown = set()
    for st in stages:
        cells = []
        for k in seeds:
            v = stage_times[k].get(st)
            if v is None:
                unknown.add(k)
                cells.append("?" if st in stage_times[k] else "")
            else:
                tot[k] += v
                cells.append(f"{v:.0f}s")
        rows.append(f"| {_md_escape(st)} | " + " | ".join(cells) + " |")
    rows.append("| **all stages** | " + " | ".join(f"{tot[k]:.0f}s" + ("+?" if k in unknown else "")
                                                  for k in seeds) + " |")
    return rows, sum(tot.values()), bool(unknown)


def _seed_key(s):
    s = str(s)
    return (0, int(s), s) if s.lstrip("-").isdigit() else (1, 0, s)


_DIFF_NAMES = {"bpo_vs_sft": "BPO - SFT start", "bpo_vs_control": "BPO - control",
               "paper_vs_control": "paper - control", "bpo_vs_paper": "BPO - paper"}


def compare_table(summ):
    """Markdown rows: every compared metric (CHAIR's, POPE's, the extra ones), each arm's mean
    with its bootstrap 95% CI over seeds, and the paired differences of :data:`DIFFS` with
    theirs."""
    keys = list(summ["compare"])
    arms = [a for a in ARMS if any(a in summ["compare"][k]["arms"] for k in keys)]
    diffs = [d for d, _, _ in DIFFS if any(summ["compare"][k].get(d) for k in keys)]
    rows = ["| metric (%, mean [bootstrap 95% CI] over seeds) | "
            + " | ".join([ARM_LABELS[a] for a in arms] + [_DIFF_NAMES[d] for d in diffs]) + " |",
            "|---|" + "---|" * (len(arms) + len(diffs))]
    for k in keys:
        c = summ["compare"][k]
        cells = [_ci_txt(c["arms"].get(a)) for a in arms]
        cells += [_ci_txt(c.get(d), True) for d in diffs]
        rows.append(f"| {_md_escape(c['label'])} | " + " | ".join(cells) + " |")
    return rows


def _arms_text(arms, objectives):
    parts = ["SFT start = the supervised (aligned) model every other arm starts from",
             "BPO = the SFT start after DPO on the bootstrapped pairs"
             + (f" ({_objective_text(objectives.get('after'))})" if objectives.get("after")
                else "")]
    if "paper" in arms:
        parts.append("BPO, paper's loss (\"paper\") = the same pairs, steps and learning rate "
                     "with the objective the BPO paper trains"
                     + (f" ({_objective_text(objectives.get('paper'))})"
                        if objectives.get("paper") else " (plain DPO, no NLL term)"))
    if "control" in arms:
        parts.append("control = the SFT start trained on the pairs' chosen answers only (same "
                     "steps and learning rate, no rejected answers)")
    return "; ".join(parts) + "."


def write_report(out_dir, *, metrics=None, chair_before, chair_after, chair_control=None,
                 chair_paper=None, pope=None, paper_metrics=None, objectives=None,
                 settings=None, seeds_text=None, stage_times=None, examples=None, notes=None,
                 title="BPO on the shapes world", recall_tolerance=0.02, extra_metrics=None,
                 scored_on="held-out images", quick=False):
    """Write ``training.png`` (when there are metrics), ``chair.png``, ``pope.png`` (when
    ``pope`` is given), ``report.md`` and ``summary.json`` into ``out_dir``.

    ``chair_paper`` / ``chair_control``: the paper's-objective arm and the supervised-only
    control (same shape as ``chair_before``). ``pope``: ``{arm: {seed: PopeResult or its
    dict}}``. ``paper_metrics``: the paper arm's training metrics (as ``metrics``).
    ``objectives``: ``{"after"|"paper": {"loss_type", "beta", "rpo_alpha"}}`` (what the
    training diagnostics compare with). ``extra_metrics``: ``{name: (before, after[, control])
    or {arm: values}}`` further fractions shown in percent (each a number, None or ``{seed:
    number}``; e.g. the world's prior-partner hallucination rate). ``settings``: ``{name:
    value}`` shown as the setup table. ``seeds_text``: Markdown saying which seeds were used for
    what. ``stage_times``: ``{seed: {stage: seconds}}``, each stage's own wall time from the run
    that computed it (None: not known). ``examples``: up to a few dicts ``{"id", "truth",
    "before", "after"}`` (ground-truth objects and the two captions) shown as a table.
    ``notes``: extra Markdown paragraphs. ``quick``: the run only checks the pipeline; the
    report's first line says so.
    Returns ``{"report", "summary_json", "chair_plot", "pope_plot", "training_plot", "table",
    "summary", "headline"}`` (``headline``: the opening Markdown lines).
    """
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir: expected a path, got {type(out_dir).__name__}")
    if not (isinstance(recall_tolerance, (int, float)) and 0 <= recall_tolerance <= 1):
        raise ValueError(f"recall_tolerance: expected a fraction in [0, 1], got {recall_tolerance!r}")
    if stage_times is not None and (not isinstance(stage_times, dict) or not all(
            isinstance(v, dict) for v in stage_times.values())):
        raise TypeError("stage_times: expected a dict seed -> {stage: seconds}")
    objectives = objectives or {}
    os.makedirs(out_dir, exist_ok=True)
    summ = summarize(chair_before, chair_after, metrics, chair_control=chair_control, pope=pope,
                     extra_metrics=extra_metrics, chair_paper=chair_paper,
                     paper_metrics=paper_metrics)
    table = format_table(chair_before, chair_after, chair_control, chair_paper)
    chair_png = plot_chair(chair_before, chair_after, os.path.join(out_dir, "chair.png"),
                           chair_control=chair_control, chair_paper=chair_paper,
                           scored_on=scored_on)
    pope_png = (plot_pope(pope, os.path.join(out_dir, "pope.png"), scored_on=scored_on)
                if pope else None)
    train_png = None
    if summ["training"]:
        train_png = plot_training(metrics, os.path.join(out_dir, "training.png"),
                                  paper_metrics=paper_metrics)

    head = headline(summ, recall_tolerance, quick=quick)
    first = f"# {title}" + (f": {QUICK_NOTE}" if quick else "")
    md = [first, ""] + head + [""]
    if seeds_text:
        md += ["## Seeds", "", seeds_text, ""]
    if settings or stage_times:
        md += ["## Setup", ""]
    if settings:
        md += ["| setting | value |", "|---|---|"]
        md += [f"| {_md_escape(k)} | {_md_escape(v)} |" for k, v in settings.items()]
        md.append("")
    if stage_times:
        rows, total, unknown = _stage_table(stage_times)
        md += ["Wall time of each stage, from the run that computed it (a stage reused from an "
               "earlier run keeps that run's time):", ""] + rows + [""]
        summ["stage_times"] = {str(k): v for k, v in stage_times.items()}
        summ["stage_seconds_total"] = None if unknown else total
    md += [f"## Hallucination (CHAIR) on {scored_on}", "",
           "CHAIR-i: hallucinated object mentions / all mentions. CHAIR-s: captions with at least "
           "one hallucinated object / all captions. Recall: ground-truth objects mentioned / all "
           "ground-truth objects. " + _arms_text(summ["arms"], objectives)
           + " A seed counts as a win only when the printed values differ.", "",
           "```", table, "```", ""]
    md += _verdict(summ)
    further = [k for k in summ["compare"] if k not in CHAIR_KEYS]
    ci_table = compare_table(summ)
    md += [""] + ci_table
    diag = diagnostics_text(summ, objectives)
    summ["ci_table"] = ci_table
    summ["headline"] = head
    summ["table"] = table
    summ["diagnostics_text"] = diag
    summ["seeds_text"] = seeds_text
    summ["quick"] = bool(quick)
    if further:
        summ["extra"] = {k: {"before_mean": summ["compare"][k]["arms"]["before"]["mean"],
                             "after_mean": summ["compare"][k]["arms"]["after"]["mean"],
                             "n": max(v["n"] for v in summ["compare"][k]["arms"].values())}
                         for k in further if not k.startswith("POPE ")}
    md += ["", "![CHAIR of every arm per seed](chair.png)", ""]
    if pope_png:
        md += [f"## POPE (yes/no object probe) on {scored_on}", "",
               "Questions \"Is there a <object> in the image?\": POPE random = present objects + "
               "random absent ones, POPE prior = present objects + absent prior partners of "
               "present objects (the question a model answering from its language prior gets "
               "wrong). Yes-ratio 50% = balanced; a coin flip scores 50% accuracy.", "",
               "![POPE of every arm per seed](pope.png)", ""]
    md += ["## DPO training: the two terms of the loss", ""]
    if train_png:
        md += diag + [""] + _training_table(summ) + [
            "", "(DPO loss and NLL: mean of the first -> last tenth of the steps; margins: the "
            "last tenth; gradient norms and cosine: mean over the steps.)", "",
            "![DPO training curves](training.png)", ""]
    else:
        md += ["No training metrics were given.", ""]
    if examples:
        md += [f"## Examples ({scored_on})", "", "| id | objects in the image | before BPO | after BPO |",
               "|---|---|---|---|"]
        for ex in examples:
            truth = ex.get("truth", "")
            truth = ", ".join(truth) if isinstance(truth, (list, tuple)) else truth
            md.append(f"| {_md_escape(ex.get('id', ''))} | {_md_escape(truth)} | "
                      f"{_md_escape(ex.get('before', ''))} | {_md_escape(ex.get('after', ''))} |")
        md.append("")
    if notes:
        md += ["## Notes", ""]
        md += [notes] if isinstance(notes, str) else list(notes)
        md.append("")
    report = os.path.join(out_dir, "report.md")
    _atomic_write(report, "\n".join(md))
    summary_json = os.path.join(out_dir, "summary.json")
    _atomic_write(summary_json, json.dumps({"title": title, "settings": settings or {},
                                            "scored_on": scored_on,
                                            "objectives": objectives, **summ},
                                           indent=1, default=str))
    return {"report": report, "summary_json": summary_json, "chair_plot": chair_png,
            "pope_plot": pope_png, "training_plot": train_png, "table": table, "summary": summ,
            "headline": head}


# --------------------------------------------------------------------------- README section

README_BEGIN = "<!-- demo:begin (generated by: python -m bpo_fast.demo.report --readme README.md DIR) -->"
README_END = "<!-- demo:end -->"


def _load_demo(out_dir):
    try:
        with open(os.path.join(out_dir, "summary.json"), encoding="utf-8") as f:
            summ = json.load(f)
        with open(os.path.join(out_dir, "demo_config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError as e:
        raise ValueError(f"out_dir: {out_dir!r} is not a finished demo folder ({e.filename} is "
                         "missing)") from None
    for key in ("headline", "table", "ci_table", "diagnostics_text"):
        if key not in summ:
            raise ValueError(f"out_dir: {out_dir!r}: summary.json has no {key!r} (written by an "
                             "older bpo-fast; run the demo again)")
    return summ, cfg


def _against_selection(summ, sel, command):
    """A sentence comparing BPO - control on CHAIR-i of this run (fresh seeds) with the same
    difference on the selection seeds (``sel``: the summary of ``command`` run with them), and
    whether the effect shrinks."""
    d = summ["compare"]["chair_i"].get("bpo_vs_control")
    s = sel["compare"]["chair_i"].get("bpo_vs_control")
    if not d or not s or not d["n"] or not s["n"]:
        return None
    seeds = ",".join(map(str, sel["seeds"]))
    txt = (f"On the seeds the settings were chosen on (`{command} --seeds {seeds}`: the same "
           f"settings, scored on the held-out images) BPO - control on CHAIR-i was "
           f"{_ci_txt(s, True)} points; on this run's fresh seeds it is {_ci_txt(d, True)}")
    if s["mean"] < 0 and d["mean"] > s["mean"]:
        txt += (": **the effect shrinks on fresh seeds** (the choice of settings on the "
                "selection seeds flattered BPO)" if d["mean"] < 0 else
                ": **the effect is gone on fresh seeds** (the choice of settings on the "
                "selection seeds flattered BPO)")
    elif d["mean"] <= s["mean"]:
        txt += ": the effect does not shrink on fresh seeds"
    return txt + "."


def readme_section(out_dir, image_dir, *, image_prefix="docs/", wall_time=None,
                   command="bpo-fast demo", selection_dir=None):
    """The README's demo results, generated from a finished demo folder ``out_dir`` (its
    ``summary.json`` and ``demo_config.json``): the two-sentence summary and the conditions,
    which seeds were used for what, the per-seed CHAIR table, the means with bootstrap CIs, the
    plots (``chair.png``/``pope.png``/``training.png`` copied into ``image_dir`` as
    ``demo_*.png``, linked as ``image_prefix`` + name), the training diagnostics and each
    stage's wall time. ``wall_time``: the measured wall time of ``command`` (e.g. from
    ``time``), shown as given. ``selection_dir``: a demo folder of the same settings on the
    selection seeds: a sentence says whether the effect shrinks on the fresh seeds. Returns the
    Markdown lines."""
    import shutil

    summ, cfg = _load_demo(out_dir)
    os.makedirs(image_dir, exist_ok=True)
    plots = {}
    for name, alt in (("chair", "CHAIR-i, CHAIR-s and recall of every arm, one line per seed"),
                      ("pope", "POPE accuracy and yes-ratio of every arm, one line per seed"),
                      ("training", "DPO loss, NLL, gradient norm of each term and implicit "
                                   "reward margins over the steps")):
        src = os.path.join(out_dir, f"{name}.png")
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(image_dir, f"demo_{name}.png"))
            plots[name] = f"![{alt}]({image_prefix}demo_{name}.png)"
    seeds = summ.get("seeds", [])
    when = (f"measured wall time {wall_time}" if wall_time else
            "wall time not measured for this section; the stages' own times are below")
    total = summ.get("stage_seconds_total")
    lines = [f"`{command}` ({len(seeds)} seed{'s' if len(seeds) != 1 else ''}, scored on the "
             f"{summ.get('scored_on', 'held-out images')}; {when}) reported:", ""]
    lines += [line for line in summ["headline"]]
    # the other metrics with a direction, BPO against the control (sentences from the numbers)
    more = []
    for k, c in summ["compare"].items():
        if k in ("chair_i", "POPE prior accuracy") or c.get("lower_is_better") is None:
            continue
        sentence = _comparison(c, "bpo_vs_control")
        if sentence:
            more.append(sentence)
    if more:
        lines += ["", "Other metrics, BPO against the control: " + " ".join(more)]
    if summ.get("seeds_text"):
        lines += ["", summ["seeds_text"]]
    if selection_dir:
        sel, sel_cfg = _load_demo(selection_dir)
        other = sorted(k for k in set(cfg) | set(sel_cfg) if k not in ("seeds", "out", "threads")
                       and cfg.get(k) != sel_cfg.get(k))
        if other:
            raise ValueError(f"selection run: {selection_dir!r} differs from {out_dir!r} in "
                             f"{other}, not only in its seeds")
        sentence = _against_selection(summ, sel, command)
        if sentence:
            lines += ["", sentence]
    lines += ["", "<!-- readme-block id=demo-table output -->", "```", summ["table"], "```",
              ""] + list(summ["ci_table"]) + [""]
    lines += [p for name in ("chair", "pope") if name in plots for p in (plots[name], "")]
    if summ["diagnostics_text"]:
        lines += ["The DPO term and the NLL (RPO) term, from the training logs:", ""]
        lines += list(summ["diagnostics_text"]) + [""]
    if "training" in plots:
        lines += [plots["training"], ""]
    times = summ.get("stage_times") or {}
    if times:
        per_stage = {}
        for st in times.values():
            for k, v in st.items():
                if v is not None:
                    per_stage[k] = per_stage.get(k, 0.0) + v
        lines += ["Each stage's own wall time, summed over the seeds: " + ", ".join(
            f"{k} {v:.0f}s" for k, v in per_stage.items())
            + (f" (all stages {total:.0f}s)." if total is not None else ".")
            + f" Settings: {len(seeds)} seeds, {cfg.get('n_text')} text-only conversations, "
            f"{cfg.get('n_train')} alignment / {cfg.get('n_val')} validation / "
            f"{cfg.get('n_eval')} held-out images, DPO {cfg.get('loss_type')} beta "
            f"{cfg.get('beta')}, lr {cfg.get('dpo_lr')}, {cfg.get('dpo_epochs')} epoch(s), RPO "
            f"weight {cfg.get('rpo_alpha')}, noise step {cfg.get('noise_step')}.", ""]
    return lines


def update_readme(readme, out_dir, **kw):
    """Rewrite the part of ``readme`` between :data:`README_BEGIN` and :data:`README_END` with
    :func:`readme_section` of ``out_dir`` (images go to ``docs/`` next to the README)."""
    with open(readme, encoding="utf-8") as f:
        text = f.read()
    begin = text.find(README_BEGIN)
    end = text.find(README_END)
    if begin < 0 or end < begin:
        raise ValueError(f"readme: {readme!r} has no {README_BEGIN!r} ... {README_END!r} markers")
    root = os.path.dirname(os.path.abspath(readme))
    lines = readme_section(out_dir, os.path.join(root, "docs"), image_prefix="docs/", **kw)
    new = text[:begin] + README_BEGIN + "\n" + "\n".join(lines) + "\n" + text[end:]
    _atomic_write(readme, new)
    return readme


def main(argv=None):
    """``python -m bpo_fast.demo.report --readme README.md DIR``: rewrite the README's demo
    section from the demo folder DIR."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m bpo_fast.demo.report", description=main.__doc__)
    ap.add_argument("out_dir", help="a finished `bpo-fast demo` output folder")
    ap.add_argument("--readme", required=True, help="the README to update (between the "
                                                    "demo:begin / demo:end markers)")
    ap.add_argument("--wall-time", default=None, help="the measured wall time of the command, "
                                                      "as it should read (e.g. '8 min 12 s')")
    ap.add_argument("--command", default="bpo-fast demo", help="the command that made DIR")
    ap.add_argument("--selection-run", default=None, metavar="DIR",
                    help="a demo folder of the same settings on the selection seeds: the "
                         "section says whether the effect shrinks on the fresh seeds")
    args = ap.parse_args(argv)
    try:
        update_readme(args.readme, args.out_dir, wall_time=args.wall_time, command=args.command,
                      selection_dir=args.selection_run)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"updated {args.readme} from {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
