"""POPE-style object probing (Li et al., "Evaluating Object Hallucination in Large
Vision-Language Models", EMNLP 2023): yes/no questions "Is there a <object> in the image?".

Three kinds of question (``split``), built from each image's ground-truth objects:

- ``present``: an object that is in the image (answer yes);
- ``random``: an object of the vocabulary that is not in the image (answer no);
- ``prior``: the co-occurrence partner of an object that is in the image, itself absent
  (answer no): the question a model that answers from its language prior gets wrong. POPE's
  "adversarial" setting, with the partners taken from a prior the caller gives (a JSON
  ``{object: [partners]}`` or a list of ``[anchor, partner]`` pairs) instead of corpus counts.

Per image, ``k = min(per_image, objects in the image)`` present questions are drawn, and up to
``k`` of each absent split (fewer when the image has fewer candidates: an image without a
present anchor has no ``prior`` question), so that a POPE setting is balanced (half "yes") up to
the images short of candidates; an image without objects gets no question. The draw is
deterministic: it depends on ``seed``, the image id and the image's objects only (not on the
order of the images or on the other images).

Scores (:func:`score_pope`), with "yes" as the positive class:

- per split: ``accuracy``, ``precision``, ``recall``, ``f1``, ``yes_ratio`` on that split's
  questions alone (a one-sided split has an undefined precision or recall: ``None``, never NaN;
  on ``present`` accuracy = recall = yes-ratio, on an absent split accuracy = 1 - yes-ratio);
- per POPE setting (``settings``): ``random`` = present + random questions, ``prior`` =
  present + prior questions (the present questions are shared), the balanced sets POPE reports.

Answers are read the way POPE's own evaluation does: the first sentence, commas dropped; an
answer whose words include "no" or "not" is no, any other is yes (so "maybe" counts as yes).
``n_unclear`` counts the answers with neither "yes" nor "no"/"not" in that sentence.

Public API: :func:`build_questions`, :func:`load_prior`, :func:`load_questions`,
:func:`load_answers`, :func:`parse_yes_no`, :func:`score_pope` -> :class:`PopeResult`,
:func:`question_text`.
"""

import json
import os
import random
import re
from dataclasses import dataclass, field

from bpo_fast.eval.chair import InputError, _iter_json_items, text_records

__all__ = ["SPLITS", "SETTINGS", "build_questions", "question_text", "load_prior",
           "load_questions", "load_answers", "parse_yes_no", "score_pope", "PopeResult"]

SPLITS = ("present", "random", "prior")
SETTINGS = {"random": ("present", "random"), "prior": ("present", "prior")}


def _norm(name):
    return " ".join(str(name).lower().replace("_", " ").split())


def question_text(obj):
    """``Is there a/an <object> in the image?``"""
    obj = _norm(obj)
    article = "an" if obj[:1] in "aeiou" and obj else "a"
    return f"Is there {article} {obj} in the image?"


def _prior_dict(prior, what="prior"):
    """``{object: [partners]}`` (normalised names) from a dict or a list of pairs."""
    if prior is None:
        return {}
    out = {}
    if isinstance(prior, dict):
        items = []
        for k, v in prior.items():
            if isinstance(v, str):
                v = [v]
            if not isinstance(v, (list, tuple)) or not all(isinstance(p, str) for p in v):
                raise TypeError(f"{what}[{k!r}]: expected a partner name or a list of names, "
                                f"got {v!r}")
            items += [(k, p) for p in v]
    elif isinstance(prior, (list, tuple)):
        items = []
        for i, pair in enumerate(prior):
            if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                    or not all(isinstance(p, str) for p in pair)):
                raise TypeError(f"{what}[{i}]: expected an [anchor, partner] pair of names, "
                                f"got {pair!r}")
            items.append(tuple(pair))
    else:
        raise TypeError(f"{what}: expected a dict object -> partners or a list of "
                        f"[anchor, partner] pairs, got {type(prior).__name__}")
    for a, p in items:
        a, p = _norm(a), _norm(p)
        if not a or not p or a == p:
            raise ValueError(f"{what}: expected two different, non-empty names, got {a!r} -> {p!r}")
        out.setdefault(a, [])
        if p not in out[a]:
            out[a].append(p)
    return out


