"""The report of a BPO run: PNG plots, a Markdown summary and a plain-text table.

Inputs
------
- Training metrics: the trainer's ``metrics.jsonl``, one JSON object a line with the keys in
  :data:`METRIC_KEYS` (``step``, ``loss``, ``reward_chosen``, ``reward_rejected``,
  ``reward_margin``, ``reward_accuracy``, ``lr``; others are kept and ignored). TRL's names
  (``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``,
  ``learning_rate``) are accepted too. Where a line has ``dpo_loss`` (the trainer's DPO part of
  an objective with an extra term, e.g. RPO), that is the loss reported. A step logged twice
  (a resumed run) keeps its last line.
- CHAIR results of up to three arms: the SFT start (``chair_before``), BPO (``chair_after``)
  and the supervised-only control (``chair_control``, optional):
  :class:`bpo_fast.eval.chair.ChairResult`\\ s or dicts with ``chair_i``, ``chair_s``,
  ``recall`` (fractions in [0, 1] or None).
- POPE results (optional): ``{"before"|"after"|"control": {seed: PopeResult or its dict}}``.

Each input is either one run or a dict ``{seed: run}`` for several seeds; the arms are paired
by seed.

API
---
- :func:`write_report(out_dir, *, metrics, chair_before, chair_after, chair_control=None,
  pope=None, settings=None, stage_times=None, examples=None, notes=None, title=...) -> dict`
  writes ``training.png`` (DPO loss, reward margin, reward accuracy, chosen/rejected rewards
  over steps), ``chair.png`` (CHAIR-i, CHAIR-s and recall of every arm per seed, and the mean
  with its bootstrap 95% CI), ``pope.png`` (when POPE results are given), ``report.md`` and
  ``summary.json``; returns their paths, the text table (``"table"``) and the numbers
  (``"summary"``).
- :func:`format_table`, :func:`load_metrics`, :func:`plot_training`, :func:`plot_chair`,
  :func:`plot_pope`, :func:`summarize`, :func:`headline`.

The Markdown says what the numbers say: the headline and every sentence are chosen by
comparing the numbers (BPO against the SFT start and against the control, per seed and as the
mean paired difference with its bootstrap 95% CI, recall cost against ``recall_tolerance``),
never written in advance.
"""

import json
import math
import os

from bpo_fast.eval.stats import ci_excludes_zero, mean_ci, paired_differences

__all__ = ["METRIC_KEYS", "METRIC_ALIASES", "load_metrics", "plot_training", "plot_chair",
           "plot_pope", "format_table", "summarize", "headline", "write_report", "compare_table",
           "readme_section", "update_readme", "main"]

# The keys the report reads from each metrics line (the trainer writes these names).
METRIC_KEYS = ("step", "loss", "reward_chosen", "reward_rejected", "reward_margin",
               "reward_accuracy", "lr")
METRIC_ALIASES = {
    "rewards/chosen": "reward_chosen", "rewards/rejected": "reward_rejected",
    "rewards/margins": "reward_margin", "rewards/accuracies": "reward_accuracy",
    "rewards/accuracy": "reward_accuracy", "learning_rate": "lr", "global_step": "step",
}
CHAIR_KEYS = ("chair_i", "chair_s", "recall")
_CHAIR_LABELS = {"chair_i": "CHAIR-i", "chair_s": "CHAIR-s", "recall": "recall"}
LOWER_IS_BETTER = {"chair_i": True, "chair_s": True, "recall": False}
ARMS = ("before", "after", "control")
ARM_LABELS = {"before": "SFT start", "after": "BPO", "control": "control"}
# POPE numbers the report shows: (name, setting/split, score, higher is better)
POPE_KEYS = (("prior accuracy", "settings", "prior", "accuracy"),
             ("prior F1", "settings", "prior", "f1"),
             ("random accuracy", "settings", "random", "accuracy"),
             ("prior yes-ratio", "settings", "prior", "yes_ratio"))
LN2 = math.log(2.0)
_ONE_RUN = "run"   # the key of a single run given without a seed (shown as "-")


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


