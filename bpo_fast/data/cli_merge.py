"""``bpo-fast merge-pairs``: merge pair shards, deduplicate by id, check the schema.

Thin wrapper over :func:`bpo_fast.data.pairs.merge_pairs`.
"""

import argparse
import sys

EPILOG = """\
examples:
  # merge the shards pairs.rank0.jsonl, pairs.rank1.jsonl, ... written under torchrun
  bpo-fast merge-pairs --out pairs.merged.jsonl pairs.jsonl
  # or name the files
  bpo-fast merge-pairs --out all.jsonl run1.jsonl run2.rank*.jsonl

Every record is checked with the pair schema (bpo_fast.data.schema.validate_pair); by default
one bad record (a line that is not JSON, or fails the schema) aborts the merge and nothing is
written; a torn last line (what a killed writer leaves) is skipped and reported. The first record of each id wins. The
output is written to a temporary file and renamed, so it is either complete or absent.
"""


def add_arguments(p):
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EPILOG
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="pair files, or the --out path given to build-pairs (its .rank{r} shards "
                        "are found and merged in rank order)")
    p.add_argument("--out", required=True, metavar="FILE", help="merged JSONL (written atomically)")
    p.add_argument("--skip-invalid", action="store_true",
                   help="drop records that are not valid JSON or fail the schema (reported with "
                        "file:line and counted) instead of aborting")
    p.add_argument("--strict", action="store_true",
                   help="fail when one id appears with different content in two inputs")


def run(args):
    from bpo_fast.data.pairs import merge_pairs

    s = merge_pairs(args.inputs, args.out, skip_invalid=args.skip_invalid,
                    strict_conflicts=args.strict)
    print(s.format(), file=sys.stderr)
    return 0
