"""``bpo-fast build-pairs``: bootstrap BPO preference pairs from LLaVA-format data.

Thin wrapper over :func:`bpo_fast.data.pairs.build_pairs`; the options are the fields of
:class:`bpo_fast.data.pairs.PairBuilderConfig` (declared once there, with their help).
"""

import argparse
import sys

EPILOG = """\
examples:
  # both strategies, three noise levels, rule-based error injection
  bpo-fast build-pairs --model ckpt/llava-1.5-7b --data llava_instruct_150k.json \\
      --image-root coco/train2017 --out pairs.jsonl --noise-steps 200,500,800

  # error injection only, with the model's language backbone and our prompt template
  bpo-fast build-pairs --model ckpt/llava --data data.jsonl --out pairs.jsonl \\
      --strategies error_injection --injector llm

  # 8 GPUs: each rank writes pairs.rank{r}.jsonl; then merge
  torchrun --nproc-per-node 8 -m bpo_fast.cli build-pairs ... --out pairs.jsonl
  bpo-fast merge-pairs --out pairs.merged.jsonl pairs.jsonl

output: one JSON pair per line (id, image, prompt, chosen, rejected, strategy, noise_step,
injector, generation, seed, source_id, turn). Rejected answers that are empty or equal to the
chosen one (whitespace/case-insensitive) are dropped, counted and logged. Unreadable images and
malformed records go to <out stem>.errors.jsonl (.errors.rank{r}.jsonl per rank) with the
reason and line number; the run goes on (--strict: a malformed record stops it). Each record's
noise and sampling derive from (--seed, record id, strategy): a killed run loses at most the
batch in flight, and rerun with --resume it writes the same bytes as an uninterrupted run.
"""


def add_arguments(p):
    from bpo_fast.data.pair_builder import PairBuilderConfig
    from bpo_fast.options import add_arguments as add_options

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EPILOG
    add_options(p, PairBuilderConfig)


def config_from_args(args):
    from bpo_fast.data.pair_builder import PairBuilderConfig
    from bpo_fast.options import from_args

    return from_args(PairBuilderConfig, args)


def run(args):
    from bpo_fast.data.pair_builder import build_pairs

    cfg = config_from_args(args)
    from bpo_fast.runtime import console, threads_for_command

    with console(), threads_for_command(cfg.threads):
        summary = build_pairs(cfg)
    print(summary.format(), file=sys.stderr)
    return 0
