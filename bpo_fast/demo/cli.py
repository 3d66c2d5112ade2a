"""``bpo-fast demo``: BPO end to end on the built-in shapes world (see :mod:`bpo_fast.demo.pipeline`)."""

import dataclasses
import sys
from dataclasses import dataclass

from bpo_fast.demo.pipeline import REPORT_SEEDS, DemoConfig
from bpo_fast.errors import UserError, output_dir
from bpo_fast.options import add_arguments as add_options
from bpo_fast.options import from_args, option, parse_device, threads_option
from bpo_fast.train.config import TrainConfig

_BPO = ("BPO stage (the options of `bpo-fast train`; a change re-runs the BPO arm and what "
        "follows it, every earlier stage is reused from --out)")
# DemoOptions field (named as in TrainConfig, so a train config's keys read the same) ->
# DemoConfig field
_STAGE_FIELDS = {"beta": "beta", "loss_type": "loss_type", "rpo_alpha": "rpo_alpha",
                 "learning_rate": "dpo_lr", "epochs": "dpo_epochs",
                 "batch_size": "dpo_batch_size"}


def _stage_option(name, parse=None):
    """The option ``name`` of ``bpo-fast train`` (its help, choices, type, bounds and aliases
    declared once, in :class:`~bpo_fast.train.config.TrainConfig`) with the demo's own default
    (:class:`~bpo_fast.demo.pipeline.DemoConfig`)."""
    f = {f.name: f for f in dataclasses.fields(TrainConfig)}[name]
    m = f.metadata
    default = DemoConfig.__dataclass_fields__[_STAGE_FIELDS[name]].default
    if parse is None:   # rpo_alpha's train default is None: its values are floats
        parse = m.get("type") or (float if f.default is None else type(f.default))
    return option(None, help=m["help"], choices=m.get("choices"), type=parse, group=_BPO,
                  aliases=m.get("aliases", ()), bounds=m.get("bounds"),
                  metavar=m.get("metavar") or ("X" if parse is float else "N" if parse is not str
                                               else None),
                  default_text=str(default))


@dataclass
class DemoOptions:
    """The options of ``bpo-fast demo``."""

    out: str = option("demo_out", help="output folder; a finished stage found there with the "
                                       "same settings is reused", metavar="DIR")
    device: str = option("cpu", help="where the models run: cpu, cuda or cuda:N",
                         type=parse_device, metavar="DEVICE")
    seed: int = option(None, help="run this one seed only (the world's and every stage's)",
                       default_text=f"seeds {REPORT_SEEDS[0]}-{REPORT_SEEDS[-1]} (--quick: "
                                    f"{REPORT_SEEDS[0]})")
    seeds: str = option(None, help="the seeds, comma-separated (e.g. 100,101): one run each, "
                                   "one report; the default seeds took part in no choice of "
                                   "the settings (seeds 0-4 did)", metavar="LIST",
                        default_text=",".join(map(str, REPORT_SEEDS)))
    quick: bool = option(False, help="a small run (under 2 minutes on 2 CPU cores): checks the "
                                     "pipeline, its numbers are not meaningful")
    threads: int = threads_option()
    beta: float = _stage_option("beta")
    loss_type: str = _stage_option("loss_type", parse=str)
    rpo_alpha: float = _stage_option("rpo_alpha")
    learning_rate: float = _stage_option("learning_rate")
    epochs: int = _stage_option("epochs", parse=int)
    batch_size: int = _stage_option("batch_size", parse=int)
    paper: bool = option(True, help="no arm with the paper's objective (plain DPO: sigmoid, "
                                    "beta 0.1, no NLL term)", cli="no-paper-arm", group=_BPO)


def add_arguments(parser):
    add_options(parser, DemoOptions)


def _seeds(args):
    """The seeds asked for, or None (the config's default: the report seeds, ``--quick`` 1)."""
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


def _stage_settings(args):
    """The BPO-stage options given (on the command line or in --config), as DemoConfig fields,
    checked now rather than after the earlier stages have run."""
    from bpo_fast.ops.losses import check_rpo_alpha, loss_config

    kw = {_STAGE_FIELDS[k]: getattr(args, k) for k in _STAGE_FIELDS
          if getattr(args, k) is not None}
    beta = kw.get("beta", DemoConfig.beta)
    loss = kw.get("loss_type", DemoConfig.loss_type)
    try:
        loss_config(loss, beta)
    except (ValueError, TypeError) as e:
        raise UserError(f"--loss-type/--beta: {e}") from None
    try:
        check_rpo_alpha(kw.get("rpo_alpha"))
    except (ValueError, TypeError) as e:
        raise UserError(f"--rpo-alpha: {e}") from None
    lr = kw.get("dpo_lr")
    if lr is not None and not (isinstance(lr, (int, float)) and 0 <= lr < float("inf")):
        raise UserError(f"--learning-rate: expected a number >= 0, got {lr!r}")
    for flag, name in (("--epochs", "dpo_epochs"), ("--batch-size", "dpo_batch_size")):
        v = kw.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise UserError(f"{flag}: expected an integer >= 1, got {v!r}")
    kw["paper"] = args.paper
    return kw


def run(args):
    import torch

    from bpo_fast.demo.pipeline import main_table, run_demo, stopped_at
    from bpo_fast.errors import DIR, FILE, CommandGuard
    from bpo_fast.options import config_file_of

    args = from_args(DemoOptions, args)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: no CUDA GPU is available")
    output_dir(args.out, "--out")
    kw = dict(out=args.out, device=args.device, threads=args.threads, **_stage_settings(args))
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
