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
- CHAIR results before and after BPO: :class:`bpo_fast.eval.chair.ChairResult`\\ s or dicts
  with ``chair_i``, ``chair_s``, ``recall`` (fractions in [0, 1] or None).

Each input is either one run or a dict ``{seed: run}`` for several seeds; before/after are
paired by seed.

API
---
- :func:`write_report(out_dir, *, metrics, chair_before, chair_after, settings=None,
  examples=None, notes=None, title=...) -> dict` writes ``training.png`` (DPO loss, reward
  margin, reward accuracy, chosen/rejected rewards over steps), ``chair.png`` (CHAIR-i, CHAIR-s
  and recall before/after: mean over seeds, each seed a dot), ``report.md`` and
  ``summary.json``; returns their paths, the text table (``"table"``) and the numbers
  (``"summary"``).
- :func:`format_table(chair_before, chair_after) -> str`, :func:`load_metrics(path) -> list`,
  :func:`plot_training`, :func:`plot_chair`, :func:`summarize`.

The Markdown says what the numbers say: every sentence in it is chosen by comparing the
numbers (direction per seed, size against the seed-to-seed spread, recall cost against
``recall_tolerance``), never written in advance.
"""

import json
import math
import os

__all__ = ["METRIC_KEYS", "METRIC_ALIASES", "load_metrics", "plot_training", "plot_chair",
           "format_table", "summarize", "write_report"]

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
LN2 = math.log(2.0)


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
    return {"run": x}


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


def _paired(chair_before, chair_after):
    before = {k: _chair_scores(v, f"chair_before[{k}]") for k, v in _as_runs(chair_before, "b").items()}
    after = {k: _chair_scores(v, f"chair_after[{k}]") for k, v in _as_runs(chair_after, "a").items()}
    if not before or set(before) != set(after):
        raise ValueError(f"chair_before/chair_after: expected results for the same seeds, got "
                         f"{sorted(before)} and {sorted(after)}")
    return before, after


# --------------------------------------------------------------------------- numbers


def _mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def summarize(chair_before, chair_after, metrics=None):
    """The numbers the report is written from: per metric, before/after means and standard
    deviations over seeds, the paired change, and in how many seeds it went down/up; per run,
    the training curves' start and end (mean of the first/last tenth of the logged steps)."""
    before, after = _paired(chair_before, chair_after)
    seeds = sorted(before)
    out = {"seeds": seeds, "chair": {}, "training": {}}
    for k in CHAIR_KEYS:
        b = [before[s][k] for s in seeds]
        a = [after[s][k] for s in seeds]
        d = [y - x for x, y in zip(b, a) if x is not None and y is not None]
        mb, sb = _mean_std(b)
        ma, sa = _mean_std(a)
        md, sd = _mean_std(d)
        out["chair"][k] = {"before": b, "after": a, "before_mean": mb, "before_std": sb,
                           "after_mean": ma, "after_std": sa, "change_mean": md, "change_std": sd,
                           "n_down": sum(x < 0 for x in d), "n_up": sum(x > 0 for x in d),
                           "n_paired": len(d)}
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


