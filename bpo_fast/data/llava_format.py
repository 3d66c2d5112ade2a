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

import codecs
import json
import os
from dataclasses import dataclass

from bpo_fast.data.schema import IMAGE_PLACEHOLDER

__all__ = ["Sample", "MalformedRecord", "iter_records", "record_to_samples", "TURN_MODES"]

TURN_MODES = ("first", "all")
_HUMAN = ("human", "user")
_GPT = ("gpt", "assistant")


class MalformedRecord(ValueError):
    """A data record that cannot be used (the message says why)."""


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


def _detect_format(path):
    """'json' if the first non-blank character (after a UTF-8 byte-order mark, which Windows
    editors write) is '[', else 'jsonl'."""
    with open(path, "rb") as f:
        first = True
        while True:
            chunk = f.read(4096)
            if first and chunk.startswith(codecs.BOM_UTF8):
                chunk = chunk[len(codecs.BOM_UTF8):]
            first = False
            if not chunk:
                return "jsonl"
            s = chunk.lstrip()
            if s:
                return "json" if s[:1] == b"[" else "jsonl"


def iter_records(path):
    """Yield ``(index, line, record_or_error)`` for every record of a LLaVA JSON/JSONL file.

    ``record_or_error`` is the parsed record, or a :class:`MalformedRecord` for a line that is
    not valid JSON (JSONL only; in a JSON array one broken record breaks the whole file, which
    raises ``ValueError`` naming the line).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data: no such file {path!r}")
    if _detect_format(path) == "jsonl":
        with open(path, "rb") as f:
            index = 0
            for n, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    rec = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    rec = MalformedRecord(f"invalid JSON: {exc}")
                yield index, n, rec
                index += 1
        return
    with open(path, encoding="utf-8-sig") as f:
        text = f.read()
    # Walk the array element by element with raw_decode so each record gets its line number.
    dec = json.JSONDecoder()
    pos = text.index("[") + 1
    line = text.count("\n", 0, pos) + 1
    index = 0
    n = len(text)

    def skip_ws(p):
        while p < n and text[p] in " \t\r\n":
            p += 1
        return p

    last = pos
    while True:
        pos = skip_ws(pos)
        if pos < n and text[pos] == "]":
            return
        line += text.count("\n", last, pos)
        last = pos
        try:
            rec, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise ValueError(f"data: {path}: invalid JSON array at line {exc.lineno}: {exc.msg}") from None
        yield index, line, rec
        index += 1
        pos = skip_ws(end)
        if pos < n and text[pos] == ",":
            pos += 1
        elif pos < n and text[pos] == "]":
            return
        else:
            lineno = text.count("\n", 0, pos) + 1
            raise ValueError(f"data: {path}: expected ',' or ']' at line {lineno}")


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
    if image is None and any(IMAGE_PLACEHOLDER in t["value"] for t in clean):
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
