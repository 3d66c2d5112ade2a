"""Preference pairs for training: the pair JSONL + an image root, and the collator.

:class:`PreferenceDataset` reads the JSONL written by the pair builder (see
:mod:`bpo_fast.data.schema`) or the official BPO release (``completions`` records, JSON array or
JSONL: :mod:`bpo_fast.data.bpo_format`), checks every record once up front and skips the bad ones (malformed
JSON, schema errors such as an empty response, a missing or unreadable image; a record with
``"image": null`` is a text-only pair),
counting them and warning with the line number, or raises with ``strict=True``.

:class:`PreferenceCollator` turns pairs into the ``[chosen; rejected]`` batch
:class:`bpo_fast.PreferenceModel` takes, with the model's own processor: the chat template (via
:func:`~bpo_fast.data.schema.turns_to_messages`), the image processor (each image once per pair),
labels ``-100`` on the prompt, the image tokens and the padding, truncation that keeps the image
and the prompt and cuts the responses, right padding.
"""

import logging
import os
import warnings
from dataclasses import dataclass, field

import torch

from bpo_fast.data.schema import (SchemaError, placeholder_mismatch, turns_to_messages,
                                  validate_pair)

logger = logging.getLogger("bpo_fast")
IGNORE_INDEX = -100


class BadRecordError(ValueError):
    """A record that cannot be trained on (raised in strict mode; the message names the line)."""


@dataclass
class SkippedRecord:
    line: int
    reason: str


def _check_image(path):
    from PIL import Image

    if not os.path.isfile(path):
        raise FileNotFoundError(f"image {path!r} not found")
    try:
        with Image.open(path) as im:
            im.verify()  # reads the whole file: catches truncated / corrupt images
    except Exception as exc:  # PIL raises many types for bad files
        raise OSError(f"image {path!r} is unreadable ({type(exc).__name__}: {exc})") from exc


def load_images(refs, image_root):
    """A pair's images by the one loader (:func:`bpo_fast.data.images.open_image`): (RGB PIL
    images, digests of their bytes)."""
    from bpo_fast.data.images import open_image

    got = [open_image(r, image_root) for r in refs]
    return [g[0] for g in got], [g[1] for g in got]


def pair_digest(prompt_ids, chosen_ids, rejected_ids, image_digests):
    """16 bytes that bind a pair's reference log-probs to what they were computed from: the token
    ids of the prompt (image tokens expanded), of the chosen and of the rejected answer (as
    scored, after truncation), and the digests of the image bytes."""
    import hashlib

    import numpy as np

    h = hashlib.blake2b(digest_size=16)
    for ids in (prompt_ids, chosen_ids, rejected_ids):
        h.update(len(ids).to_bytes(4, "little"))
        h.update(np.asarray(ids, dtype=np.int64).tobytes())
    for d in image_digests:
        h.update(d)
    return h.digest()


def record_digest(rec):
    """16 bytes of a pair record's texts (prompt turns, chosen, rejected): what the reference
    cache checks up front, before any model loads."""
    import hashlib
    import json

    text = json.dumps([rec["prompt"], rec["chosen"], rec["rejected"]], sort_keys=True,
                      ensure_ascii=False)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


