"""``bpo-fast demo``: BPO end to end on the built-in shapes world (see :mod:`bpo_fast.demo.pipeline`)."""

import sys
from dataclasses import dataclass

from bpo_fast.errors import UserError, output_dir
from bpo_fast.options import add_arguments as add_options
from bpo_fast.options import from_args, option, parse_device, threads_option


@dataclass
class DemoOptions:
    """The options of ``bpo-fast demo``."""

    out: str = option("demo_out", help="output folder; a finished stage found there with the "
                                       "same settings is reused", metavar="DIR")
    device: str = option("cpu", help="where the models run: cpu, cuda or cuda:N",
                         type=parse_device, metavar="DEVICE")
    seed: int = option(None, help="run this one seed only (the world's and every stage's)",
                       default_text="seeds 0-4 (--quick: 0)")
    seeds: str = option(None, help="the seeds, comma-separated (e.g. 0,1,2): one run each, "
                                   "one report", metavar="LIST", default_text="0,1,2,3,4")
    quick: bool = option(False, help="a small run (under 2 minutes on 2 CPU cores): checks the "
                                     "pipeline, its numbers are not meaningful")
    threads: int = threads_option()


def add_arguments(parser):
    add_options(parser, DemoOptions)


def _seeds(args):
    """The seeds asked for, or None (the config's default: 5 seeds, ``--quick`` 1)."""
    if args.seeds is not None and args.seed is not None:
        raise UserError("--seed/--seeds: give one of them")
    if args.seeds is None:
        return None if args.seed is None else (args.seed,)
    try:
        seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
    except ValueError:
        raise UserError(f"--seeds: expected comma-separated integers, got {args.seeds!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds: expected distinct integers, got {args.seeds!r}")
    return seeds


def run(args):
    import torch

    from bpo_fast.demo.pipeline import DemoConfig, main_table, run_demo, stopped_at
    from bpo_fast.errors import DIR, FILE, CommandGuard
    from bpo_fast.options import config_file_of

    args = from_args(DemoOptions, args)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: no CUDA GPU is available")
    output_dir(args.out, "--out")
    kw = dict(out=args.out, device=args.device, threads=args.threads)
    seeds = _seeds(args)
    if seeds is not None:
        kw["seeds"] = seeds
    cfg = DemoConfig.quick(**kw) if args.quick else DemoConfig(**kw)
    from bpo_fast.runtime import console

    with CommandGuard("demo", inputs=[("--config", config_file_of(args), FILE)],
                      outputs=[("--out", args.out, DIR)], status=lambda: stopped_at(args.out)), \
            console():
        report = run_demo(cfg)
    main_table(report, file=sys.stdout)  # the stdout of now (its default is bound at import)
    return 0
