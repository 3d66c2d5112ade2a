"""Questions about images, read from the formats ``bpo-fast generate`` takes.

- **LLaVA records** ``{"id", "image", "conversations"}``: the first human turn (``turns="all"``:
  every human turn, with the turns before it as history); id ``<id>`` (``<id>:t<k>`` for the
  k-th later turn);
- **preference pairs** (our JSONL, the official BPO records, TRL's formats: what ``train``
  reads, through :func:`bpo_fast.data.hf_pairs.open_pairs`): each pair's prompt, id the pair's;
- **question files** ``{"question_id", "image" or "image_id", "question" or "text"}``: POPE
  (``eval-pope --write-questions``, or the official POPE / LLaVA question files); an ``image_id``
  names the image ``<image_id>`` or ``<image_id>.<ext>`` under the image root;
- **a folder of images** (no data file): every image under the image root, one prompt; id the
  image's path without its extension.

Ids repeated in the input become ``<id>#<n>`` (as ``build-pairs`` does), so every answer has
its own.
"""

import os
from dataclasses import dataclass, field

from bpo_fast.errors import UserError

__all__ = ["Question", "read_questions", "detect_format", "item_images", "INPUT_FORMATS",
           "DEFAULT_PROMPT", "IMAGE_EXTENSIONS"]

INPUT_FORMATS = ("auto", "llava", "pairs", "questions")
# the CHAIR prompt of the LLaVA / OPERA evaluations
DEFAULT_PROMPT = "Please describe this image in detail."
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class Question:
    """One question: LLaVA ``turns`` ending with it, its images, where it came from."""

    id: str
    turns: list
    images: list                   # paths (relative to the image root, or absolute)
    line: int = None               # line of its record in --data
    extra: dict = field(default_factory=dict)   # copied into the answer's line (image_id, ...)
    load: object = None            # () -> list of PIL images, instead of opening ``images``

    @property
    def text(self):
        from bpo_fast.data.schema import IMAGE_PLACEHOLDER

        return self.turns[-1]["value"].replace(IMAGE_PLACEHOLDER, "").strip()


class _BadRecord(ValueError):
    """A record of --data that yields no question (the message says why)."""


def _first_record(path):
    from bpo_fast.data.llava_format import iter_records

    for _, _, rec in iter_records(path):
        if isinstance(rec, dict):
            return rec
    return None


def detect_format(path):
    """``llava``, ``pairs`` or ``questions`` from the first record of ``path``."""
    if os.path.isdir(path) or os.path.splitext(path)[1].lower() not in (".json", ".jsonl"):
        return "pairs"              # Parquet, Arrow, datasets folders: the pair readers
    rec = _first_record(path)
    if rec is None:
        raise UserError(f"--data: no JSON record in {path!r}")
    if "conversations" in rec:
        return "llava"
    if "question_id" in rec and "chosen" not in rec:
        return "questions"
    if "chosen" in rec or "completions" in rec:
        return "pairs"
    raise UserError(f"--data: cannot tell the format of {path!r} from its first record (keys "
                    f"{sorted(rec)[:8]}): expected LLaVA records (conversations), pairs "
                    "(chosen/rejected or completions) or questions (question_id); or give "
                    "--data-format")


def _image_list(rec_image, where):
    if rec_image is None:
        return []
    items = rec_image if isinstance(rec_image, list) else [rec_image]
    if not all(isinstance(x, str) and x for x in items):
        raise _BadRecord(f"{where}: 'image': expected a path, a list of paths or null")
    return list(items)