class PreferenceDataset(torch.utils.data.Dataset):
    """Pairs from ``path`` (JSONL) with images under ``image_root``.

    Items are dicts ``{"index", "id", "image" (RGB PIL image, None for a text-only pair), "images"
    (the pair's images as a list), "prompt" (LLaVA turns), "chosen",
    "rejected", "line"}``. ``skipped`` lists the records left out (line number and reason).
    ``check_images=False`` only checks that image files exist (faster on huge sets; a corrupt
    image then fails when it is loaded).
    """

    MAX_WARNINGS = 20  # one warning per bad record up to this many; the summary counts them all

    def __init__(self, path, image_root, *, strict=False, check_images=True):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data: {path!r} is not a file")
        if not os.path.isdir(image_root):
            raise FileNotFoundError(f"image_root: {image_root!r} is not a directory")
        self.path = path
        self.image_root = image_root
        self.strict = strict
        self.check_images = check_images
        self.records = []
        self.skipped = []
        seen = {}
        counts = {}   # records read: one official BPO record may give several pairs, or none
        from bpo_fast.data.bpo_format import iter_pair_records

        for line_no, rec in iter_pair_records(path, counts):
            try:
                rec = self._parse(rec, line_no, seen)
            except (ValueError, OSError) as exc:
                msg = f"{path}:{line_no}: {exc}"
                if strict:
                    raise BadRecordError(msg) from exc
                self.skipped.append(SkippedRecord(line_no, str(exc)))
                if len(self.skipped) <= self.MAX_WARNINGS:
                    warnings.warn(f"skipping bad record {msg}", stacklevel=2)
                continue
            seen[rec["id"]] = line_no
            self.records.append(rec)
        self.n_records = counts.get("records", 0)
        if self.skipped:
            logger.warning("%s: skipped %d bad record(s) of %d record(s); %d pair(s) kept "
                           "(lines %s)", path, len(self.skipped), self.n_records,
                           len(self.records), ", ".join(str(s.line) for s in self.skipped[:20]))
        if not self.records:
            raise ValueError(f"data: {path!r} holds no usable record "
                             f"({len(self.skipped)} skipped)")

    def _parse(self, rec, line_no, seen):
        if isinstance(rec, Exception):  # unparseable line / malformed BPO record
            raise rec
        try:
            validate_pair(rec)
        except SchemaError as exc:
            raise ValueError(f"schema: {exc}") from None
        if rec["id"] in seen:
            raise ValueError(f"id: {rec['id']!r} already used on line {seen[rec['id']]}")
        bad = placeholder_mismatch(rec["prompt"], 0 if rec["image"] is None else 1)
        if bad:
            raise ValueError(bad)
        if rec["image"] is None:  # a text-only pair
            return {"id": rec["id"], "image_path": None, "prompt": rec["prompt"],
                    "chosen": rec["chosen"], "rejected": rec["rejected"], "line": line_no}
        img = os.path.join(self.image_root, rec["image"])
        if self.check_images:
            _check_image(img)  # opens and verifies the file: catches corrupt images up front
        elif not os.path.isfile(img):
            raise FileNotFoundError(f"image {img!r} not found")
        return {"id": rec["id"], "image_path": img, "prompt": rec["prompt"],
                "chosen": rec["chosen"], "rejected": rec["rejected"], "line": line_no}

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        rec = self.records[i]
        refs = [rec["image_path"]] if rec["image_path"] is not None else []
        images, digests = load_images(refs, None)
        return {"index": i, "id": rec["id"], "image": images[0] if images else None,
                "images": images, "image_digests": digests, "prompt": rec["prompt"],
                "chosen": rec["chosen"], "rejected": rec["rejected"], "line": rec["line"]}

    @property
    def ids(self):
        return [r["id"] for r in self.records]


def model_type_of_processor(processor):
    """The family of a processor (``Qwen2VLProcessor`` -> ``qwen2_vl``): the ``model_type`` of
    the model-layer registry (:data:`bpo_fast.models.vlm.ADAPTERS`, and the families it rejects)
    whose processor class (transformers' processor mapping) the processor is, or derives from;
    ``llava`` for an unknown class (any LLaVA-style processor)."""
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    from bpo_fast.models.vlm import ADAPTERS, UNSUPPORTED

    by_class = {PROCESSOR_MAPPING_NAMES[mt]: mt for mt in (*ADAPTERS, *UNSUPPORTED)
                if mt in PROCESSOR_MAPPING_NAMES}
    for cls in type(processor).__mro__:
        if cls.__name__ in by_class:
            return by_class[cls.__name__]
    return "llava"


def _where(item):
    line = item.get("line")
    return f"pair {item['id']!r}" + (f" (line {line})" if line is not None else "")