def _paired(chair_before, chair_after, chair_control=None):
    """``{arm: {seed: scores}}`` for the arms given (``control`` only when given)."""
    arms = {"before": chair_before, "after": chair_after}
    if chair_control is not None:
        arms["control"] = chair_control
    out = {a: {k: _chair_scores(v, f"chair_{a}[{k}]") for k, v in _as_runs(x, a).items()}
           for a, x in arms.items()}
    seeds = set(out["before"])
    if not seeds or any(set(v) != seeds for v in out.values()):
        raise ValueError("chair_before/chair_after" + ("/chair_control" if chair_control is not None
                                                       else "") +
                         f": expected results for the same seeds, got "
                         f"{' and '.join(str(sorted(v)) for v in out.values())}")
    return out


def _pope_values(pope):
    """``{name: {arm: {seed: value}}}`` from ``{arm: {seed: PopeResult or dict}}``."""
    if pope is None:
        return {}
    if not isinstance(pope, dict) or not pope or not set(pope) <= set(ARMS):
        raise TypeError(f"pope: expected a dict with some of {list(ARMS)} -> {{seed: POPE result}}")
    out = {}
    for arm, runs in pope.items():
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
    """Per arm: mean with its bootstrap 95% CI; BPO minus the SFT start and minus the control,
    paired by seed, with theirs."""
    out = {"arms": {a: mean_ci(v, seed=seed) for a, v in values.items()}}
    if "before" in values and "after" in values:
        out["bpo_vs_sft"] = paired_differences(values["after"], values["before"], seed=seed)
    if "control" in values and "after" in values:
        out["bpo_vs_control"] = paired_differences(values["after"], values["control"], seed=seed)
    return out


def summarize(chair_before, chair_after, metrics=None, chair_control=None, pope=None,
              extra_metrics=None):
    """The numbers the report is written from.

    ``chair``: per metric, before/after values, means and standard deviations over seeds, the
    paired change, and in how many seeds it went down/up. ``compare``: per metric (CHAIR's,
    POPE's, ``extra_metrics``'), each arm's mean with its bootstrap 95% CI and the paired
    differences BPO - SFT start and BPO - control with theirs. ``training``: per run, the
    curves' start and end (mean of the first/last tenth of the logged steps)."""
    arms = _paired(chair_before, chair_after, chair_control)
    seeds = sorted(arms["before"], key=_seed_key)
    out = {"seeds": seeds, "arms": list(arms), "chair": {}, "compare": {}, "training": {}}
    for k in CHAIR_KEYS:
        b = [arms["before"][s][k] for s in seeds]
        a = [arms["after"][s][k] for s in seeds]
        d = [y - x for x, y in zip(b, a) if x is not None and y is not None]
        mb, sb = _mean_std(b)
        ma, sa = _mean_std(a)
        md, sd = _mean_std(d)
        out["chair"][k] = {"before": b, "after": a, "before_mean": mb, "before_std": sb,
                           "after_mean": ma, "after_std": sa, "change_mean": md, "change_std": sd,
                           "n_down": sum(x < 0 for x in d), "n_up": sum(x > 0 for x in d),
                           "n_paired": len(d)}
        if "control" in arms:
            out["chair"][k]["control"] = [arms["control"][s][k] for s in seeds]
        out["compare"][k] = dict(_compare({a: {s: arms[a][s][k] for s in seeds} for a in arms}),
                                 label=_CHAIR_LABELS[k], lower_is_better=LOWER_IS_BETTER[k])
    for name, vals in _pope_values(pope).items():
        out["compare"][f"POPE {name}"] = dict(_compare(vals), label=f"POPE {name}",
                                              lower_is_better=False if "yes" not in name else None)
    for name, vals in _extra_values(extra_metrics).items():
        low = True if "lower is better" in name else False if "higher is better" in name else None
        out["compare"][name] = dict(_compare(vals), label=name, lower_is_better=low)
    for label, run in _as_runs(metrics, "metrics").items():
        rows = _metrics_rows(run)
        if not rows:
            continue
        tr = {"steps": rows[-1]["step"], "n_logged": len(rows)}
        k10 = max(1, len(rows) // 10)
        for key in METRIC_KEYS[1:]:
            vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))
                    and math.isfinite(r[key])]
            if vals:
                tr[key] = {"start": sum(vals[:k10]) / len(vals[:k10]),
                           "end": sum(vals[-k10:]) / len(vals[-k10:])}
        out["training"][label] = tr
    return out


