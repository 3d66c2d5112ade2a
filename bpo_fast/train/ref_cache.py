"""Reference log-probs computed once over a data set, stored in a safetensors file keyed by pair id.

File layout (``safetensors``): tensors ``chosen_logps``/``rejected_logps`` (float32 ``[N]``),
``pair_digests`` and ``record_digests`` (uint8 ``[N, 16]``); metadata ``ids`` (JSON list, row
order), ``model``, ``model_fingerprint``, ``format`` ("bpo_fast.ref_logps.v2"), the settings that
change the numbers (``temperature``, ``max_length``, ``dtype``, processor arguments),
``bad_ids`` (pairs left out as bad samples) and ``sha256`` (of the ids and every tensor:
:meth:`RefLogpsCache.load` refuses a file that does not match, e.g. a torn copy).

The cache is bound to what it was computed from (:func:`check_compatible`, before the model loads,
and :meth:`RefLogpsCache.lookup`, for every batch):

- the reference model: :func:`model_fingerprint` of its config and weights (every tensor's
  first and last bytes, not all of them: cheap for a 7B model);
- each pair: :func:`~bpo_fast.data.preference.record_digest` of its texts (checked up front)
  and :func:`~bpo_fast.data.preference.pair_digest` of the token ids of its prompt, chosen and
  rejected answers and of its image bytes (checked when the pair is looked up).

Any mismatch is an error naming the first pair that differs. Non-finite log-probs are never
written: ``ref-logps`` stops naming the pairs.

Writing is resume-safe: every finished batch is appended (and flushed) to ``<out>.partial.jsonl``;
a rerun skips the ids already there; the safetensors file is written at the end to a temporary
name and renamed into place, and only then is the partial file removed. A crash leaves either no
output or a complete one, never a torn file.
"""

import hashlib
import json
import logging
import os

import torch

from bpo_fast.errors import UserError, writing

logger = logging.getLogger("bpo_fast")
FORMAT = "bpo_fast.ref_logps.v2"
_REDO = "; recompute it with `bpo-fast ref-logps`"


# --------------------------------------------------------------------------------------------
# the reference model's fingerprint
# --------------------------------------------------------------------------------------------

_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth")
_CONFIGS = ("config.json", "adapter_config.json")
_VOLATILE = ("transformers_version", "_name_or_path")  # differ between copies of one model
_SLICE = 64  # bytes read at each end of every tensor


