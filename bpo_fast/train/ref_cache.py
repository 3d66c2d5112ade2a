"""Reference log-probs computed once over a data set, stored in a safetensors file keyed by pair id.

File layout (``safetensors``): tensors ``chosen_logps``/``rejected_logps`` (float32 ``[N]``);
metadata ``ids`` (JSON list, row order), ``model``, ``format`` ("bpo_fast.ref_logps.v1"), the
settings that change the numbers (``temperature``, ``max_length``), and ``sha256`` (of the ids
and both tensors: :meth:`RefLogpsCache.load` refuses a file that does not match, e.g. a torn
copy). :func:`check_compatible` holds the rules a cache must meet to be used for a training run.

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

logger = logging.getLogger("bpo_fast")
FORMAT = "bpo_fast.ref_logps.v1"


class RefLogpsCache:
    """Cached reference log-probs: ``lookup(ids) -> (chosen, rejected)`` float32 tensors."""

    def __init__(self, ids, chosen_logps, rejected_logps, metadata=None):
        n = len(ids)
        if chosen_logps.shape != (n,) or rejected_logps.shape != (n,):
            raise ValueError(f"chosen_logps/rejected_logps: expected [{n}] each, got "
                             f"{tuple(chosen_logps.shape)} / {tuple(rejected_logps.shape)}")
        self.ids = list(ids)
        self.row = {k: i for i, k in enumerate(self.ids)}
        if len(self.row) != n:
            raise ValueError("ids: duplicated pair ids in the cache")
        self.chosen_logps = chosen_logps.float()
        self.rejected_logps = rejected_logps.float()
        self.metadata = dict(metadata or {})

    def checksum(self):
        h = hashlib.sha256(json.dumps(self.ids).encode())
        h.update(self.chosen_logps.contiguous().numpy().tobytes())
        h.update(self.rejected_logps.contiguous().numpy().tobytes())
        return h.hexdigest()

    @classmethod
    def load(cls, path):
        """Read a cache; a missing, torn or foreign file raises
        :class:`~bpo_fast.errors.UserError` naming it."""
        from safetensors import safe_open

        from bpo_fast.errors import UserError, input_file

        input_file(path, "ref_cache", what="safetensors file from `bpo-fast ref-logps`")
        redo = "; recompute it with `bpo-fast ref-logps`"
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                t = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors' errors have no common base class
            raise UserError(f"ref_cache: {path!r} is damaged or not a safetensors file "
                            f"({' '.join(str(exc).split())}){redo}") from None
        if meta.get("format") != FORMAT:
            raise UserError(f"ref_cache: {path!r} is not a {FORMAT} file "
                            f"(format={meta.get('format')!r})")
        try:
            cache = cls(json.loads(meta["ids"]), t["chosen_logps"], t["rejected_logps"], meta)
        except (KeyError, ValueError) as exc:
            raise UserError(f"ref_cache: {path!r} is incomplete ({exc}){redo}") from None
        if "sha256" in meta and cache.checksum() != meta["sha256"]:
            raise UserError(f"ref_cache: {path!r} does not match its checksum (damaged){redo}")
        return cache

    def __len__(self):
        return len(self.ids)

    def __contains__(self, pair_id):
        return pair_id in self.row

    def lookup(self, ids, device=None):
        missing = [i for i in ids if i not in self.row]
        if missing:
            raise KeyError(f"ref cache: no reference log-probs for pair id(s) {missing[:5]} "
                           f"({len(missing)} missing); recompute it with `bpo-fast ref-logps` on "
                           "this data set")
        rows = torch.tensor([self.row[i] for i in ids], dtype=torch.long)
        c, r = self.chosen_logps[rows], self.rejected_logps[rows]
        return (c.to(device), r.to(device)) if device is not None else (c, r)

    def save(self, path):
        from safetensors.torch import save_file

        meta = {k: str(v) for k, v in self.metadata.items()}
        meta.update(format=FORMAT, ids=json.dumps(self.ids), sha256=self.checksum())
        tensors = {"chosen_logps": self.chosen_logps.contiguous(),
                   "rejected_logps": self.rejected_logps.contiguous()}
        from bpo_fast.errors import writing

        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp.{os.getpid()}"

        def remove_tmp():
            if os.path.exists(tmp):
                os.remove(tmp)

        with writing(path, cleanup=remove_tmp):
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, path)


def _read_partial(path):
    done = {}
    if not os.path.isfile(path):
        return done
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break  # a torn last line from a crash: recompute from there
            done[rec["id"]] = rec
    return done


def compute_reference_logps(model_path, data, image_root, out, *, batch_size=8, max_length=None,
                            dtype=None, device=None, temperature=1.0, strict=False,
                            attn_implementation=None, progress=True, overwrite=False,
                            chat_template=None, data_format="auto"):
    """Reference log-probs of every usable pair of ``data`` under the model at ``model_path``,
    written to ``out`` (safetensors, see the module doc). Returns the :class:`RefLogpsCache`."""
    from bpo_fast.data.hf_pairs import check_data_path
    from bpo_fast.errors import DIR, FILE, ROOT, CommandGuard, UserError, input_dir, output_file

    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    input_dir(model_path, "model", what="model directory (a save_pretrained folder)")
    check_data_path(data, "data")
    input_dir(image_root, "image_root", what="image directory")
    output_file(out, "out")
    if os.path.exists(out) and not overwrite:
        raise UserError(f"out: {out!r} exists; pass overwrite=True (--overwrite) to replace it")
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
    with CommandGuard("ref-logps", inputs=inputs,
                      outputs=[("out", out, FILE), ("out", partial, FILE)],
                      status=stopped_at):
        return _compute(model_path, data, image_root, out, partial, state,
                        batch_size=batch_size, max_length=max_length, dtype=dtype, device=device,
                        temperature=temperature, strict=strict,
                        attn_implementation=attn_implementation, progress=progress,
                        chat_template=chat_template, data_format=data_format)


def _compute(model_path, data, image_root, out, partial, state, *, batch_size, max_length,
             dtype, device, temperature, strict, attn_implementation, progress,
             chat_template, data_format):
    """The work of :func:`compute_reference_logps` (``state``: pairs done and in all, for the
    guard's line)."""
    from bpo_fast.data.hf_pairs import open_pairs
    from bpo_fast.data.preference import PreferenceCollator
    from bpo_fast.errors import writing
    from bpo_fast.models.preference import PreferenceModel, load_vlm
    from bpo_fast.models.vlm import load_processor
    from bpo_fast.runtime import parse_dtype, resolve_device

    device = resolve_device(device)
    dtype = parse_dtype(dtype, device)
    ds = open_pairs(data, image_root, strict=strict, data_format=data_format)
    done = _read_partial(partial)
    settings = {"model": os.path.abspath(model_path), "temperature": float(temperature),
                "max_length": max_length, "dtype": str(dtype).replace("torch.", "")}
    if chat_template:
        import zlib

        settings["chat_template_crc"] = f"{zlib.crc32(chat_template.encode()):08x}"
    if done:
        first = next(iter(done.values()))
        if first.get("settings") != settings:
            raise ValueError(f"out: {partial!r} was started with other settings "
                             f"({first.get('settings')}); delete it or use the same settings")
        logger.info("ref-logps: resuming, %d of %d pairs already done", len(done), len(ds))
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
                                     chat_template=chat_template)
        collate.check_dataset(ds)
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, todo),
                                             batch_size=batch_size, collate_fn=collate)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc="ref-logps", unit="pair")
        from bpo_fast.data.jsonl import repair_torn_tail

        repair_torn_tail(partial)  # a write cut short (a kill, a full disk): appended after
        with torch.no_grad():
            for batch in loader:
                dev = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
                extra = {k: v for k, v in dev.items()
                         if k not in ("input_ids", "attention_mask", "labels", "pixel_values", "index")}
                pixels = dev.get("pixel_values")  # None: a text-only batch
                pm._check_batch(dev["input_ids"], dev["attention_mask"], dev["labels"], pixels,
                                extra)
                lp, n = pm.sequence_logps(model, dev["input_ids"], dev["attention_mask"],
                                          dev["labels"], pixels, **extra)
                b = len(batch["ids"])
                lp, n = lp.float().cpu(), n.cpu()
                recs = [{"id": pid, "chosen": lp[j].item(), "rejected": lp[b + j].item(),
                         "settings": settings} for j, pid in enumerate(batch["ids"])]
                # one write per batch (a fault tears one line at most), the file closed inside
                # writing(): closing flushes what a failed write left buffered
                with writing(partial), open(partial, "a", encoding="utf-8") as f:
                    f.write("".join(json.dumps(r) + "\n" for r in recs))
                    f.flush()
                    os.fsync(f.fileno())
                done.update((r["id"], r) for r in recs)
                state["done"] += b
                if bar is not None:
                    bar.update(b)
        if bar is not None:
            bar.close()
    ids = ds.ids
    cache = RefLogpsCache(
        ids,
        torch.tensor([done[i]["chosen"] for i in ids], dtype=torch.float32),
        torch.tensor([done[i]["rejected"] for i in ids], dtype=torch.float32),
        metadata={**settings, "data": os.path.abspath(data), "skipped": len(ds.skipped)})
    cache.save(out)
    os.remove(partial) if os.path.exists(partial) else None
    logger.info("ref-logps: wrote %d pairs to %s", len(ids), out)
    return cache