def format_table(chair_before, chair_after):
    """Plain-text table: CHAIR-i, CHAIR-s, recall (%) before/after per seed, and the mean."""
    before, after = _paired(chair_before, chair_after)
    seeds = sorted(before)
    header = f"{'run':<10}" + "".join(f"{_CHAIR_LABELS[k] + ' before':>16}{'after':>8}"
                                      for k in CHAIR_KEYS)
    lines = [header, "-" * len(header)]
    for s in seeds:
        lines.append(f"{s:<10}" + "".join(f"{_pct(before[s][k]):>16}{_pct(after[s][k]):>8}"
                                          for k in CHAIR_KEYS))
    if len(seeds) > 1:
        summ = summarize(chair_before, chair_after)["chair"]
        row = f"{'mean':<10}"
        for k in CHAIR_KEYS:
            row += f"{_pct(summ[k]['before_mean']):>16}{_pct(summ[k]['after_mean']):>8}"
        lines.append(row)
    lines.append("(percent; CHAIR-i/CHAIR-s: lower is better, recall: higher is better)")
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
                name = f"seed {label}" if label != "run" else None
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
    if any(label != "run" for label in runs):
        axes.flat[0].legend(fontsize=8)
    fig.suptitle("DPO training", fontsize=12)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def plot_chair(chair_before, chair_after, path):
    """Grouped bars: CHAIR-i, CHAIR-s and recall (%) before and after BPO; bar = mean over
    seeds, error bar = standard deviation, dots = single seeds."""
    plt = _pyplot()
    before, after = _paired(chair_before, chair_after)
    seeds = sorted(before)
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.36
    for j, (name, data, colour) in enumerate((("before BPO (SFT)", before, "#8c8c8c"),
                                              ("after BPO", after, "#2a7ab9"))):
        for i, k in enumerate(CHAIR_KEYS):
            vals = [100 * data[s][k] for s in seeds if data[s][k] is not None]
            x = i + (j - 0.5) * width
            if not vals:
                ax.text(x, 1, "n/a", ha="center", fontsize=8)
                continue
            m, sd = _mean_std(vals)
            ax.bar(x, m, width, color=colour, yerr=sd if len(vals) > 1 else None, capsize=3,
                   label=name if i == 0 else None)
            ax.scatter([x] * len(vals), vals, color="black", s=10, zorder=3)
            top = max(vals + [m + (sd or 0.0)])
            ax.annotate(f"{m:.1f}", (x, top), xytext=(0, 3), textcoords="offset points",
                        ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(CHAIR_KEYS)))
    ax.set_xticklabels(["CHAIR-i (lower better)", "CHAIR-s (lower better)",
                        "recall (higher better)"])
    ax.set_ylabel("%")
    ax.set_ylim(0, max(ax.get_ylim()[1], 10) * 1.08)
    n = len(seeds)
    ax.set_title(f"Hallucination on held-out images ({n} seed{'s' if n > 1 else ''})", fontsize=11)
    ax.legend(fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- Markdown


def _verdict(summ, recall_tolerance):
    """Sentences about CHAIR chosen by the numbers."""
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
                   f"{_pct(cs['before_mean'])}% to {_pct(cs['after_mean'])}%.")
    if rc["n_paired"]:
        dr = rc["change_mean"]
        if dr >= 0:
            cost = "recall did not drop"
        elif -dr <= recall_tolerance:
            cost = (f"recall dropped by {_pct(-dr)} points, within the tolerance of "
                    f"{_pct(recall_tolerance)} points")
        else:
            cost = (f"recall dropped by {_pct(-dr)} points, more than the tolerance of "
                    f"{_pct(recall_tolerance)} points: part of the lower hallucination rate "
                    f"comes from mentioning fewer objects")
        out.append(f"Recall went from {_pct(rc['before_mean'])}% to {_pct(rc['after_mean'])}%: "
                   f"{cost}.")
        aim = ci["n_down"] == n and n > 0 and (dr >= 0 or -dr <= recall_tolerance)
        out.append("**The aim (lower CHAIR-i in every seed at no more than a small loss of "
                   f"recall) is {'met' if aim else 'not met'} in this run.**")
    return out


def _training_text(summ):
    out = []
    for label, tr in summ["training"].items():
        who = f"Seed {label}" if label != "run" else "Training"
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