def _safetensors_sample(path, h):
    """The header (names, dtypes, shapes, offsets) and the first and last ``_SLICE`` bytes of
    every tensor of a safetensors file."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"model: {path!r} is not a safetensors file (truncated)")
        n = int.from_bytes(head, "little")
        header = f.read(n)
        h.update(header)
        try:
            entries = json.loads(header)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"model: {path!r} is not a safetensors file (bad header)") from None
        base = 8 + n
        spans = sorted(tuple(v["data_offsets"]) for k, v in entries.items()
                       if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v)
        for b, e in spans:
            if e - b <= 2 * _SLICE:
                f.seek(base + b)
                h.update(f.read(e - b))
            else:
                f.seek(base + b)
                h.update(f.read(_SLICE))
                f.seek(base + e - _SLICE)
                h.update(f.read(_SLICE))


def _file_sample(path, h, k=64, size=4096):
    """``k`` slices of ``size`` bytes at evenly spaced offsets of a file (pickled weights)."""
    n = os.path.getsize(path)
    h.update(n.to_bytes(8, "little"))
    with open(path, "rb") as f:
        for i in range(k):
            f.seek(max(0, (n - size) * i // max(k - 1, 1)))
            h.update(f.read(size))


def model_fingerprint(path):
    """A hex digest of what a model folder computes: its ``config.json`` (and
    ``adapter_config.json``, the safetensors indices; copies' ``transformers_version`` and
    ``_name_or_path`` left out) and its weight files: each safetensors file's header and the
    first and last 64 bytes of every tensor (2 small reads per tensor): 5-10 ms for a 7B-size
    folder of 3 shards, 387 tensors, 14.3 GB, where a sha256 of the 14.3 GB takes 26-33 s from
    memory (``python bench/ref_fingerprint.py`` on a shared 2-core CPU machine; from disk the
    sha256 is slower still). Other weight files by size and 64 slices. A fine-tuned or another
    model differs in every tensor it changed; a change that leaves every tensor's first and
    last 64 bytes equal is not seen."""
    h = hashlib.blake2b(digest_size=16)
    names = sorted(n for n in os.listdir(path)
                   if n.endswith(_WEIGHTS) or n in _CONFIGS or n.endswith(".index.json"))
    for name in names:
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            continue
        h.update(name.encode() + b"\0")
        if name.endswith(".json"):
            from bpo_fast.data.jsonl import load_json

            try:
                cfg = load_json(full)
            except (ValueError, UnicodeDecodeError):
                raise UserError(f"model: {full!r} is not valid JSON") from None
            if isinstance(cfg, dict):
                cfg = {k: v for k, v in cfg.items() if k not in _VOLATILE}
            h.update(json.dumps(cfg, sort_keys=True).encode())
        elif name.endswith(".safetensors"):
            _safetensors_sample(full, h)
        else:
            _file_sample(full, h)
    return h.hexdigest()


class RefLogpsCache:
    """Cached reference log-probs: ``lookup(ids) -> (chosen, rejected)`` float32 tensors."""

    def __init__(self, ids, chosen_logps, rejected_logps, metadata=None, *, pair_digests=None,
                 record_digests=None):
        n = len(ids)
        if chosen_logps.shape != (n,) or rejected_logps.shape != (n,):
            raise ValueError(f"chosen_logps/rejected_logps: expected [{n}] each, got "
                             f"{tuple(chosen_logps.shape)} / {tuple(rejected_logps.shape)}")
        for name, d in (("pair_digests", pair_digests), ("record_digests", record_digests)):
            if d is not None and (d.dtype != torch.uint8 or tuple(d.shape) != (n, 16)):
                raise ValueError(f"{name}: expected uint8 [{n}, 16], got {d.dtype} "
                                 f"{tuple(d.shape)}")
        self.ids = list(ids)
        self.row = {k: i for i, k in enumerate(self.ids)}
        if len(self.row) != n:
            raise ValueError("ids: duplicated pair ids in the cache")
        self.chosen_logps = chosen_logps.float()
        self.rejected_logps = rejected_logps.float()
        self.pair_digests = pair_digests
        self.record_digests = record_digests
        self.metadata = dict(metadata or {})
        self.bad_ids = set(json.loads(self.metadata.get("bad_ids") or "[]")) \
            if isinstance(self.metadata.get("bad_ids"), str) else set(self.metadata.get("bad_ids") or ())

    def _tensors(self):
        t = {"chosen_logps": self.chosen_logps.contiguous(),
             "rejected_logps": self.rejected_logps.contiguous()}
        if self.pair_digests is not None:
            t["pair_digests"] = self.pair_digests.contiguous()
        if self.record_digests is not None:
            t["record_digests"] = self.record_digests.contiguous()
        return t

    def checksum(self):
        h = hashlib.sha256(json.dumps(self.ids).encode())
        for v in self._tensors().values():
            h.update(v.numpy().tobytes())
        return h.hexdigest()

    @classmethod
    def load(cls, path):
        """Read a cache; a missing, torn or foreign file raises
        :class:`~bpo_fast.errors.UserError` naming it."""
        from safetensors import safe_open

        from bpo_fast.errors import input_file

        input_file(path, "ref_cache", what="safetensors file from `bpo-fast ref-logps`")
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                t = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors' errors have no common base class
            raise UserError(f"ref_cache: {path!r} is damaged or not a safetensors file "
                            f"({' '.join(str(exc).split())}){_REDO}") from None
        if meta.get("format") != FORMAT:
            old = str(meta.get("format", "")).startswith("bpo_fast.ref_logps.")
            raise UserError(f"ref_cache: {path!r} is not a {FORMAT} file "
                            f"(format={meta.get('format')!r})"
                            + (f": written before caches were bound to their model and pairs"
                               f"{_REDO}" if old else ""))
        try:
            cache = cls(json.loads(meta["ids"]), t["chosen_logps"], t["rejected_logps"], meta,
                        pair_digests=t["pair_digests"], record_digests=t["record_digests"])
        except (KeyError, ValueError) as exc:
            raise UserError(f"ref_cache: {path!r} is incomplete ({exc}){_REDO}") from None
        if cache.checksum() != meta.get("sha256"):
            raise UserError(f"ref_cache: {path!r} does not match its checksum (damaged){_REDO}")
        return cache

    def __len__(self):
        return len(self.ids)

    def __contains__(self, pair_id):
        return pair_id in self.row

    def lookup(self, ids, device=None, *, digests=None):
        """The cached log-probs of ``ids``; ``digests`` (the collator's
        :func:`~bpo_fast.data.preference.pair_digest` of each pair) must equal those the cache
        was computed from: the first pair that differs is named in a
        :class:`~bpo_fast.errors.UserError`."""
        missing = [i for i in ids if i not in self.row]
        if missing:
            bad = [i for i in missing if i in self.bad_ids]
            if bad:
                raise UserError(f"ref_cache: pair {bad[0]!r} was a bad sample when the cache was "
                                "computed (see the ref-logps errors file), and has none; fix "
                                f"the sample and recompute the cache{_REDO}")
            raise KeyError(f"ref_cache: no reference log-probs for pair id(s) {missing[:5]} "
                           f"({len(missing)} missing){_REDO} on this data set")
        rows = torch.tensor([self.row[i] for i in ids], dtype=torch.long)
        if digests is not None and self.pair_digests is not None:
            want = self.pair_digests[rows]
            for k, (pid, d) in enumerate(zip(ids, digests)):
                if bytes(want[k].tolist()) != bytes(d):
                    raise UserError(
                        f"ref_cache: pair {pid!r} differs from the pair the cache was computed "
                        "for (its prompt, chosen or rejected token ids, or its image bytes: "
                        "other data, images, chat template, processor arguments or tokenizer)"
                        f"{_REDO}")
        c, r = self.chosen_logps[rows], self.rejected_logps[rows]
        return (c.to(device), r.to(device)) if device is not None else (c, r)

    def save(self, path):
        from safetensors.torch import save_file

        meta = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in self.metadata.items()}
        meta.update(format=FORMAT, ids=json.dumps(self.ids), sha256=self.checksum(),
                    bad_ids=json.dumps(sorted(self.bad_ids)))
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp.{os.getpid()}"

        def remove_tmp():
            if os.path.exists(tmp):
                os.remove(tmp)

        with writing(path, cleanup=remove_tmp):
            save_file(self._tensors(), tmp, metadata=meta)
            os.replace(tmp, path)


def _read_partial(path):
    """The pairs an interrupted run finished (``<out>.partial.jsonl``). A file there that this
    command did not write (its first line is not one of its records) is refused, never appended
    to or removed."""
    done = {}
    if not os.path.isfile(path):
        return done
    with open(path, "rb") as f:
        for n, line in enumerate(f):
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                rec = None
            if not (isinstance(rec, dict) and isinstance(rec.get("id"), str)
                    and "settings" in rec):
                torn_own = not line.endswith(b"\n") and line.startswith(b'{"id": ')
                if n == 0 and line.strip() and not torn_own:
                    raise UserError(f"out: {path!r} exists and was not written by bpo-fast "
                                    "ref-logps (not one of its partial records); it is left as "
                                    "it is: move it away or name another --out")
                break  # a torn last line from a crash: recompute from there
            done[rec["id"]] = rec
    return done


def _meta(cache, key, default=None):
    """A metadata value as written (JSON for non-strings)."""
    v = cache.metadata.get(key, default)
    if isinstance(v, str):
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return v
    return v


def errors_path(out):
    """``ref.safetensors`` -> ``ref.errors.jsonl``: the bad samples of a ``ref-logps`` run."""
    root, ext = os.path.splitext(out)
    return (root if ext == ".safetensors" else out) + ".errors.jsonl"


def _check_finite(batch_ids, lp, b, model_path, partial):
    """Non-finite log-probs are never written: the pairs are named, nothing of the batch kept."""
    bad = [pid for j, pid in enumerate(batch_ids)
           if not (torch.isfinite(lp[j]) and torch.isfinite(lp[b + j]))]
    if bad:
        raise UserError(
            f"ref-logps: non-finite reference log-probs for {len(bad)} pair(s) of this batch: "
            f"{bad[:5]}{' ...' if len(bad) > 5 else ''}; the model at {model_path!r} gives "
            "NaN/inf (damaged weights, or an fp16 overflow: try --dtype fp32 or bf16); not "
            f"written (the pairs finished before are kept in {partial} for a rerun)")


def compute_reference_logps(model_path, data, image_root, out, *, batch_size=8, max_length=None,
                            dtype=None, device=None, temperature=1.0, strict=False,
                            attn_implementation=None, progress=True, overwrite=False,
                            chat_template=None, data_format="auto", processor_kwargs=None,
                            max_bad_fraction=None, errors=None):
    """Reference log-probs of every usable pair of ``data`` under the model at ``model_path``,
    written to ``out`` (safetensors, see the module doc). Returns the :class:`RefLogpsCache`.

    Bad samples (:mod:`bpo_fast.data.bad_samples`) are named in ``errors`` (default
    ``<out stem>.errors.jsonl``), left out of the cache (listed in its ``bad_ids``) and
    counted; more than ``max_bad_fraction`` of them stop the run."""
    from bpo_fast.errors import DIR, FILE, ROOT, CommandGuard, input_dir, output_file
    from bpo_fast.options import check_processor_kwargs

    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    processor_kwargs = check_processor_kwargs(processor_kwargs)
    input_dir(model_path, "model", what="model directory (a save_pretrained folder)")
    from bpo_fast.data.hf_pairs import check_data_path

    check_data_path(data, "data")
    input_dir(image_root, "image_root", what="image directory")
    output_file(out, "out")
    if os.path.exists(out) and not overwrite:
        raise UserError(f"out: {out!r} exists; pass overwrite=True (--overwrite) to replace it")
    errors = errors or errors_path(out)
    output_file(errors, "errors")
    partial = out + ".partial.jsonl"
    state = {"done": None, "total": None}

    def stopped_at():
        if state["done"] is None:
            return "before any pair was scored", "", "rerun the same command"
        return (f"after {state['done']} of {state['total']} pairs",
                f"the pairs done are kept in {partial!r}", "rerun the same command to continue")

    inputs = [("model", model_path, DIR), ("data", data, None), ("image_root", image_root, ROOT)]
    if chat_template and os.path.isfile(chat_template):
        inputs.append(("chat_template", chat_template, FILE))
    with CommandGuard("ref-logps", inputs=inputs, status=stopped_at,
                      outputs=[("out", out, FILE), ("out", partial, FILE),
                               ("errors", errors, FILE)]):
        return _compute(model_path, data, image_root, out, partial, errors, state,
                        batch_size=batch_size, max_length=max_length, dtype=dtype, device=device,
                        temperature=temperature, strict=strict,
                        attn_implementation=attn_implementation, progress=progress,
                        chat_template=chat_template, data_format=data_format,
                        processor_kwargs=processor_kwargs, max_bad_fraction=max_bad_fraction)


def _compute(model_path, data, image_root, out, partial, errors, state, *, batch_size,
             max_length, dtype, device, temperature, strict, attn_implementation, progress,
             chat_template, data_format, processor_kwargs, max_bad_fraction):
    """The work of :func:`compute_reference_logps` (``state``: pairs done and in all, for the
    guard's line)."""
    from bpo_fast.data.bad_samples import BadSamples, GuardedPairs
    from bpo_fast.data.hf_pairs import open_pairs
    from bpo_fast.data.jsonl import repair_torn_tail
    from bpo_fast.data.preference import PreferenceCollator, record_digest
    from bpo_fast.models.preference import PreferenceModel, load_vlm
    from bpo_fast.models.vlm import load_processor
    from bpo_fast.options import MAX_BAD_FRACTION
    from bpo_fast.runtime import parse_dtype, resolve_device

    device = resolve_device(device)
    dtype = parse_dtype(dtype, device)
    resume = os.path.isfile(partial)
    bad = BadSamples(errors, "ref-logps", resume=resume,
                     max_fraction=MAX_BAD_FRACTION if max_bad_fraction is None
                     else max_bad_fraction)
    ds = open_pairs(data, image_root, strict=strict, data_format=data_format)
    bad.add_skipped(data, ds)
    bad.check()
    done = _read_partial(partial)
    settings = {"model": os.path.abspath(model_path),
                "model_fingerprint": model_fingerprint(model_path),
                "temperature": float(temperature), "max_length": max_length,
                "dtype": str(dtype).replace("torch.", "")}
    if processor_kwargs:
        settings["processor_kwargs"] = processor_kwargs
    if chat_template:
        import zlib

        settings["chat_template_crc"] = f"{zlib.crc32(chat_template.encode()):08x}"
    if done:
        first = next(iter(done.values()))
        if first.get("settings") != settings:
            raise UserError(f"out: {partial!r} was started with other settings "
                            f"({first.get('settings')}); delete it or use the same settings")
        logger.info("ref-logps: resuming, %d of %d pairs already done", len(done), len(ds))
    bad_ids = {e["id"] for e in bad.errors.existing if e.get("id") is not None}
    todo = [i for i, r in enumerate(ds.records) if r["id"] not in done]
    state.update(done=len(ds) - len(todo), total=len(ds))
    if todo:
        model = load_vlm(model_path, dtype=dtype, attn_implementation=attn_implementation,
                         device=device)
        model.eval()
        pm = PreferenceModel(model, reference_mode="cached", temperature=temperature)
        # the same collator, adapter and head as training: the values are the HF forward's
        collate = PreferenceCollator(load_processor(model_path), max_length=max_length,
                                     model_type=model.config.model_type,
                                     chat_template=chat_template,
                                     processor_kwargs=processor_kwargs or None)
        collate.check_dataset(ds)
        # a bad sample is noted and left out of its batch (the cache has no value for it)
        loader = torch.utils.data.DataLoader(
            GuardedPairs(ds, collate.encode, file=data, substitute=False, indices=todo),
            batch_size=batch_size, collate_fn=collate.batch)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc="ref-logps", unit="pair")
        repair_torn_tail(partial)  # a write cut short (a kill, a full disk): appended after
        try:
            with torch.no_grad():
                for batch in loader:
                    bad.note(batch["bad"])
                    bad_ids.update(e["id"] for e in batch["bad"] if e.get("id") is not None)
                    bad.check()
                    if bar is not None:
                        bar.update(len(batch["ids"]) + len(batch["bad"]))
                    if not batch["ids"]:
                        continue
                    dev = {k: v.to(device) for k, v in batch.items()
                           if isinstance(v, torch.Tensor)}
                    extra = {k: v for k, v in dev.items()
                             if k not in ("input_ids", "attention_mask", "labels",
                                          "pixel_values", "index")}
                    pixels = dev.get("pixel_values")  # None: a text-only batch
                    pm._check_batch(dev["input_ids"], dev["attention_mask"], dev["labels"],
                                    pixels, extra)
                    lp, n = pm.sequence_logps(model, dev["input_ids"], dev["attention_mask"],
                                              dev["labels"], pixels, **extra)
                    b = len(batch["ids"])
                    lp = lp.float().cpu()
                    _check_finite(batch["ids"], lp, b, model_path, partial)
                    recs = [{"id": pid, "chosen": lp[j].item(), "rejected": lp[b + j].item(),
                             "digest": batch["digests"][j].hex(), "settings": settings}
                            for j, pid in enumerate(batch["ids"])]
                    # one write per batch (a fault tears one line at most), the file closed
                    # inside writing(): closing flushes what a failed write left buffered
                    with writing(partial), open(partial, "a", encoding="utf-8") as f:
                        f.write("".join(json.dumps(r) + "\n" for r in recs))
                        f.flush()
                        os.fsync(f.fileno())
                    done.update((r["id"], r) for r in recs)
                    state["done"] += b
        finally:
            if bar is not None:
                bar.close()
            bad.close()
    ids = [i for i in ds.ids if i in done]
    if not ids:
        raise UserError(f"ref-logps: no pair of {data} could be scored: every one is a bad "
                        f"sample ({bad.reasons(data)}); each is named in {errors}")

    def digests(values):
        return torch.tensor([list(v) for v in values], dtype=torch.uint8).reshape(len(ids), 16)

    by_id = {r["id"]: r for r in ds.records}
    cache = RefLogpsCache(
        ids,
        torch.tensor([done[i]["chosen"] for i in ids], dtype=torch.float32),
        torch.tensor([done[i]["rejected"] for i in ids], dtype=torch.float32),
        metadata={**settings, "data": os.path.abspath(data), "skipped": bad.count(),
                  "bad_ids": sorted(set(ds.ids) & bad_ids - set(ids))},
        pair_digests=digests(bytes.fromhex(done[i]["digest"]) for i in ids),
        record_digests=digests(record_digest(by_id[i]) for i in ids))
    cache.save(out)
    os.remove(partial) if os.path.exists(partial) else None
    logger.info("ref-logps: wrote %d pairs to %s%s", len(ids), out,
                f" ({bad.count()} bad samples named in {errors})" if bad.count() else "")
    return cache


