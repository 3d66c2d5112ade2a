"""Wall and CPU time of ``bpo-fast demo``'s stages: this tree against an earlier one.

Each measurement is one fresh process (``PYTHONPATH`` = the tree), so imports, thread pools and
caches start cold as in a user's run; the variants are interleaved (round robin, rotating
start) and the medians reported, because the machine may be shared. Cases:

- ``sft``: the supervised stage (:func:`bpo_fast.demo.sft.sft_train` on the world's records,
  pre-processing included) of a tiny LLaVA, with the model and SFT settings fixed below (the
  2d774a4 demo's: both trees do the same work whatever their demo defaults are),
- ``generate``: greedy captions of the held-out images plus three yes/no questions per image
  (the demo's caption and POPE generation) by a trained SFT model,
- ``quick``: the whole ``bpo-fast demo --quick`` command.

Threads: the earlier tree runs with torch's default (what its demo did); this tree with
:func:`bpo_fast.runtime.use_threads` (the CPUs other processes leave free). ``--busy`` runs a
busy-looping process beside every measurement (the shared-machine case).

    git worktree add /tmp/bpo_old <commit>      # the tree to compare against
    python bench/demo_speed.py --old /tmp/bpo_old --cases sft,generate,quick --reps 3
    python bench/demo_speed.py --old /tmp/bpo_old --cases sft --reps 2 --busy
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --------------------------------------------------------------------------------------------
# worker (runs inside the tree under test)
# --------------------------------------------------------------------------------------------


def _threads(new):
    import torch

    if new:
        from bpo_fast.runtime import use_threads

        return use_threads(None)
    return torch.get_num_threads()


# The model and SFT settings of the measurement, fixed here (the 2d774a4 demo's defaults) so
# that both trees do the same work whatever their DemoConfig says.
MODEL = dict(image_size=64, patch_size=32, hidden=128, layers=2, heads=4)
SFT = dict(epochs=4, batch_size=32, lr=1e-3, max_new_tokens=48)


def _tiny(world_cfg):
    from bpo_fast.demo.world import world_vocabulary
    from bpo_fast.models.tiny import TinyLlavaConfig, build_tiny_llava

    h = MODEL["hidden"]
    tiny = TinyLlavaConfig(
        image_size=MODEL["image_size"], patch_size=MODEL["patch_size"], vision_hidden=h,
        hidden_size=h, intermediate_size=2 * h, num_layers=MODEL["layers"],
        num_heads=MODEL["heads"], num_kv_heads=MODEL["heads"], vision_heads=MODEL["heads"],
        words=world_vocabulary(world_cfg) + ["user", "assistant", ":"],
        image_mean=tuple(c / 255 for c in world_cfg.background), image_std=(0.5,) * 3)
    return build_tiny_llava(None, tiny, seed=0)


def worker(args):
    import torch

    from bpo_fast.demo.pipeline import DemoConfig

    has_chooser = _has_chooser()
    threads = _threads(has_chooser)
    cfg = DemoConfig()
    world = json.load(open(os.path.join(args.world, "paths.json")))
    t0 = time.perf_counter()
    out = {"threads": threads}
    if args.worker == "sft":
        from bpo_fast.demo.sft import sft_train

        model, processor = _tiny(cfg.world)
        t0 = time.perf_counter()
        losses = sft_train(model, processor, world["train"], world["images"],
                           epochs=SFT["epochs"], batch_size=SFT["batch_size"], lr=SFT["lr"],
                           seed=0)
        out.update(steps=len(losses), last_loss=losses[-1])
        if args.save:
            model.save_pretrained(args.save)
            processor.save_pretrained(args.save)
    else:
        from PIL import Image
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        from bpo_fast.demo.sft import generate_answers
        from bpo_fast.demo.world import EVAL_PROMPT

        model = LlavaForConditionalGeneration.from_pretrained(args.model, local_files_only=True)
        processor = AutoProcessor.from_pretrained(args.model, local_files_only=True)
        records = json.load(open(world["eval"]))
        images = [Image.open(os.path.join(world["images"], r["image"])).convert("RGB")
                  for r in records]
        objs = cfg.world.objects
        t0 = time.perf_counter()
        caps = generate_answers(model, processor, images, EVAL_PROMPT,
                                max_new_tokens=SFT["max_new_tokens"])
        qs = [f"is there a {objs[(i + k) % len(objs)]} in the image?"
              for i in range(len(images)) for k in range(3)]
        yes_no = generate_answers(model, processor, [im for im in images for _ in range(3)], qs,
                                  max_new_tokens=3)
        out.update(captions=len(caps), questions=len(yes_no),
                   mean_caption_words=sum(len(c.split()) for c in caps) / max(1, len(caps)))
    out["seconds"] = time.perf_counter() - t0
    out["torch_threads_end"] = torch.get_num_threads()
    print("RESULT " + json.dumps(out), flush=True)


def _has_chooser():
    try:
        from bpo_fast.runtime import use_threads  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------


def _run(tree, argv):
    """Run ``argv`` with ``PYTHONPATH=tree``; (wall seconds, output). Raises when it fails."""
    env = dict(os.environ, PYTHONPATH=tree, TQDM_DISABLE="1")
    t0 = time.perf_counter()
    p = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       cwd=tempfile.gettempdir(), text=True)
    wall = time.perf_counter() - t0
    if p.returncode:
        raise RuntimeError(f"{argv} in {tree} failed ({p.returncode}):\n{p.stdout[-3000:]}")
    return wall, p.stdout


def _measure(tree, argv):
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall, text = _run(tree, argv)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    nivcsw = after.ru_nivcsw - before.ru_nivcsw
    result = None
    for line in text.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[7:])
    return {"wall_s": wall, "cpu_s": cpu, "nivcsw": nivcsw, "result": result}


def _make_world(n_train, n_eval, path):
    from bpo_fast.demo.pipeline import DemoConfig
    from bpo_fast.demo.world import make_world

    w = make_world(path, n_train, n_eval, 0, DemoConfig().world)
    paths = {"train": w.train, "eval": w.eval, "images": w.images}
    with open(os.path.join(path, "paths.json"), "w") as f:
        json.dump(paths, f)


def _stats(xs):
    xs = sorted(xs)
    q = lambda p: xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))]  # noqa: E731
    return statistics.median(xs), q(0.2), q(0.8)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", help="the tree to compare against (a checkout)")
    ap.add_argument("--old-label", default=None, help="its commit, for the results (default: "
                                                      "git rev-parse in --old)")
    ap.add_argument("--new-label", default=None, help="the same for --new")
    ap.add_argument("--new", default=ROOT, help="the tree under test (default: this one)")
    ap.add_argument("--cases", default="sft,generate,quick")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--n-train", type=int, default=1200, help="training images of the sft case")
    ap.add_argument("--n-eval", type=int, default=200, help="held-out images of generate")
    ap.add_argument("--busy", action="store_true", help="a busy-looping process beside")
    ap.add_argument("--out", default=None, help="results JSON (default: bench/results/"
                                                "demo_speed-cpu[-busy].json)")
    ap.add_argument("--keep", default=None, help="keep the work folder here")
    ap.add_argument("--worker", choices=("sft", "generate"), help=argparse.SUPPRESS)
    ap.add_argument("--world", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--save", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    if not args.old:
        ap.error("--old: the tree to compare against is required")

    sys.path.insert(0, ROOT)
    from bench.common import row, write_results

    work = args.keep or tempfile.mkdtemp(prefix="demo_speed_")
    os.makedirs(work, exist_ok=True)
    impls = {"bpo_fast": os.path.abspath(args.new), "before": os.path.abspath(args.old)}
    shas = {k: subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=v, text=True,
                              capture_output=True).stdout.strip() or "unknown"
            for k, v in impls.items()}
    if args.old_label:
        shas["before"] = args.old_label
    if args.new_label:
        shas["bpo_fast"] = args.new_label
    me = [sys.executable, os.path.abspath(__file__)]
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy else None
    rows = []
    try:
        world = os.path.join(work, "world")
        if not os.path.isfile(os.path.join(world, "paths.json")):
            _make_world(args.n_train, args.n_eval, world)
        model = os.path.join(work, "sft_model")
        if "generate" in cases and not os.path.isfile(os.path.join(model, "config.json")):
            _run(impls["bpo_fast"], me + ["--worker", "sft", "--world", world, "--save", model])
        for case in cases:
            runs = {k: [] for k in impls}
            for rep in range(args.reps):
                order = list(impls) if rep % 2 == 0 else list(impls)[::-1]
                for impl in order:
                    if case == "quick":
                        out = os.path.join(work, f"quick_{impl}_{rep}")
                        shutil.rmtree(out, ignore_errors=True)
                        argv = [sys.executable, "-m", "bpo_fast.cli", "demo", "--quick",
                                "--out", out]
                    elif case == "sft":
                        argv = me + ["--worker", "sft", "--world", world]
                    else:
                        argv = me + ["--worker", "generate", "--world", world, "--model", model]
                    m = _measure(impls[impl], argv)
                    runs[impl].append(m)
                    print(f"{case:9s} {impl:9s} rep {rep}: wall {m['wall_s']:.1f}s cpu "
                          f"{m['cpu_s']:.1f}s invol. switches {m['nivcsw']} "
                          f"{json.dumps(m['result']) if m['result'] else ''}", flush=True)
            base = statistics.median(m["wall_s"] for m in runs["before"])
            for impl, ms in runs.items():
                med, p20, p80 = _stats([m["wall_s"] * 1000 for m in ms])
                res = [m["result"] for m in ms if m["result"]]
                label = ("demo --quick" if case == "quick" else
                         f"{case} n_train={args.n_train}" if case == "sft" else
                         f"{case} n_eval={args.n_eval}")
                rows.append(row(
                    label + (" +1 busy process" if args.busy else ""), impl,
                    median_ms=med, p20_ms=p20, p80_ms=p80, pass_="wall",
                    params={"case": case, "n_train": args.n_train, "n_eval": args.n_eval,
                            "busy_processes": int(args.busy), "reps": args.reps,
                            "tree": shas[impl],
                            "threads": [r.get("threads") for r in res] or None},
                    cpu_s_median=statistics.median(m["cpu_s"] for m in ms),
                    nivcsw_median=statistics.median(m["nivcsw"] for m in ms),
                    stage_s=[round(r["seconds"], 2) for r in res] or None,
                    walls_s=[round(m["wall_s"], 2) for m in ms],
                    speedup_vs_before=base / statistics.median(m["wall_s"] for m in ms)))
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()
    path = write_results(
        "demo_speed", rows,
        {"note": "CPU, 2 cores, SHARED with other engineers' jobs (load average at the end "
                 f"{load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}): variants interleaved, medians; "
                 "wall and CPU of fresh processes"},
        extra_versions={"before": shas["before"], "bpo_fast": shas["bpo_fast"]},
        path=args.out or os.path.join(ROOT, "bench", "results",
                                      "demo_speed-cpu-busy.json" if args.busy
                                      else "demo_speed-cpu.json"))
    for r in rows:
        print(f"{r['case']:45s} {r['impl']:9s} median wall {r['median_ms'] / 1000:7.1f}s  cpu "
              f"{r['cpu_s_median']:6.1f}s  x{r['speedup_vs_before']:.2f}")
    print(path)


if __name__ == "__main__":
    main()