def check_compatible(cache, *, path, max_length, reference_model, ids, data):
    """The rules a cache must meet to stand in for the reference of a training run: the same
    ``max_length``, temperature 1.0 (the policy's), every pair id of the data; a cache computed
    with a model at another path only warns (a copy of the same weights is legitimate)."""
    cached_len = cache.metadata.get("max_length")
    if str(cached_len) != str(max_length):
        raise ValueError(f"ref_cache: {path!r} was computed with max_length={cached_len}, "
                         f"training uses {max_length}; the log-probs would not match")
    cached_t = float(cache.metadata.get("temperature", 1.0))
    if cached_t != 1.0:
        raise ValueError(f"ref_cache: {path!r} was computed with temperature={cached_t}, training "
                         "scores the policy at temperature 1.0; the log-probs would not match")
    ref_path = os.path.abspath(reference_model)
    cached_model = cache.metadata.get("model")
    if cached_model and os.path.abspath(cached_model) != ref_path:
        logger.warning("ref_cache: computed with the model at %s, the reference here is %s; "
                       "the log-probs are only right if they are the same weights",
                       cached_model, ref_path)
    missing = [i for i in ids if i not in cache]
    if missing:
        raise ValueError(f"ref_cache: {len(missing)} pair id(s) of {data} are not in {path} "
                         f"(e.g. {missing[:3]}); rerun `bpo-fast ref-logps`")
