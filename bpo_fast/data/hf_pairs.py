"""Preference pairs from Hugging Face ``datasets``: local JSON/JSONL/Parquet/Arrow files (or a
``save_to_disk`` folder), in our schema or in TRL's preference formats.

Formats (per record; detected per record, so a file may mix them):

- **ours** (:mod:`bpo_fast.data.schema`): ``prompt`` a list of LLaVA turns ``{"from", "value"}``
  with ``<image>`` placeholders, ``image`` a path (or null), ``chosen``/``rejected`` strings;
  the provenance fields (``strategy``, ...) are optional here;
- **TRL standard**: ``prompt``, ``chosen``, ``rejected`` strings;
- **TRL conversational**: ``prompt`` a list of messages ``{"role", "content"}`` (``content`` a
  string or a list of parts ``{"type": "text", "text"}`` / ``{"type": "image"}``), ``chosen`` /
  ``rejected`` lists holding one assistant message (TRL's implicit-prompt form, where chosen and
  rejected repeat the prompt, is rejected with a message saying so);

with images in ``images`` (a list, TRL's name) or ``image`` (one): paths relative to
``--image-root``, or the ``datasets.Image`` feature (bytes or paths). A record with no image is a
text-only pair. Image placeholders: where the messages hold ``{"type": "image"}`` parts (or
``<image>`` in the text) their count must equal the images'; where they hold none, the images go
in front of the first user turn.

``id``: the record's ``id`` when it has one, else ``<file stem>:<row>``; ``objects`` (a list of
names, for ``--eval-chair``) is kept.

:func:`open_pairs` is what the trainer and ``ref-logps`` call: our own JSONL/official-BPO reader
(:class:`~bpo_fast.data.preference.PreferenceDataset`) for files it reads, this module for the
rest (Parquet, Arrow, folders, TRL-format JSON/JSONL), or for everything with
``data_format="hf"``. ``streaming=True`` gives :class:`StreamingPairs`, an iterable that reads
the file lazily (nothing is checked up front, bad records are skipped as they come).
"""

import json
import logging
import os
import warnings

import torch

from bpo_fast.data.schema import IMAGE_PLACEHOLDER

logger = logging.getLogger("bpo_fast")

__all__ = ["HFPreferenceDataset", "StreamingPairs", "open_pairs", "normalize_record",
           "load_table", "is_trl_record", "check_data_path", "DATA_FORMATS"]
DATA_FORMATS = ("auto", "pairs", "hf")

_HF_EXT = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".arrow": "arrow",
           ".csv": "csv"}
_ROLE_TO_FROM = {"user": "human", "assistant": "gpt", "system": "system", "human": "human",
                 "gpt": "gpt"}


def load_table(path, *, streaming=False):
    """``datasets`` table of a local file or folder (split ``train``). A file or folder it cannot
    read (a corrupt or truncated Parquet file, an empty table, a ``DatasetDict`` without a
    ``train`` split) raises :class:`~bpo_fast.errors.UserError` naming it, in one line."""
    from bpo_fast.errors import UserError

    try:
        import datasets
    except ImportError:
        raise UserError("data: reading Parquet/Arrow or TRL-format data needs the `datasets` "
                        "package (pip install datasets)") from None
    datasets.disable_progress_bars()
    if not os.path.isdir(path):
        ext = os.path.splitext(path)[1].lower()
        if ext not in _HF_EXT:
            raise ValueError(f"data: {path!r}: expected a .json, .jsonl, .parquet, .arrow or "
                             f".csv file or a folder, got {ext or 'no extension'!r}")
        if ext == ".parquet":
            _check_parquet(path)
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its "Failed to read" lines
    try:
        ds = _load(datasets, path, streaming)
    except UserError:
        raise
    except Exception as exc:  # datasets / pyarrow errors have no common base class
        if not _is_read_error(exc):
            raise
        raise UserError(f"data: {path!r} cannot be read ({_cause(exc)})") from None
    finally:
        datasets.logging.set_verbosity(verbosity)
    if not streaming and len(ds) == 0:
        raise UserError(f"data: {path!r} holds no rows (an empty table)")
    return ds


