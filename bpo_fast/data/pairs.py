"""The BPO preference-pair builder: image-weakened prompting and error injection at scale.

Python API::

    from bpo_fast.data.pairs import PairBuilderConfig, build_pairs
    summary = build_pairs(PairBuilderConfig(model="ckpt/", data="llava.json", image_root="imgs/",
                                            out="pairs.jsonl", noise_steps=(200, 500, 800)))
    print(summary.format())

``build_pairs(config, model=None, processor=None)`` loads the model from ``config.model`` unless
a loaded ``(model, processor)`` is passed (e.g. by ``bpo-fast demo``).

Pipeline, image-weakened: CPU DataLoader workers decode each record's image once and resize/crop
it to the processor geometry (uint8, :mod:`bpo_fast.data.images`); the main process moves the
uint8 batch to the device and makes all noise levels in one ``bpo_fast.diffusion_noise`` call
(timesteps ``[B, K]``, fused with the processor's normalisation, mean/std read from the
processor), then one left-padded, KV-cached ``generate`` per chunk of rows. Decoding of the next
batch overlaps generation of this one. Error injection runs after, in batches, with the rule
rewriter or the model's language backbone (text only).

Faults: pairs are appended batch by batch (flush + fsync), so a kill loses at most the batch in
flight; ``resume=True`` cuts a torn last line and skips ids already written. Unreadable images
and malformed records go to the errors file (JSONL: stage, reason, line) and the run goes on.
Under ``torchrun`` (``RANK``/``WORLD_SIZE`` in the environment) rank r takes records
r, r + W, ... and writes ``<out>.rank{r}.jsonl``; ``bpo-fast merge-pairs`` joins the shards.
"""

import dataclasses
import os
import time
import zlib
from dataclasses import dataclass, field

import torch

from bpo_fast.data.images import ImageGeometry, ImageLoadDataset, collate_images, normalize_uint8
from bpo_fast.data.inject import LLMInjector, RuleInjector, load_template
from bpo_fast.data.jsonl import JsonlWriter, iter_jsonl, read_ids, repair_torn_tail
from bpo_fast.data.llava_format import TURN_MODES, MalformedRecord, iter_records, record_to_samples
from bpo_fast.data.schema import (INJECTORS, STRATEGIES, SchemaError, normalize_text,
                                  turns_to_messages, validate_pair)

__all__ = ["PairBuilderConfig", "BuildSummary", "build_pairs", "merge_pairs", "MergeSummary",
           "find_shards", "shard_path", "errors_path",
           "load_model", "parse_noise_steps", "dist_env", "pixels_for_levels"]

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass
class PairBuilderConfig:
    """Everything ``build_pairs`` needs; the CLI flags of ``bpo-fast build-pairs`` map 1:1."""

    model: str = None              # directory of a saved LLaVA-style model + processor
    data: str = None               # LLaVA-format JSON or JSONL
    out: str = None                # output JSONL (under torchrun: <stem>.rank{r}.jsonl)
    image_root: str = None         # image paths in the data are relative to this
    strategies: tuple = STRATEGIES
    turns: str = "first"           # "first": first answer only; "all": every gpt turn
    noise_steps: tuple = (500,)    # diffusion steps; None in the tuple = clean image (no noise)
    noise_schedule: str = "sigmoid"
    num_noise_steps: int = 1000
    injector: str = "rules"        # "rules" or "llm"
    inject_template: str = None    # file with {question}/{answer}; default: the packaged one
    chat_template: str = None      # Jinja or file; default: the processor's, else the family's
    lexicon: str = None            # JSON file extending the rule injector's lexicon
    max_edits: int = 2             # rule injector: words changed per answer (1..max_edits)
    rule_vocabulary: list = None   # rule injector: draw replacements only from these words
    batch_size: int = 32           # records (images) per batch; also the write/fsync unit
    gen_batch_size: int = None     # rows per generate call (default: batch_size * levels)
    num_workers: int = 4           # CPU image-decoding worker processes (0: in the main process)
    max_new_tokens: int = 256
    min_new_tokens: int = 0
    inject_max_new_tokens: int = None  # LLM injector's cap (default: max_new_tokens)
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    device: str = None             # default: cuda (cuda:LOCAL_RANK under torchrun) if available
    dtype: str = "auto"            # auto: bfloat16 on CUDA, float32 on CPU
    resume: bool = False
    overwrite: bool = False
    errors: str = None             # default: <out stem>.errors.jsonl (per shard)
    rank: int = None               # default: $RANK or 0
    world_size: int = None         # default: $WORLD_SIZE or 1
    limit: int = None              # only the first N records of the data file (before sharding)
    progress: bool = True
    fsync: bool = True
    max_batches: int = None        # stop cleanly after N written batches (tests, dry runs)


