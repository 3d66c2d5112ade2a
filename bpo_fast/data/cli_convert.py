"""``bpo-fast convert``: write our pair JSONL from the official BPO data (or pair files), with counts.

    bpo-fast convert --out pairs.jsonl bpo_data.json

The official release is a JSON array of ``{"prompt", "image", "completions": [{"score",
"response", "type"}]}``; every two completions with different scores become one pair, the higher
score chosen, ``type`` (gt / mllm-hal / llm-hal) mapped to our ``strategy`` (see
:mod:`bpo_fast.data.bpo_format`). ``train``, ``ref-logps`` and ``merge-pairs`` also read the
official file directly; converting once gives a file the pair tools can inspect and merge.
LLaVA ``conversations`` records have no rejected answer: make pairs from them with
``bpo-fast build-pairs``.
"""

import sys


def add_arguments(p):
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="official BPO JSON/JSONL files and/or pair JSONL files")
    p.add_argument("--out", required=True, metavar="FILE", help="pair JSONL (written atomically)")
    p.add_argument("--strict", action="store_true",
                   help="fail (exit 2, nothing written) when a record is invalid")


def run(args):
    from bpo_fast.data.bpo_format import convert, dumps_counts
    from bpo_fast.errors import input_file, output_file

    for path in args.inputs:
        input_file(path, "INPUT", what="official BPO JSON/JSONL or pair JSONL file", text=True)
    output_file(args.out, "out")
    counts = convert(args.inputs, args.out, strict=args.strict)
    print(dumps_counts(counts), file=sys.stderr)
    return 0
