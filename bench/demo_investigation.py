"""What BPO needs on the demo's world: run demo configurations scored on the VALIDATION split.

Every configuration runs the demo's stages (:func:`bpo_fast.demo.pipeline.run_seed`) with
``score_split="val"`` (settings are chosen on the validation images, never on the held-out ones)
and appends one JSON line per configuration to ``--results`` (per seed and mean: CHAIR-i,
CHAIR-s, recall, prior-partner hallucination and POPE prior/random accuracy of the SFT start,
BPO and the supervised control). ``--base DIR`` copies the finished upstream stages (world,
pretraining, alignment, pairs, the SFT start's answers) of an earlier configuration's folder
first; a stage whose settings differ is recomputed anyway (the stage keys decide).

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
             "captions_control.jsonl.done", "pope_control.jsonl", "pope_control.jsonl.done")


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
    row = {}
    for arm, chair_key, prior_key, pope_key in (("sft", "before", "prior_before", "before"),
                                                ("bpo", "after", "prior_after", "after"),
                                                ("control", "control", "prior_control",
                                                 "control")):
        ch = r[chair_key]
        pope = r["pope"][pope_key]
        pd = pope.to_dict(details=False) if pope is not None else None
        row[arm] = {"chair_i": ch.chair_i, "chair_s": ch.chair_s, "recall": ch.recall,
                    "prior_halluc": r[prior_key],
                    "pope_prior_acc": pd["settings"]["prior"]["accuracy"] if pd else None,
                    "pope_random_acc": pd["settings"]["random"]["accuracy"] if pd else None,
                    "pope_prior_yes": pd["settings"]["prior"]["yes_ratio"] if pd else None}
    return row


def run(name, overrides, seeds, root, base, results, threads):
    import torch

    from bpo_fast.demo import pipeline

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


def markdown(results):
    """The results file as a Markdown table: means over seeds (SFT / BPO / control) and, for the
    aim, in how many seeds BPO beat both the SFT start and the control."""
    lines = ["| config | seeds | CHAIR-i SFT / BPO / ctl | BPO<both (CHAIR-i) | recall SFT / BPO / ctl "
             "| prior-partner halluc. SFT / BPO / ctl | POPE prior acc SFT / BPO / ctl "
             "| BPO>both (POPE prior) | wall |",
             "|---|---|---|---|---|---|---|---|---|"]
    with open(results, encoding="utf-8") as f:
        recs = [json.loads(line) for line in f if line.strip()]
    for rec in recs:
        ps = list(rec["per_seed"].values())

        def trio(k):
            return " / ".join(_p(_mean([s[a][k] for s in ps])) for a in ("sft", "bpo", "control"))

        def wins(k, lower):
            n = 0
            for s in ps:
                b, c, sft = s["bpo"][k], s["control"][k], s["sft"][k]
                if None in (b, c, sft):
                    continue
                n += (b < c and b < sft) if lower else (b > c and b > sft)
            return f"{n}/{len(ps)}"

        over = " ".join(rec["overrides"]) or "(defaults)"
        lines.append(f"| {rec['name']}: `{over}` | {len(ps)} | {trio('chair_i')} | "
                     f"{wins('chair_i', True)} | {trio('recall')} | {trio('prior_halluc')} | "
                     f"{trio('pope_prior_acc')} | {wins('pope_prior_acc', False)} | "
                     f"{rec['wall_s']:.0f}s |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="field=value (world.field=value)")
    ap.add_argument("--name")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--root", default="/tmp/demo_inv")
    ap.add_argument("--base", default=None, help="copy finished upstream stages from this folder")
    ap.add_argument("--results", default="docs/demo-investigation.jsonl")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: the free CPUs)")
    ap.add_argument("--markdown", action="store_true", help="print the results as a table")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(args.results))
        return 0
    if not args.name:
        ap.error("--name is required")
    rec = run(args.name, args.overrides, [int(s) for s in args.seeds.split(",")], args.root,
              args.base, args.results, args.threads)
    for s, row in rec["per_seed"].items():
        print(s, json.dumps({a: {k: (None if v is None else round(100 * v, 1))
                                 for k, v in d.items()} for a, d in row.items()}))
    print(f"wall {rec['wall_s']}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