@dataclass
class BuildSummary:
    out: str
    errors_path: str
    rank: int
    world_size: int
    written: dict = field(default_factory=dict)          # strategy -> pairs written
    dropped: dict = field(default_factory=dict)          # reason -> pairs dropped
    errors: dict = field(default_factory=dict)           # stage -> errors logged
    already_done: int = 0                                # pairs skipped by --resume
    torn_bytes_dropped: int = 0
    skipped_no_image: int = 0                            # text-only samples (image_weakened)
    records: int = 0
    samples: int = 0
    generated_tokens: int = 0
    elapsed_s: float = 0.0                               # the run, after setup
    setup_s: float = 0.0                                 # loading the model, reading nothing yet
    timings: dict = field(default_factory=dict)          # decode_wait_s, noise_s, generate_s, ...
    stopped_early: bool = False
    oom_splits: int = 0                                  # generate batches halved on CUDA OOM
    renamed_duplicate_ids: int = 0                       # repeated source ids, made "<id>#<n>"

    @property
    def total_written(self):
        return sum(self.written.values())

    def to_dict(self):
        d = dataclasses.asdict(self)
        d["total_written"] = self.total_written
        d["pairs_per_s"] = self.total_written / self.elapsed_s if self.elapsed_s else None
        return d

    def format(self):
        w = ", ".join(f"{k}={v}" for k, v in sorted(self.written.items())) or "none"
        dr = ", ".join(f"{k}={v}" for k, v in sorted(self.dropped.items())) or "none"
        er = ", ".join(f"{k}={v}" for k, v in sorted(self.errors.items())) or "none"
        t = ", ".join(f"{k}={v:.2f}s" for k, v in self.timings.items() if v >= 0.005)
        rate = self.total_written / self.elapsed_s if self.elapsed_s else 0.0
        lines = [
            f"pairs written: {self.total_written} ({w}) -> {self.out}",
            f"dropped (rejected empty/equal to chosen): {sum(self.dropped.values())} ({dr})",
            f"errors: {sum(self.errors.values())} ({er})" + (f" -> {self.errors_path}" if sum(self.errors.values()) else ""),
            f"records: {self.records}, samples: {self.samples}, already done (resume): "
            f"{self.already_done}, text-only (no image_weakened): {self.skipped_no_image}",
            f"time: {self.elapsed_s:.1f}s (+{self.setup_s:.1f}s setup), {rate:.2f} pairs/s, generated tokens: "
            f"{self.generated_tokens} ({self.generated_tokens / self.elapsed_s if self.elapsed_s else 0.0:.1f}"
            f" tok/s)" + (f"; {t}" if t else ""),
        ]
        if self.torn_bytes_dropped:
            lines.append(f"resume: dropped a torn last line ({self.torn_bytes_dropped} bytes)")
        if self.stopped_early:
            lines.append("stopped early (max_batches)")
        if self.renamed_duplicate_ids:
            lines.append(f"records with a repeated id, renamed <id>#<n>: {self.renamed_duplicate_ids}")
        if self.oom_splits:
            lines.append(f"generation batches halved after CUDA out-of-memory: {self.oom_splits} "
                         "(a smaller --gen-batch-size avoids the retries)")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# helpers


def parse_noise_steps(spec):
    """'200,500,800' -> (200, 500, 800); 'none' (or 'clean') is the no-noise level (None)."""
    if isinstance(spec, (list, tuple)):
        items = list(spec)
    elif isinstance(spec, int):
        items = [spec]
    elif isinstance(spec, str):
        items = [s.strip() for s in spec.split(",") if s.strip()]
    else:
        raise TypeError(f"noise_steps: expected '200,500,800' or a list, got {type(spec).__name__}")
    out = []
    for s in items:
        if s is None or (isinstance(s, str) and s.lower() in ("none", "clean")):
            v = None
        else:
            try:
                v = int(s)
            except (TypeError, ValueError):
                raise ValueError(f"noise_steps: {s!r} is not an integer or 'none'") from None
            if v < 0:
                raise ValueError(f"noise_steps: expected steps >= 0, got {v}")
        if v in out:
            raise ValueError(f"noise_steps: {s!r} is listed twice")
        out.append(v)
    if not out:
        raise ValueError("noise_steps: expected at least one level")
    return tuple(out)


def dist_env(rank=None, world_size=None):
    """(rank, world_size, local_rank) from the arguments or torchrun's environment."""
    r = int(os.environ.get("RANK", 0)) if rank is None else int(rank)
    w = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else int(world_size)
    lr = int(os.environ.get("LOCAL_RANK", r if w > 1 else 0))
    if w < 1 or not 0 <= r < w:
        raise ValueError(f"rank/world_size: expected 0 <= rank < world_size, got {r}/{w}")
    return r, w, lr


def _split_ext(path):
    root, ext = os.path.splitext(path)
    return (root, ext) if ext else (path, ".jsonl")


def shard_path(out, rank, world_size):
    """``pairs.jsonl`` -> ``pairs.rank{r}.jsonl`` when world_size > 1, else ``out`` itself."""
    if world_size <= 1:
        return out
    root, ext = _split_ext(out)
    return f"{root}.rank{rank}{ext}"


def errors_path(out):
    root, _ = _split_ext(out)
    return f"{root}.errors.jsonl"


def _derive_seed(seed, *keys):
    # crc32 of the keys: stable across processes (unlike hash()) and cheap.
    h = zlib.crc32("\x1f".join(str(k) for k in (seed,) + keys).encode())
    return (int(seed) * 1_000_003 + h) % (2 ** 63 - 1)


def resolve_device(device=None, local_rank=0):
    if device is None:
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {device!r} requested but CUDA is not available")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    return dev


def resolve_dtype(dtype, device):
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_model(path, device, dtype):
    """A saved vision-language model of a supported family and its processor (the model layer's
    loaders: a clear error for unsupported families, processors without torchvision)."""
    from bpo_fast.models.preference import load_vlm
    from bpo_fast.models.vlm import load_processor

    if not os.path.isdir(path):
        raise FileNotFoundError(f"model: no such directory {path!r} (a save_pretrained folder)")
    processor = load_processor(path)
    model = load_vlm(path, dtype=dtype, device=device)
    return model.eval(), processor