def _llava_questions(rec, turns, on_bad):
    """``(images, [(question id, turns ending with it)])`` of a LLaVA record, read by
    :func:`bpo_fast.data.llava_format.record_turns` (the pair builder's reading; a question
    needs no answer). With ``turns="all"`` an empty question is passed to ``on_bad(question
    id, reason)`` and the record's other questions stay; a record with no question left raises
    :class:`_BadRecord`."""
    from bpo_fast.data.llava_format import MalformedRecord, record_turns
    from bpo_fast.data.schema import IMAGE_PLACEHOLDER

    try:
        rid, images, conv = record_turns(rec, several_images=True, min_turns=1)
    except MalformedRecord as exc:
        raise _BadRecord(str(exc)) from None
    out, empty = [], []
    for k, i in enumerate(range(0, len(conv), 2)):
        if turns == "first" and k:
            break
        qid = rid if k == 0 else f"{rid}:t{k}"
        if not conv[i]["value"].replace(IMAGE_PLACEHOLDER, "").strip():
            empty.append((qid, f"conversations[{i}]: empty question"))
            continue
        out.append((qid, conv[:i + 1]))
    if not out:
        raise _BadRecord(empty[0][1] if len(empty) == 1 else
                         f"no non-empty question ({len(empty)} empty)")
    for qid, reason in empty:
        on_bad(qid, reason)
    return images, out


def _question_record(rec, stems):
    if not isinstance(rec, dict):
        raise _BadRecord(f"expected a JSON object, got {type(rec).__name__}")
    qid = rec.get("question_id")
    if isinstance(qid, bool) or not isinstance(qid, (str, int)) or str(qid) == "":
        raise _BadRecord("missing or invalid 'question_id'")
    text = rec.get("question", rec.get("text"))
    if not isinstance(text, str) or not text.strip():
        raise _BadRecord("no question (expected a non-empty 'question' or 'text')")
    extra = {}
    if rec.get("image") is not None:
        images = _image_list(rec["image"], f"question {qid!r}")
    elif rec.get("image_id") is not None:
        extra["image_id"] = str(rec["image_id"])
        images = [stems(extra["image_id"])]
    else:
        raise _BadRecord(f"question {qid!r} names no image (expected 'image' or 'image_id')")
    from bpo_fast.data.schema import IMAGE_PLACEHOLDER

    value = "".join(IMAGE_PLACEHOLDER + "\n" for _ in images) + text.strip()
    return str(qid), [{"from": "human", "value": value}], images, extra


class _ImageIndex:
    """``image_id`` -> the image file ``<image_id>`` or ``<image_id>.<ext>`` under the root
    (the folder is listed once, on first use)."""

    def __init__(self, root):
        self.root, self.by_stem = root, None

    def __call__(self, image_id):
        if self.root is None:
            raise _BadRecord(f"image_id {image_id!r}: needs --image-root to find the image")
        if self.by_stem is None:
            self.by_stem = {}
            for rel in _list_images(self.root):
                self.by_stem.setdefault(os.path.splitext(rel)[0], []).append(rel)
                self.by_stem.setdefault(rel, []).append(rel)
        hits = self.by_stem.get(image_id, [])
        if len(hits) != 1:
            raise _BadRecord(f"image_id {image_id!r}: " + (
                f"no image {image_id}[.jpg/.png/...] under {self.root!r}" if not hits else
                f"several images under {self.root!r} ({', '.join(hits[:3])})"))
        return hits[0]


def _list_images(root):
    out = []
    for d, dirs, files in os.walk(root):
        dirs.sort()
        for f in sorted(files):
            if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS:
                out.append(os.path.relpath(os.path.join(d, f), root))
    return out