def build_questions(ground_truth, *, seed=0, per_image=3, prior=None, vocabulary=None):
    """The question set of ``ground_truth`` (``{image id: [object names]}``, see the module doc), a list of dicts
    ``{"question_id", "image_id", "object", "split", "label", "question"}``, images in the
    order given, then present / random / prior.

    ``vocabulary``: the objects random questions draw from (default: every ground-truth object
    of every image, and every prior object). ``prior``: ``{object: [partners]}`` or
    ``[[anchor, partner], ...]``. ``per_image``: the most questions of each split per image.
    """
    if not isinstance(ground_truth, dict) or not ground_truth:
        raise TypeError("ground_truth: expected a non-empty dict image id -> list of objects")
    if isinstance(per_image, bool) or not isinstance(per_image, int) or per_image < 1:
        raise ValueError(f"per_image: expected an int >= 1, got {per_image!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
    partners = _prior_dict(prior)
    truth = {}
    for k, objs in ground_truth.items():
        if isinstance(objs, str) or not all(isinstance(o, str) for o in objs):
            raise TypeError(f"ground_truth[{k!r}]: expected a list of object names")
        truth[str(k)] = list(dict.fromkeys(n for n in map(_norm, objs) if n))
    if vocabulary is None:
        vocab = {o for objs in truth.values() for o in objs}
        vocab |= set(partners) | {p for ps in partners.values() for p in ps}
    else:
        if isinstance(vocabulary, str) or not all(isinstance(o, str) for o in vocabulary):
            raise TypeError("vocabulary: expected a list of object names")
        vocab = {n for n in map(_norm, vocabulary) if n}
    vocab = sorted(vocab)
    out = []
    for img, objs in truth.items():
        present = set(objs)
        rng = random.Random(f"pope:{seed}:{img}")
        cands = {
            "present": sorted(present),
            "random": [o for o in vocab if o not in present],
            "prior": sorted({p for a in present for p in partners.get(a, ()) if p not in present}),
        }
        k = min(per_image, len(present))
        for split in SPLITS:
            pick = cands[split]
            pick = rng.sample(pick, min(k, len(pick)))
            for obj in pick:
                out.append({"question_id": f"{img}:{split}:{obj}", "image_id": img,
                            "object": obj, "split": split,
                            "label": "yes" if split == "present" else "no",
                            "question": question_text(obj)})
    return out


# --------------------------------------------------------------------------- files


def load_prior(path):
    """A co-occurrence prior file: JSON ``{object: [partners]}`` (or ``{object: partner}``) or
    a JSON list of ``[anchor, partner]`` pairs -> ``{object: [partners]}``."""
    if not os.path.isfile(path):
        raise InputError(f"prior: no such file {path!r}")
    from bpo_fast.data.jsonl import read_text

    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    try:
        out = _prior_dict(data, what=path)
    except (TypeError, ValueError) as exc:
        raise InputError(str(exc)) from None
    if not out:
        raise InputError(f"{path}: the prior names no object")
    return out


def load_questions(path):
    """A question file written by :func:`build_questions` (JSONL) -> the list of questions."""
    out, seen = [], {}
    for line, rec in _iter_json_items(path, "questions"):
        if not isinstance(rec, dict):
            raise InputError(f"{path}:{line}: expected a question object, got {type(rec).__name__}")
        missing = [k for k in ("question_id", "image_id", "object", "split") if k not in rec]
        if missing:
            raise InputError(f"{path}:{line}: question has no {', '.join(map(repr, missing))}")
        if rec["split"] not in SPLITS:
            raise InputError(f"{path}:{line}: split must be one of {list(SPLITS)}, got "
                             f"{rec['split']!r}")
        qid = str(rec["question_id"])
        if qid in seen:
            raise InputError(f"{path}:{line}: duplicate question_id {qid!r} (first at line "
                             f"{seen[qid]})")
        seen[qid] = line
        out.append({**rec, "question_id": qid, "image_id": str(rec["image_id"]),
                    "object": _norm(rec["object"])})
    if not out:
        raise InputError(f"{path}: no questions in the file")
    return out


_ANSWER_KEYS = ("answer", "text")


def load_answers(path, on_bad=None):
    """Answers JSONL/JSON: ``{"question_id", "answer"}`` (LLaVA's ``{"question_id", "text"}``
    too) or a JSON object ``{question_id: answer}`` -> ``{question_id: answer text}``.
    ``on_bad(line, reason)``: a malformed record is reported there and skipped (else it raises
    :class:`InputError`)."""
    def question_id(line, rec):
        if not isinstance(rec, dict):
            raise InputError(f"{path}:{line}: expected a JSON object with a question_id, got "
                             f"{type(rec).__name__}")
        if "question_id" not in rec:
            raise InputError(f"{path}:{line}: answer has no 'question_id'")
        return rec["question_id"]

    return text_records(path, "answer", question_id, _ANSWER_KEYS, id_name="question_id",
                        on_bad=on_bad)


# --------------------------------------------------------------------------- scoring


_WORDS = re.compile(r"[a-z']+")


def parse_yes_no(answer):
    """``(is_yes, clear)``: POPE's rule (first sentence; "no"/"not" -> no, else yes) and whether
    the sentence says "yes", "no" or "not" at all."""
    if not isinstance(answer, str):
        raise TypeError(f"answer: expected a str, got {type(answer).__name__}")
    first = answer.strip().lower().split(".")[0].replace(",", " ")
    words = set(_WORDS.findall(first))
    is_no = bool(words & {"no", "not"})
    return (not is_no), (is_no or "yes" in words)


def _ratio(a, b):
    return a / b if b else None


def _scores(tp, fp, tn, fn):
    n = tp + fp + tn + fn
    p, r = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    f1 = 2 * p * r / (p + r) if p is not None and r is not None and p + r > 0 else (
        0.0 if p is not None and r is not None else None)
    return {"n": n, "tp": tp, "fp": fp, "tn": tn, "fn": fn, "accuracy": _ratio(tp + tn, n),
            "precision": p, "recall": r, "f1": f1, "yes_ratio": _ratio(tp + fp, n)}


@dataclass
class PopeResult:
    splits: dict                  # split -> scores (n, tp, fp, tn, fn, accuracy, ..., yes_ratio)
    settings: dict                # "random"/"prior" -> scores of present + that split
    n_questions: int
    n_unclear: int
    per_question: list = field(default_factory=list)

    def to_dict(self, details=True):
        d = {"splits": self.splits, "settings": self.settings, "n_questions": self.n_questions,
             "n_unclear": self.n_unclear}
        if details:
            d["per_question"] = self.per_question
        return d

    def format(self):
        def pct(x):
            return "   n/a" if x is None else f"{100 * x:6.1f}"
        cols = ("accuracy", "precision", "recall", "f1", "yes_ratio")
        head = f"{'questions':<18}{'n':>6}" + "".join(f"{c:>11}" for c in cols)
        lines = [head, "-" * len(head)]
        for name, s in [(f"split {k}", v) for k, v in self.splits.items()] + \
                       [(f"POPE {k}", v) for k, v in self.settings.items()]:
            lines.append(f"{name:<18}{s['n']:>6}" + "".join(f"{pct(s[c]):>11}" for c in cols))
        lines.append(f"(percent; yes = positive; {self.n_unclear} of {self.n_questions} answers "
                     f"say neither yes nor no and count as yes, as in POPE)")
        return "\n".join(lines)


def score_pope(questions, answers, ground_truth=None):
    """Score ``answers`` (``{question_id: text}``) on ``questions`` (from
    :func:`build_questions` / :func:`load_questions`). With ``ground_truth`` (``{image id:
    [objects]}``) the labels come from it (a question's object is in the image or not) and must
    agree with the question's split; without it, from the split. Every question needs an answer
    and every answer a question."""
    if not isinstance(questions, list) or not questions:
        raise TypeError("questions: expected a non-empty list of question dicts")
    if not isinstance(answers, dict):
        raise TypeError(f"answers: expected a dict question_id -> answer, got "
                        f"{type(answers).__name__}")
    qids = [q["question_id"] for q in questions]
    missing = [q for q in qids if q not in answers]
    if missing:
        raise ValueError(f"answers: no answer for {len(missing)} of {len(qids)} question(s): "
                         f"{_show(missing)}")
    extra = [a for a in answers if a not in set(qids)]
    if extra:
        raise ValueError(f"answers: {len(extra)} answer(s) to unknown question ids: {_show(extra)}")
    truth = None
    if ground_truth is not None:
        truth = {str(k): {_norm(o) for o in v} for k, v in ground_truth.items()}
    counts = {s: [0, 0, 0, 0] for s in SPLITS}      # tp, fp, tn, fn
    per, unclear = [], 0
    for q in questions:
        split = q["split"]
        if split not in SPLITS:
            raise ValueError(f"questions: {q['question_id']!r}: split must be one of "
                             f"{list(SPLITS)}, got {split!r}")
        label = split == "present"
        if truth is not None:
            if q["image_id"] not in truth:
                raise ValueError(f"ground_truth: no objects for image {q['image_id']!r} of "
                                 f"question {q['question_id']!r}")
            in_image = _norm(q["object"]) in truth[q["image_id"]]
            if in_image != label:
                raise ValueError(f"questions: {q['question_id']!r} asks about "
                                 f"{q['object']!r} as {split}, but the ground truth says it is "
                                 f"{'in' if in_image else 'not in'} image {q['image_id']!r} "
                                 f"(questions built from other annotations?)")
        yes, clear = parse_yes_no(answers[q["question_id"]])
        unclear += not clear
        c = counts[split]
        c[0 if yes and label else 1 if yes else 3 if label else 2] += 1
        per.append({"question_id": q["question_id"], "split": split,
                    "label": "yes" if label else "no", "answer": "yes" if yes else "no",
                    "clear": clear})
    splits = {s: _scores(*c) for s, c in counts.items() if sum(c)}
    settings = {}
    for name, parts in SETTINGS.items():
        if all(p in splits for p in parts):
            settings[name] = _scores(*[sum(counts[p][i] for p in parts) for i in range(4)])
    return PopeResult(splits=splits, settings=settings, n_questions=len(questions),
                      n_unclear=unclear, per_question=per)


def _show(ids, k=5):
    ids = list(ids)
    return ", ".join(repr(i) for i in ids[:k]) + (f", ... ({len(ids) - k} more)" if len(ids) > k else "")