def _pct(x, signed=False):
    if x is None:
        return "n/a"
    return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"


def _ci_txt(c, signed=False):
    """``12.3 [10.1, 14.0]`` (percent points) from a mean_ci/paired_differences dict."""
    if c is None or c.get("mean") is None:
        return "n/a"
    if c["n"] < 2:
        return f"{_pct(c['mean'], signed)} (1 seed, no CI)"
    return f"{_pct(c['mean'], signed)} [{_pct(c['lo'], signed)}, {_pct(c['hi'], signed)}]"


def _seed_label(s):
    return "-" if s == _ONE_RUN else str(s)


def format_table(chair_before, chair_after, chair_control=None):
    """Plain-text table: CHAIR-i, CHAIR-s, recall (%) of each arm (SFT start, BPO, control) per
    seed; with several seeds, the mean and its bootstrap 95% CI."""
    arms = _paired(chair_before, chair_after, chair_control)
    seeds = sorted(arms["before"], key=_seed_key)
    names = [{"before": "SFT"}.get(a, ARM_LABELS[a]) for a in arms]
    w = 9
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
    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def _smooth(ys, window):
    out, acc = [], []
    for y in ys:
        acc.append(y)
        if len(acc) > window:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def plot_training(metrics, path):
    """DPO loss, reward margin, reward accuracy and chosen/rejected rewards over steps; one
    colour per seed (raw values faint, a moving average on top when there are many steps)."""
    plt = _pyplot()
    runs = {k: _metrics_rows(v) for k, v in _as_runs(metrics, "metrics").items()}
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    panels = [("loss", "DPO loss"), ("reward_margin", "reward margin (chosen - rejected)"),
              ("reward_accuracy", "reward accuracy"), (None, "rewards: chosen (-) / rejected (--)")]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, title) in zip(axes.flat, panels):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        for i, (label, rows) in enumerate(runs.items()):
            c = colours[i % len(colours)]
            keys = [key] if key else ["reward_chosen", "reward_rejected"]
            for j, kk in enumerate(keys):
                pts = [(r["step"], r[kk]) for r in rows if isinstance(r.get(kk), (int, float))
                       and math.isfinite(r[kk])]
                if not pts:
                    continue
                xs, ys = zip(*pts)
                style = "-" if j == 0 else "--"
                name = f"seed {label}" if label != _ONE_RUN else None
                if len(xs) > 30:
                    ax.plot(xs, ys, style, color=c, alpha=0.25, lw=0.8)
                    ax.plot(xs, _smooth(ys, max(3, len(xs) // 20)), style, color=c, lw=1.6,
                            label=name if j == 0 else None)
                else:
                    ax.plot(xs, ys, style, color=c, marker=".", lw=1.4, label=name if j == 0 else None)
        if key == "loss":
            ax.axhline(LN2, color="gray", ls=":", lw=1)
            ax.annotate("ln 2", (1.0, LN2), xycoords=("axes fraction", "data"), ha="right",
                        va="bottom", fontsize=8, color="gray")
        if key == "reward_accuracy":
            ax.set_ylim(-0.02, 1.02)
            ax.axhline(0.5, color="gray", ls=":", lw=1)
        if key == "reward_margin" or key is None:
            ax.axhline(0.0, color="gray", ls=":", lw=1)
    if any(label != _ONE_RUN for label in runs):
        axes.flat[0].legend(fontsize=8)
    fig.suptitle("DPO training", fontsize=12)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


_ARM_COLOURS = {"before": "#8c8c8c", "after": "#2a7ab9", "control": "#e08a2c"}


def _plot_arms(values, labels, path, title):
    """One panel per metric: for every seed a group of bars (one per arm), then the mean over
    seeds with its bootstrap 95% CI as error bar. ``values``: ``{metric: {arm: {seed: v}}}``."""
    plt = _pyplot()
    metrics = list(values)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 4.2), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        arms = [a for a in ARMS if a in values[m]]
        seeds = sorted({s for a in arms for s in values[m][a]}, key=_seed_key)
        groups = [_seed_label(s) for s in seeds] + (["mean"] if len(seeds) > 1 else [])
        width = 0.8 / len(arms)
        for j, arm in enumerate(arms):
            xs, ys, err = [], [], [[], []]
            for i, s in enumerate(seeds):
                v = values[m][arm].get(s)
                if v is not None:
                    xs.append(i + (j - (len(arms) - 1) / 2) * width)
                    ys.append(100 * v)
            ax.bar(xs, ys, width, color=_ARM_COLOURS[arm], label=ARM_LABELS[arm])
            if len(seeds) > 1:
                c = mean_ci([values[m][arm].get(s) for s in seeds])
                if c["mean"] is not None:
                    x = len(seeds) + (j - (len(arms) - 1) / 2) * width
                    err = [[100 * (c["mean"] - c["lo"])], [100 * (c["hi"] - c["mean"])]]
                    ax.bar([x], [100 * c["mean"]], width, color=_ARM_COLOURS[arm],
                           edgecolor="black", yerr=err, capsize=4)
                    ax.annotate(f"{100 * c['mean']:.1f}", (x, 100 * c["hi"]), xytext=(0, 3),
                                textcoords="offset points", ha="center", fontsize=6)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([g if g == "mean" else f"seed {g}" for g in groups], fontsize=8)
        ax.set_title(labels.get(m, m), fontsize=10)
        ax.set_ylabel("%")
        ax.grid(axis="y", alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=9, frameon=False)
    n = len({s for m in values for a in values[m] for s in values[m][a]})
    fig.suptitle(f"{title} ({n} seed{'s' if n > 1 else ''}"
                 + ("; mean: error bar = bootstrap 95% CI over seeds" if n > 1 else "") + ")",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    _save(fig, path)
    plt.close(fig)
    return path


def plot_chair(chair_before, chair_after, path, chair_control=None):
    """CHAIR-i, CHAIR-s and recall (%) of every arm (SFT start, BPO, control when given) per
    seed, and their means with bootstrap 95% CIs."""
    arms = _paired(chair_before, chair_after, chair_control)
    values = {k: {a: {s: v[k] for s, v in arms[a].items()} for a in arms} for k in CHAIR_KEYS}
    labels = {"chair_i": "CHAIR-i (lower is better)", "chair_s": "CHAIR-s (lower is better)",
              "recall": "recall (higher is better)"}
    return _plot_arms(values, labels, path, "Hallucination on held-out images")


def plot_pope(pope, path):
    """POPE accuracy (prior-partner and random settings), prior F1 and yes-ratio (%) of every
    arm per seed, with the means' bootstrap 95% CIs."""
    values = _pope_values(pope)
    if not values:
        raise ValueError("pope: no POPE results to plot")
    return _plot_arms(values, {"prior yes-ratio": "prior yes-ratio (50 = balanced)"}, path,
                      "POPE on held-out images")


# --------------------------------------------------------------------------- Markdown


def _comparison(c, vs, unit="points"):
    """One sentence: BPO against ``vs`` ("bpo_vs_sft"/"bpo_vs_control") on one metric."""
    d = c.get(vs)
    if d is None or not d["n"]:
        return None
    low = c["lower_is_better"]
    other = {"bpo_vs_sft": "the SFT start", "bpo_vs_control": "the control"}[vs]
    n = d["n"]
    wins = d["n_below"] if low else d["n_above"]
    if wins == n:
        where = f"in all {n} seeds" if n > 1 else "in its one seed"
        txt = f"BPO beats {other} on {c['label']} {where}"
    elif wins == 0:
        txt = (f"BPO does not beat {other} on {c['label']} in any of the {n} seeds" if n > 1
               else f"BPO does not beat {other} on {c['label']} in its one seed")
    else:
        txt = f"BPO beats {other} on {c['label']} in only {wins} of {n} seeds"
    short = {"bpo_vs_sft": "SFT start", "bpo_vs_control": "control"}[vs]
    if n < 2:
        return (txt + f"; difference (BPO - {short}) {_pct(d['mean'], True)} {unit} (one seed: "
                "no confidence interval, so no claim beyond this seed).")
    txt += f"; mean difference (BPO - {short}) {_ci_txt(d, True)} {unit}"
    if ci_excludes_zero(d):
        good = (d["hi"] < 0) == bool(low)
        return txt + (", outside the seed noise (the 95% CI excludes 0)." if good else
                      f", and the 95% CI excludes 0: BPO is reliably worse than {other} here.")
    return txt + ": the 95% CI includes 0, so the difference is within the seed noise."


def headline(summ, recall_tolerance=0.02):
    """The report's opening sentences, from :func:`summarize`'s numbers: BPO against the SFT
    start and the control on CHAIR-i (and POPE prior-partner accuracy when given), the recall
    cost, and whether the aim is met -- BPO beats the SFT start and the control on each of
    those in every seed, the CI of BPO - control excludes 0, and recall drops by less than
    ``recall_tolerance``."""
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
        for vs in ("bpo_vs_sft", "bpo_vs_control"):
            s = _comparison(c, vs)
            if s:
                out.append(s)
        for vs, who in (("bpo_vs_sft", "the SFT start"), ("bpo_vs_control", "the control")):
            d = c.get(vs)
            if d is None:
                continue
            wins = d["n_below"] if c["lower_is_better"] else d["n_above"]
            if wins < d["n"]:
                failures.append(f"BPO beat {who} on {c['label']} in {wins} of {d['n']} seeds")
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
    return [verdict, ""] + out


def _verdict(summ):
    """Sentences about CHAIR before/after BPO chosen by the numbers."""
    ci, rc, cs = summ["chair"]["chair_i"], summ["chair"]["recall"], summ["chair"]["chair_s"]
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
        direction = (f"CHAIR-i went down in {ci['n_down']} and up in {ci['n_up']} of the "
                     f"{seeds_txt}")
    out.append(f"{direction}: from {_pct(ci['before_mean'])}% to {_pct(ci['after_mean'])}% on "
               f"average, a change of {_pct(d, True)} points{rel_txt}.")
    if n > 1 and ci["change_std"] is not None:
        noisy = abs(d) <= ci["change_std"]
        out.append(f"The seed-to-seed standard deviation of that change is "
                   f"{_pct(ci['change_std'])} points, so the mean change is "
                   f"{'within' if noisy else 'larger than'} the spread between seeds"
                   f"{' and should not be read as an effect' if noisy else ''}.")
    if cs["n_paired"]:
        out.append(f"CHAIR-s (captions with any hallucination) went from "
                   f"{_pct(cs['before_mean'])}% to {_pct(cs['after_mean'])}%"
                   + (f" ({_pct(summ['compare']['chair_s']['arms']['control']['mean'])}% with the "
                      "control)" if "control" in summ["arms"]
                      and summ["compare"]["chair_s"]["arms"]["control"]["mean"] is not None
                      else "") + ".")
    return out


def _training_text(summ):
    out = []
    for label, tr in summ["training"].items():
        who = f"Seed {label}" if label != _ONE_RUN else "Training"
        parts = [f"{tr['steps']} steps"]
        if "loss" in tr:
            lo = tr["loss"]
            trend = "fell" if lo["end"] < lo["start"] else "did not fall"
            parts.append(f"DPO loss {trend} from {lo['start']:.3f} to {lo['end']:.3f} "
                         f"(ln 2 = {LN2:.3f} while policy = reference)")
        if "reward_accuracy" in tr:
            parts.append(f"reward accuracy {tr['reward_accuracy']['start']:.2f} -> "
                         f"{tr['reward_accuracy']['end']:.2f}")
        if "reward_margin" in tr:
            parts.append(f"reward margin {tr['reward_margin']['start']:+.3f} -> "
                         f"{tr['reward_margin']['end']:+.3f}")
        out.append(f"- {who}: " + "; ".join(parts) + ".")
    return out


def _md_escape(s):
    return str(s).replace("|", "\\|").replace("\n", " ")


def _atomic_write(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _extra_values(extra):
    """``{name: (before, after[, control])}`` (each a number, None or ``{seed: number}``) ->
    ``{name: {arm: {seed: value}}}``."""
    if extra is None:
        return {}
    if not isinstance(extra, dict):
        raise TypeError(f"extra_metrics: expected a dict name -> (before, after[, control]), got {type(extra).__name__}")
    out = {}
    for name, sides in extra.items():
        if not isinstance(sides, (tuple, list)) or len(sides) not in (2, 3):
            raise TypeError(f"extra_metrics[{name!r}]: expected a (before, after) or (before, "
                            f"after, control) tuple")
        vals = {}
        for arm, side in zip(ARMS, sides):
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


_STAGES = ("world", "pretrain", "sft", "captions before", "pope before", "pairs", "bpo", "captions after",
           "pope after", "control", "captions control", "pope control")


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


def compare_table(summ):
    """Markdown rows: every compared metric (CHAIR's, POPE's, the extra ones), each arm's mean
    with its bootstrap 95% CI over seeds, and the paired differences BPO - SFT start and BPO -
    control with theirs."""
    keys = list(summ["compare"])
    arms = [a for a in ARMS if any(a in summ["compare"][k]["arms"] for k in keys)]
    diffs = [d for d in ("bpo_vs_sft", "bpo_vs_control")
             if any(summ["compare"][k].get(d) for k in keys)]
    names = {"bpo_vs_sft": "BPO - SFT start", "bpo_vs_control": "BPO - control"}
    rows = ["| metric (%, mean [bootstrap 95% CI] over seeds) | "
            + " | ".join([ARM_LABELS[a] for a in arms] + [names[d] for d in diffs]) + " |",
            "|---|" + "---|" * (len(arms) + len(diffs))]
    for k in keys:
        c = summ["compare"][k]
        cells = [_ci_txt(c["arms"].get(a)) for a in arms]
        cells += [_ci_txt(c.get(d), True) for d in diffs]
        rows.append(f"| {_md_escape(c['label'])} | " + " | ".join(cells) + " |")
    return rows


def write_report(out_dir, *, metrics=None, chair_before, chair_after, chair_control=None,
                 pope=None, settings=None, stage_times=None, examples=None, notes=None,
                 title="BPO on the shapes world", recall_tolerance=0.02, extra_metrics=None,
                 scored_on="held-out images"):
    """Write ``training.png`` (when there are metrics), ``chair.png``, ``pope.png`` (when
    ``pope`` is given), ``report.md`` and ``summary.json`` into ``out_dir``.

    ``chair_control``: the supervised-only control arm (same shape as ``chair_before``).
    ``pope``: ``{"before"|"after"|"control": {seed: PopeResult or its dict}}``.
    ``extra_metrics``: ``{name: (before, after[, control])}`` further fractions shown in percent
    (each a number, None or ``{seed: number}``; e.g. the world's prior-partner hallucination
    rate). ``settings``: ``{name: value}`` shown as the setup table. ``stage_times``: ``{seed:
    {stage: seconds}}``, each stage's own wall time from the run that computed it (None: not
    known). ``examples``: up to a few dicts ``{"id", "truth", "before", "after"}`` (ground-truth
    objects and the two captions) shown as a table. ``notes``: extra Markdown paragraphs.
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
    os.makedirs(out_dir, exist_ok=True)
    summ = summarize(chair_before, chair_after, metrics, chair_control=chair_control, pope=pope,
                     extra_metrics=extra_metrics)
    table = format_table(chair_before, chair_after, chair_control)
    chair_png = plot_chair(chair_before, chair_after, os.path.join(out_dir, "chair.png"),
                           chair_control=chair_control)
    pope_png = plot_pope(pope, os.path.join(out_dir, "pope.png")) if pope else None
    train_png = None
    if summ["training"]:
        train_png = plot_training(metrics, os.path.join(out_dir, "training.png"))

    head = headline(summ, recall_tolerance)
    md = [f"# {title}", ""] + head + [""]
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
    arms_txt = ("Before = the supervised (SFT) start, BPO = the same model after BPO, control = "
                "the same SFT start trained on the pairs' chosen answers only (same steps and "
                "learning rate)." if chair_control is not None else
                "Before = the supervised model, after = the same model after BPO.")
    md += [f"## Hallucination (CHAIR) on {scored_on}", "",
           "CHAIR-i: hallucinated object mentions / all mentions. CHAIR-s: captions with at least "
           "one hallucinated object / all captions. Recall: ground-truth objects mentioned / all "
           "ground-truth objects. " + arms_txt, "", "```", table, "```", ""]
    md += _verdict(summ)
    further = [k for k in summ["compare"] if k not in CHAIR_KEYS]
    ci_table = compare_table(summ)
    md += [""] + ci_table
    summ["ci_table"] = ci_table
    summ["headline"] = head
    summ["table"] = table
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
               "wrong). Yes-ratio 50% = balanced.", "",
               "![POPE of every arm per seed](pope.png)", ""]
    md += ["## DPO training", ""]
    if train_png:
        md += _training_text(summ) + ["", "![DPO training curves](training.png)", ""]
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
                                            "scored_on": scored_on, **summ},
                                           indent=1, default=str))
    return {"report": report, "summary_json": summary_json, "chair_plot": chair_png,
            "pope_plot": pope_png, "training_plot": train_png, "table": table, "summary": summ,
            "headline": head}


# --------------------------------------------------------------------------- README section

README_BEGIN = "<!-- demo:begin (generated by: python -m bpo_fast.demo.report --readme README.md DIR) -->"
README_END = "<!-- demo:end -->"


def readme_section(out_dir, image_dir, *, image_prefix="docs/", wall_time=None,
                   command="bpo-fast demo"):
    """The README's demo results, generated from a finished demo folder ``out_dir`` (its
    ``summary.json`` and ``demo_config.json``): the headline, the per-seed CHAIR table, the
    means with bootstrap CIs, the plots (``chair.png``/``pope.png`` copied into ``image_dir`` as
    ``demo_chair.png``/``demo_pope.png``, linked as ``image_prefix`` + name) and each stage's
    wall time. ``wall_time``: the measured wall time of ``command`` (e.g. from ``time``), shown
    as given. Returns the Markdown lines."""
    import shutil

    try:
        with open(os.path.join(out_dir, "summary.json"), encoding="utf-8") as f:
            summ = json.load(f)
        with open(os.path.join(out_dir, "demo_config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError as e:
        raise ValueError(f"out_dir: {out_dir!r} is not a finished demo folder ({e.filename} is "
                         "missing)") from None
    for key in ("headline", "table", "ci_table"):
        if key not in summ:
            raise ValueError(f"out_dir: {out_dir!r}: summary.json has no {key!r} (written by an "
                             "older bpo-fast; run the demo again)")
    os.makedirs(image_dir, exist_ok=True)
    plots = []
    for name, alt in (("chair", "CHAIR-i, CHAIR-s and recall of every arm per seed"),
                      ("pope", "POPE accuracy and yes-ratio of every arm per seed")):
        src = os.path.join(out_dir, f"{name}.png")
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(image_dir, f"demo_{name}.png"))
            plots.append(f"![{alt}]({image_prefix}demo_{name}.png)")
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
    # the marker tests/readme_blocks.py reads: this block is output, not a command
    lines += ["", "<!-- readme-block id=demo-table output -->", "```", summ["table"], "```", ""]
    lines += list(summ["ci_table"]) + [""]
    lines += [p for plot in plots for p in (plot, "")]
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
            f"{cfg.get('n_eval')} held-out images, DPO beta {cfg.get('beta')}, lr "
            f"{cfg.get('dpo_lr')}, RPO weight {cfg.get('rpo_alpha')}, noise step "
            f"{cfg.get('noise_step')}.", ""]
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
    args = ap.parse_args(argv)
    try:
        update_readme(args.readme, args.out_dir, wall_time=args.wall_time, command=args.command)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"updated {args.readme} from {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