def _load(datasets, path, streaming):
    from bpo_fast.errors import UserError

    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "dataset_info.json")) or \
                os.path.isfile(os.path.join(path, "state.json")) or \
                os.path.isfile(os.path.join(path, "dataset_dict.json")):
            ds = datasets.load_from_disk(path)
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds:
                    raise UserError(f"data: {path!r} is a DatasetDict without a 'train' split "
                                    f"(its splits: {sorted(ds)}); save the split to train on as "
                                    "'train'")
                ds = ds["train"]
            return ds.to_iterable_dataset() if streaming else ds
        return datasets.load_dataset(path, split="train", streaming=streaming)
    ext = os.path.splitext(path)[1].lower()
    return datasets.load_dataset(_HF_EXT[ext], data_files=path, split="train",
                                 streaming=streaming)


def _check_parquet(path):
    """A Parquet file's footer (rows, schema) readable and its table not empty."""
    from bpo_fast.errors import UserError

    import pyarrow.parquet as pq

    try:
        rows = pq.ParquetFile(path).metadata.num_rows
    except Exception as exc:  # pyarrow.ArrowInvalid (corrupt / truncated), OSError
        raise UserError(f"data: {path!r} is not a readable Parquet file, corrupt or truncated "
                        f"({_cause(exc)})") from None
    if rows == 0:
        raise UserError(f"data: {path!r} holds no rows (an empty Parquet table)")


def _cause(exc):
    while exc.__cause__ is not None or exc.__context__ is not None:
        inner = exc.__cause__ or exc.__context__
        if not str(inner):
            break
        exc = inner
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]


def _is_read_error(exc):
    """Errors of a file ``datasets`` / pyarrow cannot read (not bugs of ours or theirs)."""
    try:
        import pyarrow as pa

        arrow = (pa.ArrowException,)
    except ImportError:
        arrow = ()
    import datasets

    return isinstance(exc, (datasets.exceptions.DatasetsError, OSError, ValueError,
                            FileNotFoundError) + arrow)


def is_trl_record(rec):
    """A record in one of TRL's preference formats (not our schema, not official BPO)."""
    if not isinstance(rec, dict) or not {"prompt", "chosen", "rejected"} <= set(rec):
        return False
    p = rec["prompt"]
    return isinstance(p, str) or (isinstance(p, list) and bool(p) and isinstance(p[0], dict)
                                  and "role" in p[0])


def _content_text(content, what):
    """(text with ``<image>`` for image parts, image parts count) of a message content."""
    if isinstance(content, str):
        return content, content.count(IMAGE_PLACEHOLDER)
    if not isinstance(content, list):
        raise ValueError(f"{what}: expected a string or a list of parts, got "
                         f"{type(content).__name__}")
    texts, n = [], 0
    for j, part in enumerate(content):
        if not isinstance(part, dict) or "type" not in part:
            raise ValueError(f"{what}[{j}]: expected a part {{'type': 'text'|'image', ...}}")
        if part["type"] == "image":
            texts.append(IMAGE_PLACEHOLDER)
            n += 1
        elif part["type"] == "text":
            if not isinstance(part.get("text"), str):
                raise ValueError(f"{what}[{j}].text: expected a string")
            texts.append(part["text"])
        else:
            raise ValueError(f"{what}[{j}].type: expected 'text' or 'image', got "
                             f"{part['type']!r}")
    return "\n".join(t for t in texts if t), n