def pixels_for_levels(images, levels, geometry, *, out_dtype=torch.float32, schedule="sigmoid",
                      num_noise_steps=1000, seed=None, generator=None, layout="NCHW"):
    """uint8 images -> model pixels ``[B, K, C, H, W]``, one slice per level.

    ``images``: ``[B, C, H, W]`` (``layout="NCHW"``) or channels-last ``[B, H, W, C]``
    (``layout="NHWC"``, e.g. a stack of decoded HWC images, read in place). Noised levels come
    from one ``bpo_fast.diffusion_noise`` call with timesteps ``[B, K']`` (each image read once),
    fused with the processor's normalisation (``geometry.mean``/``std``); noise from ``seed``
    (Philox, same on CPU and CUDA) or ``generator``. A ``None`` level is the clean image,
    normalised exactly as the processor does (:func:`normalize_uint8`).
    """
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        raise TypeError("images: expected a uint8 tensor [B, C, H, W] (or [B, H, W, C] with layout='NHWC')")
    if layout not in ("NCHW", "NHWC"):
        raise ValueError(f"layout: expected 'NCHW' or 'NHWC', got {layout!r}")
    nchw = images.permute(0, 3, 1, 2) if layout == "NHWC" else images  # a view
    levels = list(levels)
    B, C, H, W = nchw.shape
    out = torch.empty((B, len(levels), C, H, W), dtype=out_dtype, device=images.device)
    noisy = [(k, s) for k, s in enumerate(levels) if s is not None]
    if noisy:
        from bpo_fast.ops.noise import NoiseSchedule, diffusion_noise

        sched = schedule if isinstance(schedule, NoiseSchedule) else _schedule(schedule, num_noise_steps)
        t = torch.tensor([s for _, s in noisy], dtype=torch.int64, device=images.device)
        t = t.unsqueeze(0).expand(B, -1).contiguous()
        mean, std = (list(geometry.mean), list(geometry.std)) if geometry.do_normalize else (None, None)
        # Levels were range-checked with the config: skip the op's check (a device sync on CUDA).
        noised = diffusion_noise(images, t, sched, space="normalized", mean=mean, std=std,
                                 out_dtype=out_dtype, seed=seed, generator=generator, layout=layout,
                                 check_timesteps=False)
        if len(noisy) == len(levels):
            return noised
        for j, (k, _) in enumerate(noisy):
            out[:, k] = noised[:, j]
    for k, s in enumerate(levels):
        if s is None:
            out[:, k] = normalize_uint8(nchw, geometry, out_dtype=out_dtype)
    return out


_SCHEDULES = {}


def _schedule(kind, num_steps):
    # Built once per (kind, steps) and reused: the schedule caches its device tables.
    from bpo_fast.ops.noise import NoiseSchedule

    key = (kind, num_steps)
    if key not in _SCHEDULES:
        _SCHEDULES[key] = NoiseSchedule(kind, num_steps=num_steps)
    return _SCHEDULES[key]


def _image_token_count(processor, geometry):
    """How many image tokens the processor puts in place of one image placeholder."""
    from PIL import Image

    h, w = geometry.output_hw()
    tok = processor.tokenizer
    image_token = getattr(processor, "image_token", "<image>")
    img = Image.new("RGB", (w, h))
    enc = processor(text=[image_token], images=[img], return_tensors="pt")
    tid = tok.convert_tokens_to_ids(image_token)
    return image_token, int((enc["input_ids"] == tid).sum())


class _Generator:
    """Batched, left-padded, KV-cached generation with the builder's sampling settings."""

    def __init__(self, model, processor, cfg, device, dtype):
        self.model, self.processor, self.cfg = model, processor, cfg
        self.device, self.dtype = device, dtype
        self.tok = processor.tokenizer
        if self.tok.pad_token_id is None:
            # Llama-style tokenizers may have no pad token; left padding only needs an id.
            self.tok.pad_token = self.tok.eos_token
        self.eos = self.tok.eos_token_id
        self.gen_kwargs = {"max_new_tokens": cfg.max_new_tokens, "use_cache": True,
                           "pad_token_id": self.tok.pad_token_id, "do_sample": cfg.do_sample}
        if cfg.min_new_tokens:
            self.gen_kwargs["min_new_tokens"] = cfg.min_new_tokens
        if cfg.do_sample:
            self.gen_kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=0)
        self.image_token = None
        self.n_image_tokens = None

    def settings(self):
        keys = ("max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_p")
        s = {k: getattr(self.cfg, k) for k in keys}
        if not self.cfg.do_sample:
            s.pop("temperature")
            s.pop("top_p")
        return s

    def _template_kwargs(self):
        # the one rule of every command (bpo_fast.models.vlm.resolve_chat_template): the
        # --chat-template override, else the processor's, else the family's documented default
        if not hasattr(self, "_template"):
            from bpo_fast.models.vlm import resolve_chat_template

            self._template = resolve_chat_template(
                self.processor, self.model.config.model_type, self.cfg.chat_template)
            if self._template is None:
                raise ValueError(f"model: {self.model.config.model_type} builds its prompts in "
                                 "its processor (no chat template); build-pairs does not support it")
        return {"chat_template": self._template}

    def chat(self, turns):
        return self.processor.apply_chat_template(turns_to_messages(turns), add_generation_prompt=True,
                                                  tokenize=False, **self._template_kwargs())

    def chat_text(self, text):
        msgs = [{"role": "user", "content": [{"type": "text", "text": text}]}]
        return self.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False,
                                                  **self._template_kwargs())

    def expand_images(self, text):
        # LlavaProcessor expands each image placeholder into N image tokens; we do the same
        # expansion on the text so the (already normalised) pixels need no processor call.
        return text.replace(self.image_token, self.image_token * self.n_image_tokens)

    @torch.inference_mode()
    def generate(self, texts, pixel_values=None, seed=0, max_new_tokens=None):
        """-> (decoded answers, generated token count)."""
        enc = self.tok(list(texts), padding=True, return_tensors="pt", padding_side="left")
        kwargs = dict(self.gen_kwargs)
        if max_new_tokens is not None:
            kwargs["max_new_tokens"] = max_new_tokens
            if "min_new_tokens" in kwargs:
                kwargs["min_new_tokens"] = min(kwargs["min_new_tokens"], max_new_tokens)
        inputs = {"input_ids": enc["input_ids"].to(self.device),
                  "attention_mask": enc["attention_mask"].to(self.device)}
        if pixel_values is not None:
            inputs["pixel_values"] = pixel_values.to(self.dtype)
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            # Seeded per batch; fork_rng keeps the caller's global RNG untouched.
            torch.manual_seed(seed)
            out = self.model.generate(**inputs, **kwargs)
        new = out[:, inputs["input_ids"].shape[1]:]
        ntok = _count_generated(new, self.eos)
        texts = self.tok.batch_decode(new, skip_special_tokens=True)
        return [t.strip() for t in texts], ntok


    @torch.inference_mode()
    def generate_inputs(self, inputs, seed=0):
        """Generate from prepared model inputs (left-padded rows + the family's image inputs)
        -> (decoded answers, generated token count)."""
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = self.model.generate(**inputs, **self.gen_kwargs)
        new = out[:, inputs["input_ids"].shape[1]:]
        texts = self.tok.batch_decode(new, skip_special_tokens=True)
        return [t.strip() for t in texts], _count_generated(new, self.eos)

    def generate_split(self, texts, pixel_values=None, seed=0, max_new_tokens=None, on_split=None):
        """:meth:`generate`, halving the rows on CUDA out-of-memory (a batch of unusually long
        prompts must not kill a day-long run); ``on_split()`` is called for each halving."""
        try:
            return self.generate(texts, pixel_values, seed, max_new_tokens)
        except torch.cuda.OutOfMemoryError:
            if len(texts) <= 1:
                raise
        torch.cuda.empty_cache()
        if on_split is not None:
            on_split()
        h = len(texts) // 2
        halves = [(texts[:h], None if pixel_values is None else pixel_values[:h], seed),
                  (texts[h:], None if pixel_values is None else pixel_values[h:], seed + 1)]
        answers, ntok = [], 0
        for t, pv, sd in halves:
            a, n = self.generate_split(t, pv, sd, max_new_tokens, on_split)
            answers.extend(a)
            ntok += n
        return answers, ntok