def check_compatible(cache, *, path, max_length, reference_model, ids, data, records=None,
                     processor_kwargs=None):
    """The rules a cache must meet to stand in for the reference of a training run, checked
    before any model loads: the same ``max_length`` and processor arguments (they change the
    pixels, which the pair digests do not see); temperature 1.0 (the policy's); the same
    reference model (:func:`model_fingerprint`: a copy of the same weights elsewhere passes,
    other weights or config do not); every pair id of the data (except the pairs the cache
    names as bad samples); and each pair's texts (``records``:
    :func:`~bpo_fast.data.preference.record_digest`). The token ids and image bytes of each
    pair are checked when it is looked up (:meth:`RefLogpsCache.lookup`)."""
    from bpo_fast.data.preference import record_digest

    cached_len = _meta(cache, "max_length")
    if cached_len != max_length:
        raise UserError(f"ref_cache: {path!r} was computed with max_length={cached_len}, "
                        f"training uses {max_length}; the log-probs would not match")
    cached_kw = _meta(cache, "processor_kwargs") or None
    if cached_kw != (processor_kwargs or None):
        raise UserError(f"ref_cache: {path!r} was computed with processor_kwargs={cached_kw}, "
                        f"training uses {processor_kwargs or None}; the log-probs would not "
                        "match")
    cached_t = float(_meta(cache, "temperature", 1.0))
    if cached_t != 1.0:
        raise UserError(f"ref_cache: {path!r} was computed with temperature={cached_t}, "
                        "training scores the policy at temperature 1.0; the log-probs would "
                        "not match")
    want = cache.metadata.get("model_fingerprint")
    got = model_fingerprint(reference_model)
    if want != got:
        raise UserError(f"ref_cache: {path!r} was computed with the model at "
                        f"{cache.metadata.get('model')} (fingerprint {want}), the reference "
                        f"here, {os.path.abspath(reference_model)}, differs in its weights or "
                        f"config (fingerprint {got}){_REDO} with this reference")
    missing = [i for i in ids if i not in cache and i not in cache.bad_ids]
    if missing:
        raise UserError(f"ref_cache: {len(missing)} pair id(s) of {data} are not in {path} "
                        f"(e.g. {missing[:3]}); rerun `bpo-fast ref-logps`")
    if records is not None and cache.record_digests is not None:
        for rec in records:
            row = cache.row.get(rec["id"])
            if row is not None and bytes(cache.record_digests[row].tolist()) != \
                    record_digest(rec):
                line = rec.get("line", rec.get("row"))
                raise UserError(f"ref_cache: pair {rec['id']!r} of {data}"
                                + (f" (line {line})" if line is not None else "")
                                + f" differs from the pair {path!r} was computed for (its "
                                  f"prompt, chosen or rejected text){_REDO} on this data")