def _answer(value, what):
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"{what}: expected a non-empty answer")
        return value
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict) or "content" not in value[0]:
            raise ValueError(f"{what}: expected one assistant message, got {len(value)} "
                             "messages (TRL's implicit-prompt form, where chosen and rejected "
                             "repeat the prompt, is not supported: split the prompt out)")
        if value[0].get("role", "assistant") != "assistant":
            raise ValueError(f"{what}[0].role: expected 'assistant', got {value[0]['role']!r}")
        text, n = _content_text(value[0]["content"], f"{what}[0].content")
        if n:
            raise ValueError(f"{what}: an answer cannot hold images")
        if not text.strip():
            raise ValueError(f"{what}: expected a non-empty answer")
        return text
    raise ValueError(f"{what}: expected a string or a list of messages, got "
                     f"{type(value).__name__}")


def _images_of(rec):
    imgs = rec.get("images")
    if imgs is None:
        imgs = rec.get("image")
        imgs = [] if imgs is None else [imgs]
    if not isinstance(imgs, (list, tuple)):
        raise ValueError(f"images: expected a list, got {type(imgs).__name__}")
    return list(imgs)


def normalize_record(rec, fallback_id):
    """One record (any supported format) -> ``{"id", "prompt" (LLaVA turns), "chosen",
    "rejected", "images" (refs: paths, PIL images or {"bytes", "path"} dicts), "objects"}``;
    raises ``ValueError`` naming the field."""
    if not isinstance(rec, dict):
        raise ValueError(f"record: expected an object, got {type(rec).__name__}")
    for k in ("prompt", "chosen", "rejected"):
        if k not in rec:
            raise ValueError(f"record: missing field {k!r}")
    rid = rec.get("id")
    rid = str(rid) if rid not in (None, "") else fallback_id
    images = _images_of(rec)
    p = rec["prompt"]
    if isinstance(p, str):                        # TRL standard
        turns = [{"from": "human", "value": p}]
    elif isinstance(p, list) and p and all(isinstance(t, dict) for t in p):
        turns = []
        for i, t in enumerate(p):
            if "from" in t and "value" in t:      # ours (LLaVA turns)
                turns.append({"from": t["from"], "value": t["value"]})
                continue
            if "role" not in t or "content" not in t:
                raise ValueError(f"prompt[{i}]: expected {{'role', 'content'}} or "
                                 "{'from', 'value'}")
            if t["role"] not in _ROLE_TO_FROM:
                raise ValueError(f"prompt[{i}].role: expected user, assistant or system, got "
                                 f"{t['role']!r}")
            text, _ = _content_text(t["content"], f"prompt[{i}].content")
            turns.append({"from": _ROLE_TO_FROM[t["role"]], "value": text})
    else:
        raise ValueError("prompt: expected a string or a non-empty list of messages")
    if _ROLE_TO_FROM.get(turns[-1]["from"]) != "human":
        raise ValueError("prompt: the last message must be the user's")
    n_slots = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in turns)
    if n_slots == 0 and images:
        first = next(i for i, t in enumerate(turns) if t["from"] == "human")
        turns[first] = {"from": "human",
                        "value": "\n".join([IMAGE_PLACEHOLDER] * len(images) + [turns[first]["value"]])}
    elif n_slots != len(images):
        raise ValueError(f"images: the prompt has {n_slots} image placeholder(s) but the record "
                         f"{len(images)} image(s)")
    objects = rec.get("objects")
    return {"id": rid, "prompt": turns, "chosen": _answer(rec["chosen"], "chosen"),
            "rejected": _answer(rec["rejected"], "rejected"), "images": images,
            "objects": objects if isinstance(objects, list) else None}


def _item(rec, index, image_root, line):
    from bpo_fast.data.preference import load_images

    images, digests = load_images(rec["images"], image_root)
    return {"index": index, "id": rec["id"], "images": images, "image_digests": digests,
            "image": images[0] if len(images) == 1 else None, "prompt": rec["prompt"],
            "chosen": rec["chosen"], "rejected": rec["rejected"], "line": line}


