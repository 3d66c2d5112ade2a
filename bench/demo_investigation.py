"""What BPO needs on the demo's world: run demo configurations scored on the VALIDATION split.

Every configuration runs the demo's stages (:func:`bpo_fast.demo.pipeline.run_seed`) with
``score_split="val"`` (settings are chosen on the validation images, never on the held-out ones)
and appends one JSON line per configuration to ``--results`` (per seed and mean: CHAIR-i,
CHAIR-s, recall, prior-partner hallucination and POPE prior/random accuracy of the SFT start,
BPO, BPO with the paper's objective and the supervised control, and the training diagnostics of
the two DPO arms: DPO loss, chosen NLL, implicit reward margins, each term's gradient norm).
``--base DIR`` copies the finished upstream stages (world, pretraining, alignment, pairs, the
SFT start's answers, the paper arm and the control) of an earlier configuration's folder
first; a stage whose settings differ is recomputed anyway (the stage keys decide).

Only selection seeds: a seed the demo reports on (``bpo_fast.demo.pipeline.REPORT_SEEDS``) is
refused before anything runs, so the demo's results never come from a model a choice was made
on.

    python bench/demo_investigation.py --name beta0.3 --seeds 0,1,2 beta=0.3 \\
        --base /tmp/demo_inv/default

Overrides are ``field=value`` of :class:`bpo_fast.demo.pipeline.DemoConfig` (``world.field=value``
for the :class:`bpo_fast.demo.world.WorldConfig`); values are parsed as JSON when they parse.
``--markdown`` prints the results file as the table kept in docs/demo-investigation.md.
"""

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time

_UPSTREAM = ("world", "pretrain_model", "sft_model", "pairs", "stage_times.json",
             "captions_before.jsonl", "captions_before.jsonl.done", "pope_before.jsonl",
             "pope_before.jsonl.done", "control_model", "captions_control.jsonl",
             "captions_control.jsonl.done", "pope_control.jsonl", "pope_control.jsonl.done",
             "paper_model", "captions_paper.jsonl", "captions_paper.jsonl.done",
             "pope_paper.jsonl", "pope_paper.jsonl.done")
# what the record keeps of each DPO arm's training (bpo_fast.demo.report._training_summary)
_TRAIN_KEYS = ("loss", "nll", "logratio_margin", "logratio_margin_per_token", "grad_norm_dpo",
               "grad_norm_rpo", "grad_cos_dpo_rpo", "reward_accuracy")


def _value(text):
    try:
        return json.loads(text)
    except ValueError:
        return text


def make_config(overrides, **base):
    from bpo_fast.demo.pipeline import DemoConfig
    from bpo_fast.demo.world import WorldConfig

    cfg = DemoConfig(**base)
    world_kw = {}
    kw = {}
    for item in overrides:
        if "=" not in item:
            raise SystemExit(f"override {item!r}: expected field=value")
        k, v = item.split("=", 1)
        if k.startswith("world."):
            world_kw[k[6:]] = _value(v)
        else:
            kw[k] = _value(v)
    if world_kw:
        kw["world"] = WorldConfig(**{**cfg.world.to_dict(), **world_kw})
    return dataclasses.replace(cfg, **kw)


def _row(r):
    from bpo_fast.demo.report import _training_summary, load_metrics

    row = {}
    for arm, chair_key, prior_key, pope_key in (("sft", "before", "prior_before", "before"),
                                                ("bpo", "after", "prior_after", "after"),
                                                ("paper", "paper", "prior_paper", "paper"),
                                                ("control", "control", "prior_control",
                                                 "control")):
        ch = r[chair_key]
        if ch is None:
            continue
        pope = r["pope"][pope_key]
        pd = pope.to_dict(details=False) if pope is not None else None
        row[arm] = {"chair_i": ch.chair_i, "chair_s": ch.chair_s, "recall": ch.recall,
                    "prior_halluc": r[prior_key],
                    "pope_prior_acc": pd["settings"]["prior"]["accuracy"] if pd else None,
                    "pope_random_acc": pd["settings"]["random"]["accuracy"] if pd else None,
                    "pope_prior_yes": pd["settings"]["prior"]["yes_ratio"] if pd else None}
    for arm, key in (("bpo", "metrics"), ("paper", "paper_metrics")):
        if r.get(key):
            tr = _training_summary(load_metrics(r[key]))
            row[arm]["training"] = {"steps": tr["steps"],
                                    **{k: tr[k] for k in _TRAIN_KEYS if k in tr}}
    return row


