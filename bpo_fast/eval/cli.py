"""``bpo-fast eval-chair``: CHAIR-i, CHAIR-s and recall of a captions file.

    bpo-fast eval-chair --captions captions.jsonl --ground-truth objects.jsonl \\
        [--synonyms synonyms.txt] [--out chair.json] [--subset]

Captions: JSONL / JSON array of ``{"id", "caption"}`` (LLaVA's ``{"question_id", "text"}``
works too) or a JSON object ``{id: caption}``. Ground truth: JSONL / JSON array of
``{"id", "objects": [names]}`` or a JSON object ``{id: [names]}``. Synonyms: the standard
"canonical, syn1, syn2" text format (one object a line) or JSON ``{canonical: [syns]}``; see
:mod:`bpo_fast.eval.chair`. Exit status 2 on bad input, with the file and line in the message.
"""

import os
import sys
from dataclasses import dataclass

from bpo_fast.errors import CommandGuard, UserError, input_file, output_file
from bpo_fast.options import add_arguments as add_options
from bpo_fast.options import config_file_of, from_args, max_bad_fraction_option, option


@dataclass
class ChairOptions:
    """The options of ``bpo-fast eval-chair``."""

    captions: str = option(None, help="captions: JSONL/JSON of {id, caption} (or {question_id, "
                                      "text})", metavar="FILE", required=True)
    ground_truth: str = option(None, help="ground-truth objects: JSONL/JSON of {id, objects: "
                                          "[names]}", metavar="FILE", required=True)
    synonyms: str = option(None, help="synonym table, one object a line: 'canonical, syn1, syn2, "
                                      "...' (or JSON {canonical: [syns]})", metavar="FILE",
                           default_text="the ground-truth names")
    out: str = option(None, help="write scores and per-caption details (mentions, hallucinated "
                                 "and missing objects) to this JSON file", metavar="FILE")
    subset: bool = option(False, help="score only the images that have a caption (otherwise a "
                                      "ground-truth id without a caption is an error)")
    errors: str = option(None, help="errors JSONL: the malformed caption records, named and "
                                    "skipped", metavar="FILE",
                         default_text="<captions stem>.errors.jsonl")
    max_bad_fraction: float = max_bad_fraction_option()


def add_arguments(parser):
    add_options(parser, ChairOptions)


def run(args):
    args = from_args(ChairOptions, args)

    input_file(args.captions, "--captions", what="captions JSON/JSONL file", text=True)
    input_file(args.ground_truth, "--ground-truth", what="ground-truth JSON/JSONL file", text=True)
    if args.synonyms:
        input_file(args.synonyms, "--synonyms", what="synonym text/JSON file", text=True)
    if args.out:
        output_file(args.out, "--out")
    from bpo_fast.data.bad_samples import check_side_file, side_path

    errors = args.errors or side_path(args.captions)
    output_file(errors, "--errors")
    check_side_file(errors, "--errors")
    with CommandGuard("eval-chair", outputs={"--out": args.out, "--errors": errors},
                      inputs={"--captions": args.captions, "--ground-truth": args.ground_truth,
                              "--synonyms": args.synonyms, "--config": config_file_of(args)}):
        return _score(args, errors)


def _score(args, errors):
    from bpo_fast.data.bad_samples import load_records
    from bpo_fast.eval.chair import (InputError, SynonymTable, compute_chair, load_captions,
                                     load_ground_truth)

    try:
        captions, bad = load_records(load_captions, args.captions, "eval-chair", errors=errors,
                                     max_fraction=args.max_bad_fraction)
        truth = load_ground_truth(args.ground_truth)
        table = SynonymTable.from_file(args.synonyms) if args.synonyms else None
    except InputError as exc:
        raise UserError(str(exc)) from None

    missing = [i for i in captions if i not in truth]
    if missing:
        raise UserError(f"--captions: {len(missing)} caption id(s) of {args.captions} are not in "
                        f"{args.ground_truth}: {_show(missing)}")
    extra = [i for i in truth if i not in captions]
    if extra and not args.subset:
        raise UserError(f"--ground-truth: {len(extra)} id(s) of {args.ground_truth} have no "
                        f"caption in {args.captions}: {_show(extra)} (use --subset to score only "
                        f"the captioned images)")
    result = compute_chair(captions, truth, table, ignore_extra_ground_truth=args.subset)

    print(format_scores(result))
    if bad.count():
        print(f"note: {bad.count()} malformed caption record(s) skipped ({bad.reasons(args.captions)}"
              f"), named in {errors}", file=sys.stderr)
    if result.unknown_ground_truth:
        print(f"note: {len(result.unknown_ground_truth)} ground-truth name(s) are not in the "
              f"synonym table (they count for recall only): "
              f"{', '.join(result.unknown_ground_truth[:10])}", file=sys.stderr)
    if args.out:
        out = {"captions": os.path.abspath(args.captions),
               "ground_truth": os.path.abspath(args.ground_truth),
               "synonyms": os.path.abspath(args.synonyms) if args.synonyms else None,
               **result.to_dict()}
        from bpo_fast.data.jsonl import atomic_write_json

        atomic_write_json(args.out, out)
        print(f"wrote {args.out}")
    return 0


def _show(ids, k=5):
    return ", ".join(repr(i) for i in ids[:k]) + (f", ... ({len(ids) - k} more)" if len(ids) > k else "")


def format_scores(result):
    def pct(x):
        return "   n/a" if x is None else f"{100 * x:6.2f}"
    rows = [("CHAIR-i (%)", pct(result.chair_i),
             f"{result.n_hallucinated_mentions}/{result.n_mentions} mentions hallucinated"),
            ("CHAIR-s (%)", pct(result.chair_s),
             f"{result.n_hallucinated_captions}/{result.n_captions} captions hallucinate"),
            ("recall (%)", pct(result.recall),
             f"{result.n_gt_mentioned}/{result.n_gt_objects} ground-truth objects mentioned")]
    return "\n".join(f"{name:<12} {val}   {note}" for name, val, note in rows)