def _undecoded_feature(feat):
    """``feat`` with its ``datasets.Image`` parts set to ``decode=False`` (None: no image)."""
    import copy

    import datasets

    if isinstance(feat, datasets.Image):
        return datasets.Image(decode=False)
    if isinstance(feat, list) and feat:
        inner = _undecoded_feature(feat[0])
        return None if inner is None else [inner]
    inner = getattr(feat, "feature", None)   # Sequence / List (datasets 2.x - 5.x)
    if inner is not None:
        new = _undecoded_feature(inner)
        if new is not None:
            feat = copy.copy(feat)
            feat.feature = new
            return feat
    return None


def _undecoded(table):
    """The table with its ``datasets.Image`` columns left as ``{"bytes", "path"}`` (decoded one
    pair at a time in ``__getitem__``, not all at once up front)."""
    for name, feat in (table.features or {}).items():
        new = _undecoded_feature(feat)
        if new is not None:
            table = table.cast_column(name, new)
    return table


class HFPreferenceDataset(torch.utils.data.Dataset):
    """Pairs of a ``datasets`` table; the interface of
    :class:`~bpo_fast.data.preference.PreferenceDataset` (items also carry ``images``, the list
    of a pair's images, empty for a text-only pair). Every record is checked once up front
    (images: that the files exist); bad ones are skipped and counted, or raise with
    ``strict``."""

    def __init__(self, path, image_root=None, *, strict=False):
        from bpo_fast.data.preference import BadRecordError, SkippedRecord

        self.path, self.image_root, self.strict = path, image_root, strict
        self.table = _undecoded(load_table(path))
        stem = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
        self.records, self.skipped, seen = [], [], {}
        for row, rec in enumerate(self.table):
            try:
                r = normalize_record(rec, f"{stem}:{row}")
                if r["id"] in seen:
                    raise ValueError(f"id: {r['id']!r} already used in row {seen[r['id']]}")
                for ref in r["images"]:
                    if isinstance(ref, str):
                        p = ref if os.path.isabs(ref) or image_root is None \
                            else os.path.join(image_root, ref)
                        if not os.path.isfile(p):
                            raise FileNotFoundError(f"image {p!r} not found")
            except (ValueError, OSError) as exc:
                if strict:
                    raise BadRecordError(f"{path}: row {row}: {exc}") from exc
                self.skipped.append(SkippedRecord(row, str(exc)))
                if len(self.skipped) <= 20:
                    warnings.warn(f"skipping bad record {path}: row {row}: {exc}", stacklevel=2)
                continue
            seen[r["id"]] = row
            r["row"] = row
            r["n_images"] = len(r["images"])
            r["images"] = None  # read again in __getitem__ (image bytes stay in the table)
            self.records.append(r)
        if self.skipped:
            logger.warning("%s: skipped %d bad record(s) of %d", path, len(self.skipped),
                           len(self.skipped) + len(self.records))
        if not self.records:
            raise ValueError(f"data: {path!r} holds no usable record ({len(self.skipped)} "
                             "skipped)")

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        r = dict(self.records[i])
        r["images"] = _images_of(self.table[r["row"]])
        return _item(r, i, self.image_root, r["row"])

    @property
    def ids(self):
        return [r["id"] for r in self.records]

    def objects(self):
        return {r["id"]: r["objects"] for r in self.records if r["objects"]}