def read_questions(opts, on_bad=None):
    """The questions of ``opts`` (``data``, ``data_format``, ``image_root``, ``prompt``,
    ``turns``, ``limit``: e.g. :class:`bpo_fast.eval.generate.GenerateOptions`) in input order.
    A record that yields no question, or a question left out of its record (``turns="all"``: an
    empty one), is passed to ``on_bad`` as a bad-sample entry
    (:meth:`bpo_fast.data.bad_samples.BadSamples.entry`: file, id, line, reason, kind) and
    skipped. Returns ``(questions, renamed duplicate ids)``."""
    from bpo_fast.data.bad_samples import BadSamples

    def bad(sample_id, line, reason, kind):
        if on_bad is not None:
            on_bad(BadSamples.entry(opts.data, sample_id, line, reason, kind))

    fmt = opts.data_format
    if opts.data is None:
        questions = [Question(os.path.splitext(rel)[0].replace(os.sep, "/"),
                              [{"from": "human", "value": "<image>\n" + opts.prompt}], [rel],
                              extra={"image": rel})
                     for rel in _list_images(opts.image_root)]
        if not questions:
            raise UserError(f"--image-root: no image ({', '.join(IMAGE_EXTENSIONS)}) under "
                            f"{opts.image_root!r}")
        return _limit_and_rename(questions, opts.limit)
    if fmt == "auto":
        fmt = detect_format(opts.data)
    if fmt == "pairs":
        return _limit_and_rename(_pair_questions(opts, bad), opts.limit)
    from bpo_fast.data.llava_format import MalformedRecord, iter_records

    stems = _ImageIndex(opts.image_root)
    questions, skipped = [], []
    for _, line, rec in iter_records(opts.data):
        if opts.limit is not None and len(questions) >= opts.limit:
            break
        rid = rec.get("id" if fmt == "llava" else "question_id") if isinstance(rec, dict) else None
        rid = rid if isinstance(rid, (str, int)) and not isinstance(rid, bool) else None
        try:
            if isinstance(rec, MalformedRecord):
                raise _BadRecord(str(rec))
            if fmt == "llava":
                images, qs = _llava_questions(
                    rec, opts.turns, lambda qid, why, line=line: bad(qid, line, why, "prompt"))
                questions += [Question(qid, turns, images, line, {"image": rec.get("image")})
                              for qid, turns in qs]
            else:
                qid, turns, images, extra = _question_record(rec, stems)
                questions.append(Question(qid, turns, images, line,
                                          {"image": images[0] if len(images) == 1 else images,
                                           **extra}))
        except _BadRecord as exc:
            skipped.append((line, str(exc)))
            bad(None if rid is None else str(rid), line, str(exc), "record")
    if not questions:   # said here: a run that answers nothing writes no errors file either
        why = (f"{len(skipped)} record(s) skipped, the first at line {skipped[0][0]}: "
               f"{skipped[0][1]}" if skipped else "no record")
        raise UserError(f"--data: no question in {opts.data!r} (read as {fmt}; {why})")
    return _limit_and_rename(questions, opts.limit)


def _pair_questions(opts, bad):
    """One question per pair: its prompt and images, through the readers of ``train`` (the
    records they skip passed to ``bad``)."""
    from bpo_fast.data.hf_pairs import check_data_path, open_pairs

    check_data_path(opts.data, "--data")
    if opts.image_root is None:
        raise UserError("--image-root: required with pairs (their image paths are relative "
                        "to it)")
    try:
        ds = open_pairs(opts.data, opts.image_root)
    except ValueError as exc:
        raise UserError(f"--data: {exc}") from None
    for s in ds.skipped:
        bad(None, s.line, s.reason, "record")
    out = []
    for i, rec in enumerate(ds.records):
        path = rec.get("image_path")       # our reader: the image's path (None: text only)
        out.append(Question(str(rec["id"]), rec["prompt"], [path] if path else [],
                            line=rec.get("line", rec.get("row")),
                            extra={"image": os.path.relpath(path, opts.image_root)
                                   if path else None},
                            load=(lambda i=i: item_images(ds[i]))))
    return out


def item_images(item):
    """A pair item's images as a list (empty: text only)."""
    if item.get("images") is not None:
        return list(item["images"])
    return [] if item.get("image") is None else [item["image"]]


def _limit_and_rename(questions, limit):
    if limit is not None:
        questions = questions[:limit]
    seen, renamed = {}, 0
    taken = {q.id for q in questions}      # a renamed id never takes one the input has
    for q in questions:
        n = seen[q.id] = seen.get(q.id, 0) + 1
        if n > 1:
            while f"{q.id}#{n}" in taken:
                n += 1
            q.id = f"{q.id}#{n}"
            taken.add(q.id)
            renamed += 1
    return questions, renamed
