"""``bpo-fast eval-pope``: a POPE-style yes/no object probe (:mod:`bpo_fast.eval.pope`).

Build the questions (deterministic from --seed), let your model answer them, score the answers:

    bpo-fast eval-pope --ground-truth objects.jsonl --prior prior.json --write-questions q.jsonl
    # ... answer every {"question_id", "question", "image_id"} of q.jsonl into answers.jsonl
    bpo-fast eval-pope --ground-truth objects.jsonl --questions q.jsonl --answers answers.jsonl

Without --questions the question set is built again from the ground truth, --prior, --seed and
--per-image (the same set as --write-questions wrote with those options). Answers: JSONL / JSON
array of ``{"question_id", "answer"}`` (LLaVA's ``{"question_id", "text"}`` too) or a JSON object
``{question_id: answer}``. Exit status 2 on bad input, with the file and line in the message.
"""

import os
import sys
from dataclasses import dataclass

from bpo_fast.errors import CommandGuard, UserError, input_file, output_file
from bpo_fast.eval.cli import _show
from bpo_fast.options import add_arguments as add_options
from bpo_fast.options import config_file_of, from_args, max_bad_fraction_option, option


@dataclass
class PopeOptions:
    """The options of ``bpo-fast eval-pope``."""

    ground_truth: str = option(None, help="ground-truth objects: JSONL/JSON of {id, objects: "
                                          "[names]}", metavar="FILE", required=True)
    answers: str = option(None, help="the model's answers: JSONL/JSON of {question_id, answer} "
                                     "(or {question_id, text}); scored against the ground truth",
                          metavar="FILE")
    questions: str = option(None, help="the question set the answers answer (as written by "
                                       "--write-questions)", metavar="FILE",
                            default_text="built from --ground-truth, --prior, --seed")
    prior: str = option(None, help="co-occurrence prior for the prior-partner questions: JSON "
                                   "{object: [partners]} or [[anchor, partner], ...]",
                        metavar="FILE", default_text="no prior-partner questions")
    seed: int = option(0, help="seed of the question draw")
    per_image: int = option(3, help="at most this many present-object questions per image, and "
                                    "as many of each absent kind (random, prior) where there "
                                    "are candidates", bounds="[1, inf)", metavar="N")
    write_questions: str = option(None, help="write the question set to this JSONL file (with "
                                             "no --answers: only that)", metavar="FILE")
    out: str = option(None, help="write the scores and per-question details to this JSON file",
                      metavar="FILE")
    errors: str = option(None, help="errors JSONL: the malformed answer records, named and "
                                    "skipped", metavar="FILE",
                         default_text="<answers stem>.errors.jsonl")
    max_bad_fraction: float = max_bad_fraction_option()


def add_arguments(parser):
    add_options(parser, PopeOptions)


def run(args):
    args = from_args(PopeOptions, args)
    input_file(args.ground_truth, "--ground-truth", what="ground-truth JSON/JSONL file", text=True)
    for name in ("answers", "questions", "prior"):
        path = getattr(args, name)
        if path:
            input_file(path, f"--{name}", what=f"{name} JSON/JSONL file", text=True)
    if args.questions and args.prior:
        raise UserError("--prior: not used with --questions (the question file already holds "
                        "the prior-partner questions); give one of them")
    if not args.answers and not args.write_questions:
        raise UserError("--answers: required to score (or give --write-questions to only write "
                        "the question set)")
    for name in ("write_questions", "out"):
        if getattr(args, name):
            output_file(getattr(args, name), "--" + name.replace("_", "-"))
    if args.out and not args.answers:
        raise UserError("--out: there are no scores without --answers")
    from bpo_fast.data.bad_samples import check_side_file, side_path

    errors = None
    if args.answers:
        errors = args.errors or side_path(args.answers)
        output_file(errors, "--errors")
        check_side_file(errors, "--errors")
    with CommandGuard("eval-pope", outputs={"--write-questions": args.write_questions,
                                            "--out": args.out, "--errors": errors},
                      inputs={"--ground-truth": args.ground_truth, "--answers": args.answers,
                              "--questions": args.questions, "--prior": args.prior,
                              "--config": config_file_of(args)}):
        return _score(args, errors)


def _score(args, errors):
    from bpo_fast.data.bad_samples import load_records
    from bpo_fast.eval.chair import InputError, load_ground_truth
    from bpo_fast.eval.pope import (build_questions, load_answers, load_prior, load_questions,
                                    score_pope)

    try:
        truth = load_ground_truth(args.ground_truth)
        prior = load_prior(args.prior) if args.prior else None
        if args.questions:
            questions = load_questions(args.questions)
        else:
            questions = build_questions(truth, seed=args.seed, per_image=args.per_image,
                                        prior=prior)
        answers = bad = None
        if args.answers:
            answers, bad = load_records(load_answers, args.answers, "eval-pope", errors=errors,
                                        max_fraction=args.max_bad_fraction)
    except InputError as exc:
        raise UserError(str(exc)) from None
    if prior is not None and not any(q["split"] == "prior" for q in questions):
        raise UserError(f"--prior: no image of {args.ground_truth} holds an object of the prior "
                        f"without its partner, so there is no prior-partner question")
    if args.write_questions:
        from bpo_fast.data.jsonl import atomic_write_jsonl

        atomic_write_jsonl(args.write_questions, questions)
        counts = {s: sum(q["split"] == s for q in questions) for s in ("present", "random", "prior")}
        print(f"wrote {args.write_questions}: {len(questions)} questions "
              f"({', '.join(f'{k} {v}' for k, v in counts.items())})")
    if answers is None:
        return 0
    src = args.questions or "the questions built from --ground-truth"
    qids = {q["question_id"] for q in questions}
    missing = [q["question_id"] for q in questions if q["question_id"] not in answers]
    if missing:
        raise UserError(f"--answers: {len(missing)} of the {len(questions)} question(s) of {src} "
                        f"have no answer in {args.answers}: {_show(missing)}")
    extra = [a for a in answers if a not in qids]
    if extra:
        raise UserError(f"--answers: {len(extra)} answer(s) of {args.answers} are to question "
                        f"ids not in {src}: {_show(extra)}")
    try:
        result = score_pope(questions, answers, truth)
    except ValueError as exc:
        raise UserError(f"--questions: {exc}") from None
    print(result.format())
    if bad.count():
        print(f"note: {bad.count()} malformed answer record(s) skipped "
              f"({bad.reasons(args.answers)}), named in {errors}", file=sys.stderr)
    if args.out:
        out = {"ground_truth": os.path.abspath(args.ground_truth),
               "answers": os.path.abspath(args.answers),
               "questions": os.path.abspath(args.questions) if args.questions else None,
               "prior": os.path.abspath(args.prior) if args.prior else None,
               "seed": args.seed, "per_image": args.per_image, **result.to_dict()}
        from bpo_fast.data.jsonl import atomic_write_json

        atomic_write_json(args.out, out)
        print(f"wrote {args.out}")
    return 0


