"""``bpo-fast merge-pairs``: merge pair shards, deduplicate by id, check the schema.

Thin wrapper over :func:`bpo_fast.data.pairs.merge_pairs`.
"""

import argparse
import sys
from dataclasses import dataclass

from bpo_fast.errors import UserError
from bpo_fast.options import add_arguments as add_options
from bpo_fast.options import from_args, option

EPILOG = """\
examples:
  # merge the shards pairs.rank0.jsonl, pairs.rank1.jsonl, ... written under torchrun
  bpo-fast merge-pairs --out pairs.merged.jsonl pairs.jsonl
  # or name the files
  bpo-fast merge-pairs --out all.jsonl run1.jsonl run2.rank*.jsonl

Every record is checked with the pair schema (bpo_fast.data.schema.validate_pair); by default
one bad record (a line that is not JSON, or fails the schema) aborts the merge and nothing is
written; a torn last line (what a killed writer leaves) is skipped and reported. The first
record of each id wins. The output is written to a temporary file and renamed, so it is either
complete or absent.
"""


@dataclass
class MergeOptions:
    """The options of ``bpo-fast merge-pairs``."""

    inputs: list = option(None, help="pair files, or the --out path given to build-pairs (its "
                                     ".rank{r} shards are found and merged in rank order)",
                          positional=True, nargs="*", metavar="INPUT", required=True)
    out: str = option(None, help="merged JSONL (written atomically)", metavar="FILE",
                      required=True)
    skip_invalid: bool = option(False, help="drop records that are not valid JSON or fail the "
                                            "schema (reported with file:line and counted) "
                                            "instead of aborting")
    strict: bool = option(False, help="fail when one id appears with different content in two "
                                      "inputs")


def add_arguments(p):
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EPILOG
    p.usage = "%(prog)s [options] --out FILE INPUT [INPUT ...]"
    add_options(p, MergeOptions)


def run(args):
    from bpo_fast.data.pair_merge import merge_pairs

    from bpo_fast.errors import check_no_overlap
    from bpo_fast.options import config_file_of

    o = from_args(MergeOptions, args)
    if not o.inputs:
        raise UserError("INPUT: expected at least one pair file")
    check_no_overlap({"out": o.out}, {"--config": config_file_of(o)})
    s = merge_pairs(o.inputs, o.out, skip_invalid=o.skip_invalid, strict_conflicts=o.strict)
    print(s.format(), file=sys.stderr)
    return 0
