"""bpo-fast: fast BPO/DPO preference training for vision-language models.

Build preference pairs the BPO way (image-weakened prompting, error injection), precompute
reference log-probs, train with DPO (Triton log-prob and loss kernels, FSDP2 over GPUs), generate
a model's answers, and score them with CHAIR and POPE. Every command takes --help; bad input ends in one line naming the
argument or file (exit status 2).

Each subcommand lives in its own module, which defines ``add_arguments(parser)`` and
``run(args) -> int``; this file only maps names to modules, so ``bpo-fast --help`` does not
import torch/transformers and a broken optional dependency only affects its own command.
Usable as ``bpo-fast ...`` or ``python -m bpo_fast.cli ...`` (e.g. under ``torchrun``).
"""

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS = {
    "demo": ("bpo_fast.demo.cli", "BPO end to end on the built-in shapes world (the main job)"),
    "build-pairs": ("bpo_fast.data.cli_build", "bootstrap preference pairs (image-weakened, error injection)"),
    "merge-pairs": ("bpo_fast.data.cli_merge", "merge pair shards, deduplicate by id, check the schema"),
    "convert": ("bpo_fast.data.cli_convert", "pair JSONL from the official BPO data (completions), with counts"),
    "ref-logps": ("bpo_fast.train.cli_ref", "precompute reference log-probs into a safetensors cache"),
    "train": ("bpo_fast.train.cli", "DPO training of a vision-language model on preference pairs"),
    "generate": ("bpo_fast.eval.cli_generate", "a model's answers to questions about images (captions, POPE), for eval-chair / eval-pope"),
    "eval-chair": ("bpo_fast.eval.cli", "CHAIR hallucination scores of captions"),
    "eval-pope": ("bpo_fast.eval.cli_pope", "POPE-style yes/no object probe: build questions, score answers"),
    "info": ("bpo_fast.cli", "what was built (extension, CUDA archs) and the versions in use"),
}


def raised_here(exc):
    """Kept for callers of the old name: see :func:`bpo_fast.errors.raised_here`."""
    from bpo_fast.errors import raised_here as _raised_here

    return _raised_here(exc)


def add_arguments(parser):
    pass


def run(args):
    import json

    import torch

    from bpo_fast._ext import extension_info

    out = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available()}
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception:
        out["triton"] = None
    out["extension"] = extension_info()
    print(json.dumps(out, indent=2))
    return 0


def build_parser(only=None):
    desc = __doc__.split("\n\nEach subcommand")[0]
    width = max(len(n) for n in COMMANDS) + 2
    listing = "\n".join(f"  {n:<{width}}{h}" for n, (_, h) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="bpo-fast", usage="bpo-fast [-h] COMMAND [options]", description=f"{desc}\n\ncommands:\n{listing}",
        epilog="bpo-fast COMMAND --help shows the options of a command.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", help=argparse.SUPPRESS,
                                prog="bpo-fast")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_, usage="%(prog)s [options]")
        if only is not None and name != only:
            continue
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            p.set_defaults(_import_error=f"{module}: {exc}")
            continue
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv=None):
    try:
        return _main(argv)
    except KeyboardInterrupt:  # while a command's module is imported: nothing was started
        print("bpo-fast: interrupted", file=sys.stderr)
        return 130


def _main(argv):
    argv = list(sys.argv[1:] if argv is None else argv)
    only = next((a for a in argv if not a.startswith("-")), None)
    only = only if only in COMMANDS else None
    parser = build_parser(only)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "_import_error", None):
        print(f"bpo-fast {args.command}: cannot load the command ({args._import_error})",
              file=sys.stderr)
        return 1
    from bpo_fast.errors import run_command

    return run_command(args.command, args._run, args)


if __name__ == "__main__":
    sys.exit(main())