@dataclass
class PreferenceCollator:
    """Pairs -> ``{"input_ids", "attention_mask", "labels"}`` of shape ``[2B, T]`` (rows
    ``[chosen; rejected]``), the image-processor outputs of the ``B`` images (``"pixel_values"``
    plus e.g. ``image_sizes``, ``image_grid_thw``, ``pixel_attention_mask``), batched by the
    family's adapter (:meth:`bpo_fast.models.vlm.VLMAdapter.collate_images`: flattened patches
    concatenated, per-image tile stacks zero-padded as the processor pads them), ``"ids"`` (pair
    ids), ``"index"`` (dataset indices), ``"digests"`` (:func:`pair_digest` of each pair) and
    ``"bad"`` (bad-sample notes, :mod:`bpo_fast.data.bad_samples`).

    Two steps, so that a bad sample can be caught where it is met (in DataLoader workers too):
    :meth:`encode` (one pair: chat template, processor, truncation) and :meth:`batch` (padding of
    encoded pairs); calling the collator on raw items does both.

    ``model_type``: the family (``config.model_type``); None reads it from the processor's class
    name, else assumes LLaVA. ``chat_template``: ``--chat-template`` (see
    :func:`bpo_fast.models.vlm.resolve_chat_template`: else the processor's, else the family's
    documented default, else an error). ``processor_kwargs``: extra arguments of every processor
    call (``--processor-kwargs``, e.g. ``{"do_pan_and_scan": true}`` for Gemma 3).

    ``max_length`` caps each row: the prompt (with all its image tokens) is kept whole and the
    response is cut; a prompt that alone reaches ``max_length`` keeps one response token (the row
    is then longer than ``max_length``; a warning says so).
    """

    processor: object
    max_length: int = None
    pad_to_multiple_of: int = None
    model_type: str = None
    chat_template: str = None
    processor_kwargs: dict = None
    _warned: set = field(default_factory=set, repr=False)

    def __post_init__(self):
        from bpo_fast.models.vlm import get_adapter, resolve_chat_template

        tok = getattr(self.processor, "tokenizer", None)
        if tok is None or not callable(getattr(self.processor, "apply_chat_template", None)):
            raise TypeError("processor: expected a multimodal processor with a tokenizer and a chat "
                            "template (e.g. AutoProcessor.from_pretrained(model_path))")
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length < 2):
            raise ValueError(f"max_length: expected an int >= 2 or None, got {self.max_length!r}")
        if self.processor_kwargs is not None and not isinstance(self.processor_kwargs, dict):
            raise TypeError(f"processor_kwargs: expected a dict, got "
                            f"{type(self.processor_kwargs).__name__}")
        if self.model_type is None:
            self.model_type = model_type_of_processor(self.processor)
        self.adapter = get_adapter(self.model_type)
        self.template = resolve_chat_template(self.processor, self.model_type, self.chat_template)
        self.tokenizer = tok
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if self.pad_id is None:
            raise ValueError("processor: the tokenizer has neither a pad nor an eos token")

    def check_dataset(self, dataset):
        """Raise (naming the first such pair) when ``dataset`` holds pairs whose image count the
        family cannot take (:meth:`~bpo_fast.models.vlm.VLMAdapter.check_pair_images`: e.g.
        text-only or multi-image pairs on PaliGemma), before any model work; a dataset without
        an up-front record list (a stream) is checked batch by batch in :meth:`encode_pair`."""
        if self.adapter.text_only_pairs and self.adapter.multi_image_pairs:
            return
        for rec in getattr(dataset, "records", None) or ():
            n = rec["n_images"] if "n_images" in rec else int(rec.get("image_path") is not None)
            self.adapter.check_pair_images(n, _where(rec))

    def prompt_text(self, messages):
        """The prompt as the model sees it before the image expansion (generation prompt on)."""
        if self.template is None:  # the processor builds the prompt (PaliGemma)
            from bpo_fast.models.vlm import processor_prompt

            return processor_prompt(self.processor, messages)
        return self.processor.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True,
                                                  chat_template=self.template)

    def encode_pair(self, item):
        """(prompt ids with image tokens expanded, chosen response ids, rejected response ids,
        image-processor outputs) of one pair."""
        from bpo_fast.data.bad_samples import SampleError

        images = item["images"] if item.get("images") is not None else \
            [im for im in (item.get("image"),) if im is not None]
        self.adapter.check_pair_images(len(images), _where(item))
        bad = placeholder_mismatch(item["prompt"], len(images))
        if bad:
            raise SampleError(f"{_where(item)}: {bad}")
        messages = turns_to_messages(item["prompt"])
        prompt, (chosen, rejected), image_out = self.adapter.encode_pair(
            self.processor, self.template, messages, self.prompt_text(messages),
            [item["chosen"], item["rejected"]], images, self.tokenizer,
            processor_kwargs=self.processor_kwargs)
        return prompt, chosen, rejected, image_out

    def encode(self, item):
        """One pair, encoded and truncated: ``{"id", "index", "line", "prompt", "chosen",
        "rejected" (token ids), "images" (image-processor outputs), "digest"}``."""
        from bpo_fast.data.bad_samples import SampleError

        prompt, chosen, rejected, image_out = self.encode_pair(item)
        out = []
        for resp in (chosen, rejected):
            if not resp:
                raise SampleError(f"{_where(item)}: the response is empty after tokenisation")
            if self.max_length is not None:
                room = max(1, self.max_length - len(prompt))
                if len(prompt) + 1 > self.max_length and "long_prompt" not in self._warned:
                    self._warned.add("long_prompt")
                    warnings.warn(f"pair {item['id']!r}: the prompt ({len(prompt)} tokens with "
                                  f"the image) reaches max_length={self.max_length}; keeping "
                                  "one response token", stacklevel=2)
                resp = resp[:room]
            out.append(resp)
        digests = item.get("image_digests")
        if digests is None:  # images given as PIL images (the Python API): digest the pixels
            from bpo_fast.data.images import image_digest

            imgs = item["images"] if item.get("images") is not None else \
                [im for im in (item.get("image"),) if im is not None]
            digests = [image_digest(im.tobytes()) for im in imgs]
        return {"id": item["id"], "index": item["index"], "line": item.get("line"),
                "prompt": prompt, "chosen": out[0], "rejected": out[1], "images": image_out,
                "digest": pair_digest(prompt, out[0], out[1], digests)}

    def batch(self, encoded):
        """Encoded pairs (:meth:`encode`, or :class:`~bpo_fast.data.bad_samples.GuardedPairs`
        items: markers of bad samples are left out, their notes kept in ``"bad"``) -> the
        batch. A batch with no pair left: ``{"ids": [], "bad": [...]}``."""
        bad = [n for e in encoded for n in e.get("bad", ())]
        encoded = [e for e in encoded if not e.get("skip")]
        if not encoded:
            return {"ids": [], "bad": bad, "digests": []}
        rows_c = [e["prompt"] + e["chosen"] for e in encoded]
        rows_r = [e["prompt"] + e["rejected"] for e in encoded]
        lab_c = [[IGNORE_INDEX] * len(e["prompt"]) + e["chosen"] for e in encoded]
        lab_r = [[IGNORE_INDEX] * len(e["prompt"]) + e["rejected"] for e in encoded]
        rows, labs = rows_c + rows_r, lab_c + lab_r
        t = max(len(r) for r in rows)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            t = (t + m - 1) // m * m
        n = len(rows)
        input_ids = torch.full((n, t), self.pad_id, dtype=torch.long)
        labels = torch.full((n, t), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((n, t), dtype=torch.long)
        for i, (r, lab) in enumerate(zip(rows, labs)):
            input_ids[i, :len(r)] = torch.tensor(r)
            labels[i, :len(r)] = torch.tensor(lab)
            attention_mask[i, :len(r)] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        batch.update(self.adapter.collate_images([e["images"] for e in encoded]))
        batch["ids"] = [e["id"] for e in encoded]
        batch["index"] = torch.tensor([e["index"] for e in encoded], dtype=torch.long)
        batch["digests"] = [e["digest"] for e in encoded]
        batch["bad"] = bad
        if any("seen" in e for e in encoded):  # a stream: samples read so far
            batch["seen"] = max(e.get("seen", 0) for e in encoded)
        return batch

    def __call__(self, items):
        if not items:
            raise ValueError("items: expected at least one pair")
        return self.batch([self.encode(item) for item in items])