class StreamingPairs(torch.utils.data.IterableDataset):
    """Pairs read lazily from a ``datasets`` streaming table, split over ranks
    (``datasets.distributed.split_dataset_by_node``) and shuffled with a buffer
    (``buffer_size``, seeded per epoch). ``set_epoch(epoch, start)`` skips the first ``start``
    pairs of this rank's share (resume). Bad records are skipped with a warning."""

    def __init__(self, path, image_root=None, *, seed=0, buffer_size=1000, rank=0, world=1,
                 shuffle=True):
        self.path, self.image_root = path, image_root
        self.seed, self.buffer_size, self.rank, self.world = seed, buffer_size, rank, world
        self.shuffle = shuffle
        self.epoch, self.start = 0, 0
        self.skipped = []
        self.stem = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
        load_table(path, streaming=True)  # fails now, not in the loop, on a bad path/format

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def __iter__(self):
        from datasets.distributed import split_dataset_by_node

        table = load_table(self.path, streaming=True)
        if self.shuffle:
            table = table.shuffle(seed=self.seed + self.epoch, buffer_size=self.buffer_size)
        if self.world > 1:
            table = split_dataset_by_node(table, rank=self.rank, world_size=self.world)
        n = 0
        for row, rec in enumerate(table):
            try:
                r = normalize_record(rec, f"{self.stem}:{row}")
                item = _item(r, n, self.image_root, row)
            except (ValueError, OSError) as exc:
                self.skipped.append((row, str(exc)))
                if len(self.skipped) <= 20:
                    warnings.warn(f"skipping bad record {self.path}: row {row}: {exc}",
                                  stacklevel=2)
                continue
            n += 1
            if n <= self.start:
                continue
            yield item


def _first_record(path, chunk=1 << 16, limit=1 << 26):
    """The first JSON record of a .json/.jsonl file, read incrementally: the first line of a
    JSONL file, the first element of a JSON array (chunks are read until it parses, never the
    whole array). None when it cannot be read (or is not within ``limit`` characters)."""
    dec = json.JSONDecoder()
    try:
        with open(path, encoding="utf-8-sig") as f:   # a BOM is dropped
            buf = f.read(chunk)
            is_array = buf.lstrip().startswith("[")
            while True:
                if is_array:
                    pos = buf.index("[") + 1
                    while pos < len(buf) and buf[pos] in " \t\r\n":
                        pos += 1
                    if buf[pos:pos + 1] == "]":
                        return None  # an empty array
                    try:
                        return dec.raw_decode(buf, pos)[0]
                    except ValueError:
                        pass  # the first element goes on past what was read
                elif "\n" in buf.lstrip():
                    return json.loads(buf.lstrip().split("\n", 1)[0])
                more = f.read(chunk)
                if not more or len(buf) >= limit:
                    return None if is_array else json.loads(buf.lstrip())
                buf += more
                chunk *= 2
    except (OSError, ValueError):
        return None


def uses_hf_reader(path, data_format="auto"):
    """Whether ``path`` goes through ``datasets`` (else: our JSONL / official-BPO reader)."""
    if data_format == "hf":
        return True
    if data_format == "pairs":
        return False
    if os.path.isdir(path) or os.path.splitext(path)[1].lower() not in (".json", ".jsonl"):
        return True
    return is_trl_record(_first_record(path))


def check_data_path(path, arg="data"):
    """``path`` is a pair file (text for JSON/JSONL) or a folder (raises ``UserError``)."""
    from bpo_fast.errors import UserError, input_dir, input_file

    if path and os.path.isdir(path):
        input_dir(path, arg, what="data folder")
        names = os.listdir(path)
        if not ({"dataset_info.json", "state.json", "dataset_dict.json"} & set(names)
                or any(os.path.splitext(n)[1].lower() in _HF_EXT for n in names)):
            raise UserError(f"{arg}: {path!r} is a directory without data files (expected a pair "
                            "file, or a folder of JSON/JSONL/Parquet/Arrow files or a "
                            "datasets save_to_disk folder)")
        return path
    text = os.path.splitext(str(path))[1].lower() not in (".parquet", ".arrow")
    return input_file(path, arg, what="preference pairs file (JSONL/JSON, Parquet, Arrow)",
                      text=text)


def open_pairs(path, image_root, *, strict=False, data_format="auto"):
    """The pair dataset of ``path`` for training, eval and ``ref-logps`` (see the module
    docstring for which reader)."""
    if uses_hf_reader(path, data_format):
        return HFPreferenceDataset(path, image_root, strict=strict)
    from bpo_fast.data.preference import PreferenceDataset

    return PreferenceDataset(path, image_root, strict=strict)
