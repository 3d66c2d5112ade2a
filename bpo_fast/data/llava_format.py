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

__all__ = ["Sample", "MalformedRecord", "iter_records", "record_to_samples", "TURN_MODES"]

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


def record_to_samples(rec, *, turns="first", index=0, line=0):
    """The samples of one LLaVA record; raise :class:`MalformedRecord` saying what is wrong."""
    if turns not in TURN_MODES:
        raise ValueError(f"turns: expected one of {list(TURN_MODES)}, got {turns!r}")
    if isinstance(rec, MalformedRecord):
        raise rec
    if not isinstance(rec, dict):
        raise MalformedRecord(f"expected a JSON object, got {type(rec).__name__}")
    sid = rec.get("id")
    if isinstance(sid, bool) or not isinstance(sid, (str, int)) or str(sid) == "":
        raise MalformedRecord("missing or invalid 'id' (expected a non-empty string or integer)")
    sid = str(sid)
    image = rec.get("image")
    if isinstance(image, list):  # some mixes store a one-element list
        if len(image) != 1:
            raise MalformedRecord(f"'image': expected one image, got a list of {len(image)}")
        image = image[0]
    if image is not None and (not isinstance(image, str) or not image):
        raise MalformedRecord("'image': expected a non-empty path string or null")
    conv = rec.get("conversations")
    if not isinstance(conv, list) or len(conv) < 2:
        raise MalformedRecord("'conversations': expected a list of at least two turns")
    clean = []
    for i, t in enumerate(conv):
        if not isinstance(t, dict) or not isinstance(t.get("value"), str) or "from" not in t:
            raise MalformedRecord(f"conversations[{i}]: expected {{'from', 'value': string}}")
        want = _HUMAN if i % 2 == 0 else _GPT
        if t["from"] not in want:
            raise MalformedRecord(f"conversations[{i}].from: expected {want[0]!r} (turns must "
                                  f"alternate human/gpt starting with human), got {t['from']!r}")
        clean.append({"from": t["from"], "value": t["value"]})
    if image is not None and not any(IMAGE_PLACEHOLDER in t["value"] for t in clean):
        # LLaVA puts the image before the first question when the placeholder is missing.
        clean[0] = {"from": clean[0]["from"], "value": IMAGE_PLACEHOLDER + "\n" + clean[0]["value"]}
    n_tags = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in clean)
    if image is not None and n_tags > 1:
        raise MalformedRecord(f"conversation has {n_tags} <image> placeholders for the record's "
                              "one image")
    if image is None and n_tags:
        raise MalformedRecord("conversation has an <image> placeholder but the record has no 'image'")
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
