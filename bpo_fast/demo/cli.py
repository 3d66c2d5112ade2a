"""``bpo-fast demo``: BPO end to end on the built-in shapes world (see :mod:`bpo_fast.demo.pipeline`)."""

from bpo_fast.errors import UserError, int_at_least, output_dir


def add_arguments(parser):
    parser.add_argument("--out", default="demo_out", help="output folder (default: demo_out); "
                        "a finished stage found there with the same settings is reused")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the models run (default: cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the world and every stage")
    parser.add_argument("--seeds", default=None,
                        help="several seeds, comma-separated (e.g. 0,1,2): one run each, one report")
    parser.add_argument("--quick", action="store_true",
                        help="a small run (under 2 minutes on 2 CPU cores): checks the pipeline, "
                             "its numbers are not meaningful")
    parser.add_argument("--threads", type=int_at_least(1), default=None,
                        help="torch CPU threads (default: torch's choice)")


def _seeds(args):
    if args.seeds is None:
        return (args.seed,)
    try:
        seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
    except ValueError:
        raise UserError(f"--seeds: expected comma-separated integers, got {args.seeds!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds: expected distinct integers, got {args.seeds!r}")
    return seeds


def run(args):
    import torch

    from bpo_fast.demo.pipeline import DemoConfig, main_table, run_demo

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available")
    output_dir(args.out, "--out")
    kw = dict(out=args.out, device=args.device, seeds=_seeds(args), threads=args.threads)
    cfg = DemoConfig.quick(**kw) if args.quick else DemoConfig(**kw)
    report = run_demo(cfg)
    main_table(report)
    return 0