def _count_generated(new, eos):
    """Tokens actually generated per row: up to and including the first EOS."""
    if new.numel() == 0:
        return 0
    L = new.shape[1]
    is_eos = new == eos if eos is not None else torch.zeros_like(new, dtype=torch.bool)
    pos = torch.arange(L, device=new.device).expand_as(new)
    first = torch.where(is_eos, pos, torch.full_like(pos, L)).min(dim=1).values
    # A row stops at its first EOS (then generate pads it) or at the length cap. Never count pad
    # ids: a model may well generate the pad token itself.
    return int(torch.clamp(first + 1, max=L).sum())


def _rejection_reason(chosen, rejected):
    if not rejected or not rejected.strip():
        return "empty"
    if normalize_text(rejected) == normalize_text(chosen):
        return "equal"
    return None


# ---------------------------------------------------------------------------------------------
# the builder


class _Run:
    def __init__(self, cfg, model, processor):
        self.cfg = cfg
        self.t0 = time.perf_counter()
        self.rank, self.world, local_rank = dist_env(cfg.rank, cfg.world_size)
        self.out = shard_path(cfg.out, self.rank, self.world)
        # pairs.jsonl -> pairs.errors.rank{r}.jsonl: shard globs (pairs.rank*.jsonl) never catch it
        self.errors_path = shard_path(cfg.errors or errors_path(cfg.out), self.rank, self.world)
        self.summary = BuildSummary(out=self.out, errors_path=self.errors_path, rank=self.rank,
                                    world_size=self.world)
        self.summary.timings = {"decode_wait_s": 0.0, "noise_s": 0.0, "generate_s": 0.0,
                                "inject_s": 0.0, "write_s": 0.0}
        self.levels = parse_noise_steps(cfg.noise_steps)
        self._check_out()  # before the (slow) model load
        need_model = "image_weakened" in cfg.strategies or (
            "error_injection" in cfg.strategies and cfg.injector == "llm")
        self.model = self.processor = self.gen = None
        if need_model or processor is not None or model is not None:
            if model is None or processor is None:
                self.device = resolve_device(cfg.device, local_rank)
                self.dtype = resolve_dtype(cfg.dtype, self.device)
                model, processor = load_model(cfg.model, self.device, self.dtype)
            else:
                self.device = next(model.parameters()).device
                self.dtype = next(model.parameters()).dtype
            self.model, self.processor = model, processor
            self.gen = _Generator(model, processor, cfg, self.device, self.dtype)
        self.rows = None
        if "image_weakened" in cfg.strategies and model.config.model_type != "llava":
            # not one fixed-size image tensor (tiles, anyres, flattened patches) or a prompt the
            # processor expands itself: the family's processor per row, noise on its pixels
            from bpo_fast.data.vlm_generation import ProcessorRows

            self.gen._template_kwargs()  # the chat-template rule fails here, not mid-run
            self.rows = ProcessorRows(processor, model.config.model_type,
                                      _schedule(cfg.noise_schedule, cfg.num_noise_steps))
        elif "image_weakened" in cfg.strategies:
            self.geometry = ImageGeometry.from_processor(processor)
            if self.geometry.output_hw() is None:
                raise ValueError("processor: image_weakened needs a fixed image size (centre crop or "
                                 "exact resize); this processor keeps the aspect ratio")
            self.gen.image_token, self.gen.n_image_tokens = _image_token_count(processor, self.geometry)
            if self.gen.n_image_tokens < 1:
                raise ValueError("processor: could not find how many image tokens an image takes")
        if "error_injection" in cfg.strategies:
            if cfg.injector == "rules":
                self.injector = RuleInjector(seed=cfg.seed, lexicon=cfg.lexicon, max_edits=cfg.max_edits,
                                             vocabulary=cfg.rule_vocabulary)
            else:
                tpl = load_template(cfg.inject_template)
                self.injector = LLMInjector(self._llm_generate, self.gen.chat_text, tpl)
                self.template_crc = f"{zlib.crc32(tpl.encode()):08x}"
        self.pbar = None
        self._last_postfix = 0.0
        self.batches_written = 0
        self._open_files()  # last: nothing above can leave a file half-prepared

    # -- files -------------------------------------------------------------------------------
    def _check_out(self):
        cfg = self.cfg
        exists = os.path.exists(self.out) and os.path.getsize(self.out) > 0
        if exists and not (cfg.resume or cfg.overwrite):
            raise FileExistsError(f"out: {self.out} exists; pass resume=True (--resume) to continue "
                                  "it or overwrite=True (--overwrite) to start over")
        if os.path.abspath(self.out) == os.path.abspath(self.errors_path):
            raise ValueError("errors: must differ from out")

    def _open_files(self):
        cfg, s = self.cfg, self.summary
        if not cfg.resume:
            # a fresh run: stale errors of an earlier run must not mix with this run's
            for p in ((self.out, self.errors_path) if cfg.overwrite else (self.errors_path,)):
                if os.path.exists(p):
                    os.remove(p)
        self.done = set()
        self.logged_errors = set()
        if cfg.resume:
            s.torn_bytes_dropped = repair_torn_tail(self.out)
            self.done = read_ids(self.out)
            repair_torn_tail(self.errors_path)
            if os.path.exists(self.errors_path):
                for _, e in iter_jsonl(self.errors_path):
                    self.logged_errors.add(self._error_key(e))
        self.writer = JsonlWriter(self.out, fsync=cfg.fsync)
        self.err_writer = None  # opened at the first error: a clean run leaves no errors file

    @staticmethod
    def _error_key(e):
        return (e.get("stage"), e.get("line"), e.get("source_id"), e.get("reason"))

    def _log_errors(self, errs):
        fresh = []
        for e in errs:
            self.summary.errors[e["stage"]] = self.summary.errors.get(e["stage"], 0) + 1
            key = self._error_key(e)
            if key not in self.logged_errors:  # a resumed run does not log the same error twice
                self.logged_errors.add(key)
                fresh.append(e)
        if fresh:
            if self.err_writer is None:
                self.err_writer = JsonlWriter(self.errors_path, fsync=self.cfg.fsync)
            self.err_writer.write_batch(fresh)

    def _write(self, records):
        t = time.perf_counter()
        good, errs = [], []
        for r in records:
            try:
                validate_pair(r)
            except SchemaError as exc:  # never write a record the trainer cannot read
                errs.append({"stage": "output", "line": None, "source_id": r.get("id"),
                             "reason": str(exc)})
                continue
            good.append(r)
            self.summary.written[r["strategy"]] = self.summary.written.get(r["strategy"], 0) + 1
        self.writer.write_batch(good)
        self._log_errors(errs)
        self.summary.timings["write_s"] += time.perf_counter() - t
        self.batches_written += 1

    def _count_oom(self):
        self.summary.oom_splits += 1

    def _drop(self, reason):
        self.summary.dropped[reason] = self.summary.dropped.get(reason, 0) + 1

    def _stop(self):
        mb = self.cfg.max_batches
        if mb is not None and self.batches_written >= mb:
            self.summary.stopped_early = True
            return True
        return False

    # -- input -------------------------------------------------------------------------------
    def read_samples(self):
        cfg, s = self.cfg, self.summary
        samples, errs = [], []
        # Ids seen over the WHOLE file (all shards): a repeated id (LLaVA mixes have some) gets
        # "#2", "#3", ... in file order, the same on every rank, so pair ids stay unique and
        # stable across runs and world sizes instead of the record being lost.
        seen = {}
        for index, line, rec in iter_records(cfg.data):
            if cfg.limit is not None and index >= cfg.limit:
                break
            raw_id = rec.get("id") if isinstance(rec, dict) else None
            occurrence = 0
            if isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool):
                occurrence = seen[str(raw_id)] = seen.get(str(raw_id), 0) + 1
            if index % self.world != self.rank:
                continue
            s.records += 1
            try:
                got = record_to_samples(rec, turns=cfg.turns, index=index, line=line)
            except MalformedRecord as exc:
                errs.append({"stage": "record", "line": line, "index": index,
                             "source_id": None if raw_id is None else str(raw_id), "reason": str(exc)})
                continue
            if occurrence > 1:
                s.renamed_duplicate_ids += 1
                for smp in got:
                    smp.source_id = f"{smp.source_id}#{occurrence}"
            samples.extend(got)
        s.samples = len(samples)
        self._log_errors(errs)
        return samples

    # -- progress ----------------------------------------------------------------------------
    def _progress(self, n):
        if self.pbar is None:
            return
        self.pbar.update(n)
        now = time.perf_counter()
        if now - self._last_postfix < 0.5:  # formatting per item would slow a big resume
            return
        self._last_postfix = now
        el = max(now - self.t0, 1e-9)
        self.pbar.set_postfix({"pairs/s": f"{self.summary.total_written / el:.2f}",
                               "tok/s": f"{self.summary.generated_tokens / el:.1f}"}, refresh=False)

    # -- image-weakened ----------------------------------------------------------------------
    def image_weakened(self, samples, bad_images):
        cfg = self.cfg
        # One unit per record: its image is decoded once for all its turns and levels.
        units, by_record = [], {}
        for smp in samples:
            if smp.image is None:
                self.summary.skipped_no_image += 1
                continue
            rows = []
            for k, lvl in enumerate(self.levels):
                pid = smp.pair_id("image_weakened", "clean" if lvl is None else lvl)
                if pid in self.done:
                    self.summary.already_done += 1
                    self._progress(1)
                else:
                    rows.append((smp, k, pid))
            if not rows:
                continue
            u = by_record.get(smp.index)
            if u is None:
                u = by_record[smp.index] = {"image": smp.image, "rows": [], "line": smp.line,
                                            "source_id": smp.source_id}
                units.append(u)
            u["rows"].extend(rows)
        if not units:
            return
        if self.rows is not None:
            return self._image_weakened_rows(units, bad_images)
        ds = ImageLoadDataset([(i, u["image"]) for i, u in enumerate(units)], cfg.image_root, self.geometry)
        loader = torch.utils.data.DataLoader(
            ds, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers,
            collate_fn=collate_images, pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if cfg.num_workers > 0 else None,
            worker_init_fn=_worker_init if cfg.num_workers > 0 else None)
        gen_bs = cfg.gen_batch_size or cfg.batch_size * len(self.levels)
        settings = self.gen.settings()
        settings.update(noise_schedule=cfg.noise_schedule, num_noise_steps=cfg.num_noise_steps)
        it = iter(loader)
        t = self.summary.timings
        while True:
            t0 = time.perf_counter()
            batch = next(it, None)
            t["decode_wait_s"] += time.perf_counter() - t0
            if batch is None:
                break
            errs = []
            for key, err in zip(batch["keys"], batch["errors"]):
                if err is not None:
                    u = units[key]
                    bad_images.add(u["image"])
                    errs.append({"stage": "image", "line": u["line"], "source_id": u["source_id"],
                                 "image": u["image"], "reason": err})
                    self._progress(len(u["rows"]))
            self._log_errors(errs)
            good_keys = [batch["keys"][i] for i in batch["good"]]
            if not good_keys:
                continue
            # keyed by the batch's first pair id (unique): independent of rank and world size
            bseed = _derive_seed(cfg.seed, units[good_keys[0]]["rows"][0][2])
            t0 = time.perf_counter()
            u8 = batch["pixels"].to(self.device, non_blocking=True)  # [n, H, W, C] uint8
            pix = pixels_for_levels(u8, self.levels, self.geometry, out_dtype=self.dtype,
                                    schedule=cfg.noise_schedule, num_noise_steps=cfg.num_noise_steps,
                                    seed=bseed, layout="NHWC")
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t["noise_s"] += time.perf_counter() - t0
            K = len(self.levels)
            rows = [(smp, k, pid, b * K + k) for b, key in enumerate(good_keys)
                    for smp, k, pid in units[key]["rows"]]
            flat = pix.reshape(-1, *pix.shape[2:])
            records = []
            prompts = {}  # one chat rendering per sample, shared by its K levels
            for c in range(0, len(rows), gen_bs):
                chunk = rows[c:c + gen_bs]
                texts = []
                for smp, *_ in chunk:
                    key = (smp.index, smp.turn)
                    if key not in prompts:
                        prompts[key] = self.gen.expand_images(self.gen.chat(smp.prompt))
                    texts.append(prompts[key])
                idx = torch.tensor([r[3] for r in chunk], device=self.device)
                t0 = time.perf_counter()
                answers, ntok = self.gen.generate_split(texts, flat.index_select(0, idx),
                                                        seed=_derive_seed(bseed, c),
                                                        on_split=self._count_oom)
                t["generate_s"] += time.perf_counter() - t0
                self.summary.generated_tokens += ntok
                records.extend(self._weakened_records(chunk, answers, settings))
            self._write(records)
            self._progress(len(rows))
            if self._stop():
                break
        del it, loader

    def _weakened_records(self, chunk, answers, settings):
        """Pair records of generated rows ``(sample, level index, pair id, ...)``; equal or empty
        answers are dropped (counted)."""
        out = []
        for (smp, k, pid, _), ans in zip(chunk, answers):
            reason = _rejection_reason(smp.chosen, ans)
            if reason:
                self._drop(reason)
                continue
            out.append(self._record(smp, pid, ans, "image_weakened", self.levels[k], None,
                                    settings))
        return out

    def _image_weakened_rows(self, units, bad_images):
        """image_weakened through the family's processor (:mod:`bpo_fast.data.vlm_generation`)."""
        from PIL import Image

        cfg = self.cfg
        settings = self.gen.settings()
        settings.update(noise_schedule=cfg.noise_schedule, num_noise_steps=cfg.num_noise_steps)
        gen_bs = cfg.gen_batch_size or cfg.batch_size * len(self.levels)
        for b0 in range(0, len(units), cfg.batch_size):
            rows, errs = [], []
            for u in units[b0:b0 + cfg.batch_size]:
                path = u["image"] if os.path.isabs(u["image"]) else os.path.join(cfg.image_root, u["image"])
                try:
                    with Image.open(path) as im:
                        image = im.convert("RGB")
                except Exception as exc:  # a bad image never stops the run: logged, skipped
                    bad_images.add(u["image"])
                    errs.append({"stage": "image", "line": u["line"], "source_id": u["source_id"],
                                 "image": u["image"], "reason": f"{type(exc).__name__}: {exc}"})
                    self._progress(len(u["rows"]))
                    continue
                rows.extend((smp, k, pid, image) for smp, k, pid in u["rows"])
            self._log_errors(errs)
            records = []
            for c in range(0, len(rows), gen_bs):
                chunk = rows[c:c + gen_bs]
                bseed = _derive_seed(cfg.seed, chunk[0][2])
                t0 = time.perf_counter()
                inputs = self.rows([(self.gen.chat(smp.prompt), image, self.levels[k],
                                     _derive_seed(cfg.seed, pid)) for smp, k, pid, image in chunk],
                                   self.device, self.dtype)
                self.summary.timings["noise_s"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                answers, ntok = self.gen.generate_inputs(inputs, seed=bseed)
                self.summary.timings["generate_s"] += time.perf_counter() - t0
                self.summary.generated_tokens += ntok
                records.extend(self._weakened_records(chunk, answers, settings))
            self._write(records)
            self._progress(len(rows))
            if self._stop():
                break

    # -- error injection ---------------------------------------------------------------------
    def _llm_generate(self, texts):
        t0 = time.perf_counter()
        out = []
        ntok = 0
        bs = self.cfg.gen_batch_size or self.cfg.batch_size
        for c in range(0, len(texts), bs):
            a, n = self.gen.generate_split(texts[c:c + bs], None, seed=_derive_seed(self._ei_seed, c),
                                           max_new_tokens=self.cfg.inject_max_new_tokens,
                                           on_split=self._count_oom)
            out.extend(a)
            ntok += n
        self.summary.generated_tokens += ntok
        self.summary.timings["generate_s"] += time.perf_counter() - t0
        return out, ntok

    def error_injection(self, samples, bad_images):
        cfg = self.cfg
        todo = []
        for smp in samples:
            pid = smp.pair_id("error_injection", cfg.injector)
            if pid in self.done:
                self.summary.already_done += 1
                self._progress(1)
            elif smp.image is not None and smp.image in bad_images:
                self._progress(1)  # its image is unreadable: the trainer could not use the pair
            else:
                todo.append((smp, pid))
        if cfg.injector == "llm":
            settings = dict(self.gen.settings(), template_crc32=self.template_crc)
            if cfg.inject_max_new_tokens is not None:
                settings["max_new_tokens"] = cfg.inject_max_new_tokens
                settings["min_new_tokens"] = min(cfg.min_new_tokens, cfg.inject_max_new_tokens)
        else:
            settings = {"max_edits": cfg.max_edits}
        for c in range(0, len(todo), cfg.batch_size):
            chunk = todo[c:c + cfg.batch_size]
            self._ei_seed = _derive_seed(cfg.seed, chunk[0][1])
            t0 = time.perf_counter()
            rejected = self.injector.inject_batch([smp for smp, _ in chunk])
            self.summary.timings["inject_s"] += time.perf_counter() - t0
            records = []
            for (smp, pid), rej in zip(chunk, rejected):
                reason = _rejection_reason(smp.chosen, rej)
                if reason:
                    self._drop(reason)
                    continue
                records.append(self._record(smp, pid, rej, "error_injection", None, cfg.injector, settings))
            self._write(records)
            self._progress(len(chunk))
            if self._stop():
                break

    def _record(self, smp, pid, rejected, strategy, level, injector, settings):
        return {"id": pid, "image": smp.image, "prompt": smp.prompt, "chosen": smp.chosen,
                "rejected": rejected, "strategy": strategy, "noise_step": level,
                "injector": injector, "generation": settings, "seed": self.cfg.seed,
                "source_id": smp.source_id, "turn": smp.turn}

    # -- main --------------------------------------------------------------------------------
    def run(self):
        cfg = self.cfg
        self.summary.setup_s = time.perf_counter() - self.t0  # model load etc., not in the rates
        self.t0 = time.perf_counter()
        try:
            samples = self.read_samples()
            total = 0
            if "image_weakened" in cfg.strategies:
                total += sum(1 for s in samples if s.image is not None) * len(self.levels)
            if "error_injection" in cfg.strategies:
                total += len(samples)
            if cfg.progress:
                from tqdm.auto import tqdm

                # our own rates only (written pairs/s, generated tokens/s): tqdm's would count
                # attempts, dropped and already-done pairs included
                self.pbar = tqdm(total=total, unit="pair", desc=f"build-pairs[{self.rank}/{self.world}]",
                                 dynamic_ncols=True,
                                 bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")
            bad_images = set()
            if "image_weakened" in cfg.strategies:
                self.image_weakened(samples, bad_images)
            if "error_injection" in cfg.strategies and not self.summary.stopped_early:
                self.error_injection(samples, bad_images)
        finally:
            if self.pbar is not None:
                self._last_postfix = 0.0
                self._progress(0)  # final rates on the bar
                self.pbar.close()
            self.writer.close()
            if self.err_writer is not None:
                self.err_writer.close()
        self.summary.elapsed_s = time.perf_counter() - self.t0
        return self.summary


def _worker_init(_):
    torch.set_num_threads(1)  # decode workers use PIL; torch threads would only oversubscribe


def _validate_config(cfg):
    if not isinstance(cfg, PairBuilderConfig):
        raise TypeError(f"config: expected a PairBuilderConfig, got {type(cfg).__name__}")
    for name in ("data", "out"):
        if not getattr(cfg, name):
            raise ValueError(f"{name}: required")
    strategies = cfg.strategies
    if isinstance(strategies, str):
        strategies = tuple(s.strip() for s in strategies.split(",") if s.strip())
    bad = [s for s in strategies if s not in STRATEGIES]
    if not strategies or bad:
        raise ValueError(f"strategies: expected a non-empty subset of {list(STRATEGIES)}, got {list(strategies)}")
    cfg = dataclasses.replace(cfg, strategies=tuple(dict.fromkeys(strategies)),
                              noise_steps=parse_noise_steps(cfg.noise_steps))
    if cfg.turns not in TURN_MODES:
        raise ValueError(f"turns: expected one of {list(TURN_MODES)}, got {cfg.turns!r}")
    if cfg.injector not in INJECTORS:
        raise ValueError(f"injector: expected one of {list(INJECTORS)}, got {cfg.injector!r}")
    for name in ("batch_size", "max_new_tokens"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
    if cfg.inject_max_new_tokens is not None and (not isinstance(cfg.inject_max_new_tokens, int)
                                                  or cfg.inject_max_new_tokens < 1):
        raise ValueError(f"inject_max_new_tokens: expected an int >= 1 or None, got {cfg.inject_max_new_tokens!r}")
    if cfg.gen_batch_size is not None and (not isinstance(cfg.gen_batch_size, int) or cfg.gen_batch_size < 1):
        raise ValueError(f"gen_batch_size: expected an int >= 1 or None, got {cfg.gen_batch_size!r}")
    if not isinstance(cfg.num_workers, int) or cfg.num_workers < 0:
        raise ValueError(f"num_workers: expected an int >= 0, got {cfg.num_workers!r}")
    if not 0 <= cfg.min_new_tokens <= cfg.max_new_tokens:
        raise ValueError(f"min_new_tokens: expected 0 <= min_new_tokens <= max_new_tokens "
                         f"({cfg.max_new_tokens}), got {cfg.min_new_tokens}")
    if cfg.do_sample and not cfg.temperature > 0:
        raise ValueError(f"temperature: expected > 0 when sampling, got {cfg.temperature}")
    if not 0 < cfg.top_p <= 1:
        raise ValueError(f"top_p: expected 0 < top_p <= 1, got {cfg.top_p}")
    if any(s is not None and s >= cfg.num_noise_steps for s in cfg.noise_steps):
        raise ValueError(f"noise_steps: every step must be < num_noise_steps ({cfg.num_noise_steps}), "
                         f"got {list(cfg.noise_steps)}")
    if "image_weakened" in cfg.strategies and any(s is not None for s in cfg.noise_steps):
        _schedule(cfg.noise_schedule, cfg.num_noise_steps)  # unknown kind: fail before any work
    if cfg.image_root is not None and not os.path.isdir(cfg.image_root):
        raise FileNotFoundError(f"image_root: {cfg.image_root!r} is not a directory")
    if cfg.limit is not None and (not isinstance(cfg.limit, int) or isinstance(cfg.limit, bool)
                                  or cfg.limit < 1):
        raise ValueError(f"limit: expected an int >= 1 or None, got {cfg.limit!r}")
    if cfg.resume and cfg.overwrite:
        raise ValueError("resume and overwrite: pick one")
    if cfg.max_batches is not None and cfg.max_batches < 1:
        raise ValueError(f"max_batches: expected an int >= 1 or None, got {cfg.max_batches}")
    return cfg


def build_pairs(config, model=None, processor=None):
    """Build preference pairs as configured; return a :class:`BuildSummary`.

    ``model``/``processor``: an already loaded LLaVA-style model and its processor (else they
    are loaded from ``config.model`` on ``config.device`` in ``config.dtype``).
    """
    cfg = _validate_config(config)
    if (model is None) != (processor is None):
        raise ValueError("model and processor: pass both or neither")
    needs_model = "image_weakened" in cfg.strategies or (
        "error_injection" in cfg.strategies and cfg.injector == "llm")
    if needs_model and not cfg.model and model is None:
        raise ValueError("model: required for image_weakened and for injector='llm' (a model "
                         "directory, or pass model= and processor=)")
    return _Run(cfg, model, processor).run()


# ---------------------------------------------------------------------------------------------
# merging shards


@dataclass
class MergeSummary:
    out: str
    inputs: list
    written: int = 0
    duplicates: int = 0          # same id seen again with the same content (dropped)
    conflicts: int = 0           # same id with different content (first kept, counted)
    invalid: list = field(default_factory=list)   # (file, line, reason)
    torn: list = field(default_factory=list)      # (file, line, reason): unparseable lines

    def to_dict(self):
        return dataclasses.asdict(self)

    def format(self):
        lines = [f"merged {len(self.inputs)} file(s) -> {self.out}: {self.written} pairs, "
                 f"{self.duplicates} duplicate(s) dropped, {self.conflicts} conflicting duplicate(s)"]
        if self.torn:
            lines.append(f"skipped {len(self.torn)} unparseable line(s) (torn tails): " +
                         "; ".join(f"{f}:{n}" for f, n, _ in self.torn[:5]))
        if self.invalid:
            lines.append(f"{len(self.invalid)} record(s) fail the schema: " +
                         "; ".join(f"{f}:{n}: {r}" for f, n, r in self.invalid[:5]))
        return "\n".join(lines)


def find_shards(out):
    """The shard files ``<stem>.rank{r}.jsonl`` of an output path, sorted by rank."""
    import glob
    import re

    root, ext = _split_ext(out)
    pat = re.compile(re.escape(root) + r"\.rank(\d+)" + re.escape(ext) + "$")
    found = [(int(m.group(1)), p) for p in glob.glob(glob.escape(root) + ".rank*" + ext)
             if (m := pat.match(p))]
    return [p for _, p in sorted(found)]


def _is_shard(path):
    import re

    return re.search(r"\.rank\d+(\.[^./]*)?$", path) is not None


def merge_pairs(inputs, out, *, skip_invalid=False, strict_conflicts=False):
    """Merge pair files into ``out`` (atomic), deduplicated by id, every record schema-checked.

    ``inputs``: paths (or one output path whose ``.rank{r}`` shards are merged). A record that
    fails :func:`validate_pair` raises ``ValueError`` (nothing is written) unless
    ``skip_invalid``; torn/unparseable lines are skipped and reported. The first record of an id
    wins; a later one with different content is a conflict (counted, or an error with
    ``strict_conflicts``).
    """
    import json

    from bpo_fast.data.jsonl import atomic_write_jsonl

    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = [os.fspath(p) for p in inputs]
    if not inputs:
        raise ValueError("inputs: expected at least one file")
    files = []
    for p in inputs:
        shards = find_shards(p)
        if os.path.isfile(p):
            if shards and not _is_shard(p):
                raise ValueError(f"inputs: {p!r} is a file and also the base of shards "
                                 f"{shards[:2]}...; name the files to merge explicitly")
            files.append(p)
        else:
            if not shards:
                raise FileNotFoundError(f"inputs: {p!r} is neither a file nor the base of .rank* shards")
            files.extend(shards)
    if os.path.abspath(out) in {os.path.abspath(f) for f in files}:
        raise ValueError("out: must differ from the inputs")
    s = MergeSummary(out=os.fspath(out), inputs=files)
    seen = {}
    records = []
    from bpo_fast.data.bpo_format import iter_pair_records

    for f in files:
        # pair JSONL, or official BPO records (completions) expanded into their pairs
        for n, rec in iter_pair_records(f):
            if isinstance(rec, Exception):
                (s.invalid if str(rec).startswith("BPO record") else s.torn).append((f, n, str(rec)))
                continue
            try:
                validate_pair(rec)
            except SchemaError as exc:
                s.invalid.append((f, n, str(exc)))
                continue
            prev = seen.get(rec["id"])
            if prev is not None:
                if json.dumps(prev, sort_keys=True) == json.dumps(rec, sort_keys=True):
                    s.duplicates += 1
                else:
                    s.conflicts += 1
                    if strict_conflicts:
                        raise ValueError(f"{f}:{n}: id {rec['id']!r} appears with different content")
                continue
            seen[rec["id"]] = rec
            records.append(rec)
    if s.invalid and not skip_invalid:
        raise ValueError(f"{len(s.invalid)} record(s) fail the pair schema, nothing written; first: "
                         + "; ".join(f"{f}:{n}: {r}" for f, n, r in s.invalid[:3])
                         + " (use skip_invalid / --skip-invalid to drop them)")
    s.written = atomic_write_jsonl(out, records)
    return s
