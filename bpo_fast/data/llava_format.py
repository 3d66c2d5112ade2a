"""Reading LLaVA-format data (LLaVA-Instruct, ShareGPT4V, ...) into question/answer samples.

A LLaVA record::

    {"id": "000123", "image": "coco/train2017/000123.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is on the table?"},
                       {"from": "gpt", "value": "A red cup."}, ...]}

Files are a JSON array of records or JSONL (one record a line). Every record is yielded with
the line it starts on, so that malformed ones can be reported with their line number while the
run goes on. :func:`record_to_samples` turns a record into one sample per answered turn: the
first turn only, or every ``gpt`` turn (the earlier turns become the prompt's history).
"""

from dataclasses import dataclass

from bpo_fast.data.jsonl import MalformedRecord, iter_records  # noqa: F401  (re-exported)
from bpo_fast.data.schema import IMAGE_PLACEHOLDER

__all__ = ["Sample", "MalformedRecord", "iter_records", "record_to_samples", "record_turns",
           "TURN_MODES"]

TURN_MODES = ("first", "all")
_HUMAN = ("human", "user")
_GPT = ("gpt", "assistant")


@dataclass
class Sample:
    """One answered question: the prompt turns (ending with the human turn) and the answer."""

    source_id: str
    turn: int              # index of the answered gpt turn among the record's gpt turns (0-based)
    image: object          # path relative to the image root, or None (text only)
    prompt: list           # LLaVA turns [{"from", "value"}], last one is the human question
    chosen: str            # the data set's own answer
    line: int              # line in the data file where the record starts (1-based)
    index: int             # position of the record in the file (0-based)

    def pair_id(self, strategy, level):
        """Unique pair id: source id, turn, strategy, level (noise step or injector name)."""
        return f"{self.source_id}:t{self.turn}:{strategy}:{level}"

    @property
    def question(self):
        return self.prompt[-1]["value"].replace(IMAGE_PLACEHOLDER, "").strip()


def record_turns(rec, *, several_images=False, min_turns=2):
    """The checked parts of one LLaVA record, ``(id, images, turns)``: ``images`` a list of
    paths (empty: text only), ``turns`` its conversation as ``{"from", "value"}`` dicts that
    alternate human/gpt starting with human, each image with its ``<image>`` placeholder (none
    given: LLaVA's convention, the images before the first question). ``several_images``: a
    record may name a list of images (``generate``), else one (a one-element list accepted).
    ``min_turns``: the turns a record needs (2: a question and its answer). Raise
    :class:`MalformedRecord` saying what is wrong. The one reading of a LLaVA record:
    :func:`record_to_samples` (answers) and ``bpo_fast.data.questions`` (questions) call it."""
    if isinstance(rec, MalformedRecord):
        raise rec
    if not isinstance(rec, dict):
        raise MalformedRecord(f"expected a JSON object, got {type(rec).__name__}")
    sid = rec.get("id")
    if isinstance(sid, bool) or not isinstance(sid, (str, int)) or str(sid) == "":
        raise MalformedRecord("missing or invalid 'id' (expected a non-empty string or integer)")
    images = _record_images(rec.get("image"), several_images)
    conv = rec.get("conversations")
    if not isinstance(conv, list) or len(conv) < min_turns:
        raise MalformedRecord("'conversations': expected a list of at least "
                              + ("two turns" if min_turns == 2 else f"{min_turns} turn(s)"))
    clean = []
    for i, t in enumerate(conv):
        if not isinstance(t, dict) or not isinstance(t.get("value"), str) or "from" not in t:
            raise MalformedRecord(f"conversations[{i}]: expected {{'from', 'value': string}}")
        want = _HUMAN if i % 2 == 0 else _GPT
        if t["from"] not in want:
            raise MalformedRecord(f"conversations[{i}].from: expected {want[0]!r} (turns must "
                                  f"alternate human/gpt starting with human), got {t['from']!r}")
        clean.append({"from": t["from"], "value": t["value"]})
    n_tags = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in clean)
    if images and not n_tags:
        # LLaVA puts the image before the first question when the placeholder is missing.
        clean[0] = {"from": clean[0]["from"],
                    "value": (IMAGE_PLACEHOLDER + "\n") * len(images) + clean[0]["value"]}
    elif n_tags != len(images):
        raise MalformedRecord(
            f"conversation has {n_tags} {IMAGE_PLACEHOLDER} placeholder(s) "
            + (f"for the record's {len(images)} image(s)" if images
               else "but the record has no 'image'"))
    return str(sid), images, clean


def _record_images(image, several):
    if image is None:
        return []
    if several:
        items = image if isinstance(image, list) else [image]
        if not all(isinstance(x, str) and x for x in items):
            raise MalformedRecord("'image': expected a path, a list of paths or null")
        return list(items)
    if isinstance(image, list):  # some mixes store a one-element list
        if len(image) != 1:
            raise MalformedRecord(f"'image': expected one image, got a list of {len(image)}")
        image = image[0]
    if not isinstance(image, str) or not image:
        raise MalformedRecord("'image': expected a non-empty path string or null")
    return [image]


def record_to_samples(rec, *, turns="first", index=0, line=0):
    """The samples of one LLaVA record; raise :class:`MalformedRecord` saying what is wrong."""
    if turns not in TURN_MODES:
        raise ValueError(f"turns: expected one of {list(TURN_MODES)}, got {turns!r}")
    sid, images, clean = record_turns(rec)
    image = images[0] if images else None
    out = []
    n_answers = len(clean) // 2
    for k in range(n_answers if turns == "all" else 1):
        answer = clean[2 * k + 1]["value"].strip()
        if not answer:
            if turns == "first":
                raise MalformedRecord(f"conversations[{2 * k + 1}]: empty answer")
            continue  # other answered turns of the record are still usable
        out.append(Sample(source_id=sid, turn=k, image=image, prompt=clean[:2 * k + 1],
                          chosen=answer, line=line, index=index))
    if not out:
        raise MalformedRecord("no non-empty gpt answer")
    return out