def run(name, overrides, seeds, root, base, results, threads):
    import torch

    from bpo_fast.demo import pipeline

    pipeline.check_selection_seeds(seeds)   # never a report seed, before anything runs
    if threads:
        torch.set_num_threads(threads)
    else:   # the CPUs other processes leave free, followed while it runs (as bpo-fast demo)
        from bpo_fast.runtime import use_threads

        use_threads(None)
    cfg = make_config(overrides, out=os.path.join(root, name), seeds=tuple(seeds),
                      score_split="val", threads=threads)
    t0 = time.time()
    per_seed = {}
    for s in seeds:
        src = os.path.join(base, f"seed{s}") if base else None
        dst = os.path.join(cfg.out, f"seed{s}")
        if src and os.path.isdir(src) and not os.path.exists(dst):
            os.makedirs(dst)
            for item in _UPSTREAM:
                p = os.path.join(src, item)
                if os.path.isdir(p):
                    shutil.copytree(p, os.path.join(dst, item))
                elif os.path.isfile(p):
                    shutil.copy2(p, os.path.join(dst, item))
        per_seed[s] = _row(pipeline.run_seed(cfg, s))
    rec = {"name": name, "overrides": overrides, "seeds": seeds, "per_seed": per_seed,
           "wall_s": round(time.time() - t0, 1), "time": time.strftime("%Y-%m-%d %H:%M")}
    with open(results, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")
    return rec


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _p(x):
    return "n/a" if x is None else f"{100 * x:.1f}"


def _shown(x):
    """The rule of the demo's report: a value as its tables print it (a printed tie is a tie)."""
    from bpo_fast.demo.report import _shown as shown

    return shown(x)


def _records(results):
    """(record, its per-seed rows) of each line of the results file."""
    with open(results, encoding="utf-8") as f:
        recs = [json.loads(line) for line in f if line.strip()]
    return [(rec, list(rec["per_seed"].values())) for rec in recs]


def markdown(results):
    """The results file as a Markdown table: means over seeds (SFT / BPO / control) and, for the
    aim, in how many seeds BPO beat both the SFT start and the control."""
    lines = ["| config | seeds | CHAIR-i SFT / BPO / ctl | BPO<both (CHAIR-i) | recall SFT / BPO / ctl "
             "| prior-partner halluc. SFT / BPO / ctl | POPE prior acc SFT / BPO / ctl "
             "| BPO>both (POPE prior) | wall |",
             "|---|---|---|---|---|---|---|---|---|"]
    for rec, ps in _records(results):

        def trio(k):
            return " / ".join(_p(_mean([s[a][k] for s in ps])) for a in ("sft", "bpo", "control"))

        def wins(k, lower):
            n = 0
            for s in ps:
                b, c, sft = s["bpo"][k], s["control"][k], s["sft"][k]
                if None in (b, c, sft):
                    continue
                b, c, sft = _shown(b), _shown(c), _shown(sft)   # a printed tie is a tie
                n += (b < c and b < sft) if lower else (b > c and b > sft)
            return f"{n}/{len(ps)}"

        over = " ".join(rec["overrides"]) or "(defaults)"
        lines.append(f"| {rec['name']}: `{over}` | {len(ps)} | {trio('chair_i')} | "
                     f"{wins('chair_i', True)} | {trio('recall')} | {trio('prior_halluc')} | "
                     f"{trio('pope_prior_acc')} | {wins('pope_prior_acc', False)} | "
                     f"{rec['wall_s']:.0f}s |")
    return "\n".join(lines)


def diagnostics_markdown(results):
    """The records that carry the paper arm and the training diagnostics, as a Markdown table:
    CHAIR-i of every arm (mean over seeds), BPO minus the control per seed and its record
    (wins / ties / losses on the printed values), the prior-partner rate, recall, and per DPO
    arm the DPO loss at the end, the implicit reward margin per token at the end and the mean
    gradient norm of each term."""
    lines = ["| config | seeds | CHAIR-i SFT / BPO / paper / ctl | BPO - ctl per seed | W/T/L "
             "vs ctl | paper - ctl mean | prior-partner BPO / paper / ctl | recall SFT / BPO / "
             "paper | DPO loss end BPO / paper | margin/token end BPO / paper | grad DPO / RPO "
             "(BPO), DPO (paper) | wall |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for rec, ps in _records(results):
        if not all("paper" in s or "training" in s.get("bpo", {}) for s in ps):
            continue

        def mean(arm, k):
            return _p(_mean([s[arm][k] for s in ps if arm in s]))

        def tr(arm, k, part, fmt):
            vals = [s[arm]["training"][k][part] for s in ps
                    if arm in s and k in s[arm].get("training", {})]
            return fmt.format(_mean(vals)) if vals else "n/a"

        diffs = [_shown(s["bpo"]["chair_i"]) - _shown(s["control"]["chair_i"]) for s in ps]
        pdiff = [s["paper"]["chair_i"] - s["control"]["chair_i"] for s in ps if "paper" in s]
        wtl = (f"{sum(d < 0 for d in diffs)}/{sum(d == 0 for d in diffs)}/"
               f"{sum(d > 0 for d in diffs)}")
        over = " ".join(rec["overrides"]) or "(defaults)"
        lines.append(
            f"| {rec['name']}: `{over}` | {','.join(map(str, rec['seeds']))} | "
            + " / ".join(mean(a, "chair_i") for a in ("sft", "bpo", "paper", "control"))
            + f" | {' '.join(f'{d:+.1f}' for d in diffs)} | {wtl} | "
            + (f"{100 * _mean(pdiff):+.1f}" if pdiff else "n/a") + " | "
            + " / ".join(mean(a, "prior_halluc") for a in ("bpo", "paper", "control")) + " | "
            + " / ".join(mean(a, "recall") for a in ("sft", "bpo", "paper")) + " | "
            + f"{tr('bpo', 'loss', 'end', '{:.3f}')} / {tr('paper', 'loss', 'end', '{:.3f}')} | "
            + f"{tr('bpo', 'logratio_margin_per_token', 'end', '{:+.3f}')} / "
            + f"{tr('paper', 'logratio_margin_per_token', 'end', '{:+.3f}')} | "
            + f"{tr('bpo', 'grad_norm_dpo', 'mean', '{:.2f}')} / "
            + f"{tr('bpo', 'grad_norm_rpo', 'mean', '{:.2f}')}, "
            + f"{tr('paper', 'grad_norm_dpo', 'mean', '{:.2f}')} | {rec['wall_s']:.0f}s |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="field=value (world.field=value)")
    ap.add_argument("--name")
    ap.add_argument("--seeds", default="0,1,2,3,4", help="selection seeds only (a report seed "
                                                          "of the demo is refused)")
    ap.add_argument("--root", default="/tmp/demo_inv")
    ap.add_argument("--base", default=None, help="copy finished upstream stages from this folder")
    ap.add_argument("--results", default="docs/demo-investigation.jsonl")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: the free CPUs)")
    ap.add_argument("--markdown", action="store_true", help="print the results as a table")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(args.results))
        print()
        print(diagnostics_markdown(args.results))
        return 0
    if not args.name:
        ap.error("--name is required")
    seeds = [int(s) for s in args.seeds.split(",")]
    from bpo_fast.demo.pipeline import check_selection_seeds

    try:
        check_selection_seeds(seeds)
    except ValueError as e:
        ap.error(f"--{e}")
    rec = run(args.name, args.overrides, seeds, args.root, args.base, args.results, args.threads)
    for s, row in rec["per_seed"].items():
        print(s, json.dumps({a: {k: (None if v is None else round(100 * v, 1))
                                 for k, v in d.items() if k != "training"}
                             for a, d in row.items()}))
    print(f"wall {rec['wall_s']}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