def _extra_rows(extra):
    """``{name: (before, after)}`` (each a number, None or ``{seed: number}``) -> rows of
    ``(name, before_mean, after_mean, n_seeds)``."""
    if extra is None:
        return []
    if not isinstance(extra, dict):
        raise TypeError(f"extra_metrics: expected a dict name -> (before, after), got {type(extra).__name__}")
    rows = []
    for name, pair in extra.items():
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"extra_metrics[{name!r}]: expected a (before, after) pair")
        means = []
        for side in pair:
            vals = list(side.values()) if isinstance(side, dict) else [side]
            for v in vals:
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                      or not math.isfinite(v)):
                    raise ValueError(f"extra_metrics[{name!r}]: expected finite numbers or None, got {v!r}")
            means.append((_mean_std(vals)[0], len([v for v in vals if v is not None])))
        rows.append((str(name), means[0][0], means[1][0], max(means[0][1], means[1][1])))
    return rows


def write_report(out_dir, *, metrics=None, chair_before, chair_after, settings=None,
                 examples=None, notes=None, title="BPO on the shapes world",
                 recall_tolerance=0.05, extra_metrics=None):
    """Write ``training.png`` (when there are metrics), ``chair.png``, ``report.md`` and
    ``summary.json`` into ``out_dir``.

    ``extra_metrics``: ``{name: (before, after)}`` further fractions shown in percent (each a
    number, None or ``{seed: number}``; e.g. the world's prior-partner hallucination rate).
    ``settings``: ``{name: value}`` shown as the setup table. ``examples``: up to a few dicts
    ``{"id", "truth", "before", "after"}`` (ground-truth objects and the two captions) shown as
    a table. ``notes``: extra Markdown paragraphs (e.g. what an investigation found).
    Returns ``{"report", "summary_json", "chair_plot", "training_plot", "table", "summary"}``.
    """
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir: expected a path, got {type(out_dir).__name__}")
    if not (isinstance(recall_tolerance, (int, float)) and 0 <= recall_tolerance <= 1):
        raise ValueError(f"recall_tolerance: expected a fraction in [0, 1], got {recall_tolerance!r}")
    os.makedirs(out_dir, exist_ok=True)
    summ = summarize(chair_before, chair_after, metrics)
    table = format_table(chair_before, chair_after)
    chair_png = plot_chair(chair_before, chair_after, os.path.join(out_dir, "chair.png"))
    train_png = None
    if summ["training"]:
        train_png = plot_training(metrics, os.path.join(out_dir, "training.png"))

    md = [f"# {title}", ""]
    if settings:
        md += ["## Setup", "", "| setting | value |", "|---|---|"]
        md += [f"| {_md_escape(k)} | {_md_escape(v)} |" for k, v in settings.items()]
        md.append("")
    md += ["## Hallucination (CHAIR) on held-out images", "",
           "CHAIR-i: hallucinated object mentions / all mentions. CHAIR-s: captions with at least "
           "one hallucinated object / all captions. Recall: ground-truth objects mentioned / all "
           "ground-truth objects. Before = the supervised model, after = the same model after "
           "BPO.", "", "```", table, "```", ""]
    md += _verdict(summ, recall_tolerance)
    extra = _extra_rows(extra_metrics)
    if extra:
        md += ["", "| further metric (%, mean over seeds) | before | after |", "|---|---|---|"]
        md += [f"| {_md_escape(n)} | {_pct(b)} | {_pct(a)} |" for n, b, a, _ in extra]
        summ["extra"] = {n: {"before_mean": b, "after_mean": a, "n": k} for n, b, a, k in extra}
    md += ["", "![CHAIR before and after BPO](chair.png)", ""]
    md += ["## DPO training", ""]
    if train_png:
        md += _training_text(summ) + ["", "![DPO training curves](training.png)", ""]
    else:
        md += ["No training metrics were given.", ""]
    if examples:
        md += ["## Examples (held-out images)", "", "| id | objects in the image | before BPO | after BPO |",
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
    _atomic_write(summary_json, json.dumps({"title": title, "settings": settings or {}, **summ},
                                           indent=1, default=str))
    return {"report": report, "summary_json": summary_json, "chair_plot": chair_png,
            "training_plot": train_png, "table": table, "summary": summ}
