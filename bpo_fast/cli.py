"""The ``bpo-fast`` command.

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
    "eval-chair": ("bpo_fast.eval.cli", "CHAIR hallucination scores of captions"),
    "info": ("bpo_fast.cli", "what was built (extension, CUDA archs) and the versions in use"),
}


def raised_here(exc):
    """True when ``exc`` was raised by bpo_fast's own code (a check that names the argument),
    False when it came out of a library (torch, transformers, ...): commands print the first
    as one line and let the second through with its traceback."""
    import os

    tb = exc.__traceback__
    last = None
    while tb is not None:
        last = tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    root = os.path.dirname(os.path.abspath(__file__))
    return last is not None and os.path.abspath(last).startswith(root + os.sep)


def input_error(command, exc):
    """For a command's ``except (ValueError, FileNotFoundError)``: our own check (its message
    names the argument) is printed as one line and gives exit status 2; a library's error is
    raised again with its traceback."""
    if not raised_here(exc):
        raise exc
    print(f"bpo-fast {command}: error: {exc}", file=sys.stderr)
    return 2


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
    parser = argparse.ArgumentParser(prog="bpo-fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
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
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
