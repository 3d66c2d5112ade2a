"""The generation engine of the pair builder: model loading, image-weakened pixels, and batched,
KV-cached generation with one random stream per row.

- :func:`pixels_for_levels`: uint8 images -> model pixels at K noise levels in one fused
  ``bpo_fast.diffusion_noise`` call (normalisation fused), or the clean image as the processor
  makes it.
- :class:`Generator`: left-padded ``generate`` with the builder's sampling settings; halves the
  rows on CUDA out-of-memory; each row samples from its own seed (:class:`_RowSampler`), so an
  answer never depends on the rows it was batched with.
- :func:`render_prompt`: the one place a prompt is built (chat template + image-token expansion).
"""

import hashlib
from dataclasses import dataclass

import torch

from bpo_fast.data.images import normalize_uint8
from bpo_fast.errors import UserError
from bpo_fast.data.schema import turns_to_messages

__all__ = ["Generator", "NonFiniteLogitsError", "Sampling", "check_sampling", "load_model",
           "pixels_for_levels", "derive_seed", "render_prompt", "image_token_count", "left_pad",
           "pad_id"]


@dataclass
class Sampling:
    """How :class:`Generator` decodes (the fields it reads; a command's options dataclass with
    the same names, e.g. ``PairBuilderConfig`` or ``GenerateOptions``, serves as well):
    greedy by default, else each row sampled from its own seed at ``temperature`` / ``top_p``;
    ``chat_template``: ``--chat-template`` (None: the processor's, else the family default)."""

    max_new_tokens: int = 256
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    chat_template: str = None


def check_sampling(s):
    """Raise a ``ValueError`` naming the field when the decoding settings of ``s`` (a
    :class:`Sampling` or an options dataclass with its fields) are out of range."""
    if not 0 <= s.min_new_tokens <= s.max_new_tokens:
        raise ValueError(f"min_new_tokens: expected 0 <= min_new_tokens <= max_new_tokens "
                         f"({s.max_new_tokens}), got {s.min_new_tokens}")
    if s.do_sample and not s.temperature > 0:
        raise ValueError(f"temperature: expected > 0 when sampling, got {s.temperature}")
    if not 0 < s.top_p <= 1:
        raise ValueError(f"top_p: expected 0 < top_p <= 1, got {s.top_p}")


def derive_seed(seed, *keys):
    """A 63-bit seed from ``seed`` and keys (record id, strategy, ...): stable across processes
    and runs (unlike ``hash()``), and wide enough that millions of records do not collide."""
    h = hashlib.blake2b("\x1f".join(str(k) for k in (seed,) + keys).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") >> 1


def load_model(path, device, dtype):
    """A saved vision-language model (:func:`bpo_fast.models.preference.load_vlm`, in eval mode)
    and its processor."""
    from bpo_fast.models.preference import load_vlm
    from bpo_fast.models.vlm import load_processor

    model = load_vlm(path, dtype=dtype, device=device).eval()
    # the model layer's loader: a supported family's processor, no torchvision needed
    processor = load_processor(path)
    return model, processor


def render_prompt(processor, messages, *, chat_template, image_token=None, n_image_tokens=None):
    """The generation prompt (text) of chat ``messages``: ``chat_template`` (the one rule of every
    command, :func:`bpo_fast.models.vlm.resolve_chat_template`) with a generation prompt, and each
    image placeholder expanded to the image's tokens as the processor would (so the already
    normalised pixels need no processor call); no expansion when ``image_token`` is None (the
    family's processor expands it)."""
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                         chat_template=chat_template)
    if image_token is not None:
        text = text.replace(image_token, image_token * n_image_tokens)
    return text


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
    noisy = [(k, s) for k, s in enumerate(levels) if s is not None]
    if noisy:
        from bpo_fast.ops.noise import NoiseSchedule, diffusion_noise

        sched = schedule if isinstance(schedule, NoiseSchedule) else schedule_for(schedule, num_noise_steps)
        t = torch.tensor([s for _, s in noisy], dtype=torch.int64, device=images.device)
        t = t.unsqueeze(0).expand(B, -1).contiguous()
        mean, std = (list(geometry.mean), list(geometry.std)) if geometry.do_normalize else (None, None)
        # Levels were range-checked with the config: skip the op's check (a device sync on CUDA).
        noised = diffusion_noise(images, t, sched, space="normalized", mean=mean, std=std,
                                 out_dtype=out_dtype, seed=seed, generator=generator, layout=layout,
                                 check_timesteps=False)
        if len(noisy) == len(levels):
            return noised
    out = torch.empty((B, len(levels), C, H, W), dtype=out_dtype, device=images.device)
    for j, (k, _) in enumerate(noisy):
        out[:, k] = noised[:, j]
    for k, s in enumerate(levels):
        if s is None:
            out[:, k] = normalize_uint8(nchw, geometry, out_dtype=out_dtype)
    return out


_SCHEDULES = {}


def schedule_for(kind, num_steps):
    # Built once per (kind, steps) and reused: the schedule caches its device tables.
    from bpo_fast.ops.noise import NoiseSchedule

    key = (kind, num_steps)
    if key not in _SCHEDULES:
        _SCHEDULES[key] = NoiseSchedule(kind, num_steps=num_steps)
    return _SCHEDULES[key]


def image_token_count(processor, geometry):
    """How many image tokens the processor puts in place of one image placeholder."""
    from PIL import Image

    h, w = geometry.output_hw()
    tok = processor.tokenizer
    image_token = getattr(processor, "image_token", "<image>")
    img = Image.new("RGB", (w, h))
    enc = processor(text=[image_token], images=[img], return_tensors="pt")
    tid = tok.convert_tokens_to_ids(image_token)
    return image_token, int((enc["input_ids"] == tid).sum())


def pad_id(tokenizer):
    """The id left padding fills in: the tokenizer's pad token, else its EOS (the tokenizer is
    not changed)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def left_pad(rows, fill):
    """1-D tensors -> one ``[len(rows), longest]`` tensor, each row at the right end (left
    padding for generation), ``fill`` before it."""
    t = max(r.shape[0] for r in rows)
    out = torch.full((len(rows), t), fill, dtype=rows[0].dtype)
    for i, r in enumerate(rows):
        out[i, t - r.shape[0]:] = r
    return out


class Generator:
    """Batched, left-padded, KV-cached generation with the builder's sampling settings."""

    def __init__(self, model, processor, cfg, device, dtype):
        # cfg: the builder's config (max_new_tokens, min_new_tokens, do_sample, temperature,
        # top_p); image_token/n_image_tokens are set by the builder for image prompts
        self.model, self.processor, self.cfg = model, processor, cfg
        self.device, self.dtype = device, dtype
        self.tok = processor.tokenizer
        # Llama-style tokenizers may have no pad token; left padding only needs an id, given to
        # generate here: the caller's tokenizer is left as it is (train saves its processor)
        self.pad_id = pad_id(self.tok)
        self.eos = self.tok.eos_token_id
        # do_sample=False: when sampling, _RowSampler picks each row's token from the row's own
        # random stream and hands generate a one-hot score, which greedy decoding then takes
        self.gen_kwargs = {"max_new_tokens": cfg.max_new_tokens, "use_cache": True,
                           "pad_token_id": self.pad_id, "do_sample": False}
        if cfg.min_new_tokens:
            self.gen_kwargs["min_new_tokens"] = cfg.min_new_tokens
        self.image_token = None
        self.n_image_tokens = None
        self._template = None

    def chat_template(self):
        """The chat template of every prompt (``--chat-template``, else the processor's, else the
        family's documented default; a ``ValueError`` naming ``--chat-template`` otherwise), or
        None for a family whose processor builds the prompt (PaliGemma)."""
        if self._template is None:
            from bpo_fast.models.vlm import resolve_chat_template

            self._template = (resolve_chat_template(self.processor, self.model.config.model_type,
                                                    getattr(self.cfg, "chat_template", None))
                              or False)
        return self._template or None

    def _render(self, messages, **expand):
        template = self.chat_template()
        if template is None:  # the processor builds the prompt: its image token + the text
            from bpo_fast.models.vlm import processor_prompt

            return processor_prompt(self.processor, messages)
        return render_prompt(self.processor, messages, chat_template=template, **expand)

    def settings(self):
        keys = ("max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_p")
        s = {k: getattr(self.cfg, k) for k in keys}
        if not self.cfg.do_sample:
            s.pop("temperature")
            s.pop("top_p")
        return s

    def prompt(self, turns):
        """The generation prompt of LLaVA turns (the last one the question), images expanded."""
        return self._render(turns_to_messages(turns), image_token=self.image_token,
                            n_image_tokens=self.n_image_tokens)

    def text_prompt(self, text):
        """The generation prompt of one text-only user message (the LLM error injector's)."""
        msgs = [{"role": "user", "content": [{"type": "text", "text": text}]}]
        if self.chat_template() is None:  # a text-only prompt: the processor adds <bos>
            return text
        return self._render(msgs)

    @torch.inference_mode()
    def generate(self, texts, pixel_values=None, row_seeds=None, max_new_tokens=None):
        """-> (decoded answers, generated token count). ``row_seeds``: one seed per text (its
        sampling stream: a row's answer does not depend on the rows batched with it)."""
        ids = [torch.tensor(x, dtype=torch.long) for x in self.tok(list(texts))["input_ids"]]
        inputs = {"input_ids": left_pad(ids, self.pad_id).to(self.device),
                  "attention_mask": left_pad([torch.ones_like(x) for x in ids], 0).to(self.device)}
        if pixel_values is not None:
            inputs["pixel_values"] = pixel_values.to(self.dtype)
        return self.generate_inputs(inputs, row_seeds, max_new_tokens)

    @torch.inference_mode()
    def generate_inputs(self, inputs, row_seeds=None, max_new_tokens=None):
        """:meth:`generate` from prepared model inputs (left-padded ``input_ids`` /
        ``attention_mask`` and the family's image inputs, e.g. from
        :class:`bpo_fast.data.vlm_generation.ProcessorRows`)."""
        n_rows = inputs["input_ids"].shape[0]
        kwargs = dict(self.gen_kwargs)
        if max_new_tokens is not None:
            kwargs["max_new_tokens"] = max_new_tokens
            if "min_new_tokens" in kwargs:
                kwargs["min_new_tokens"] = min(kwargs["min_new_tokens"], max_new_tokens)
        from transformers import LogitsProcessorList

        watch = _NonFiniteWatch(n_rows, self.device)
        processors = [watch]
        if self.cfg.do_sample:
            if row_seeds is None or len(row_seeds) != n_rows:
                raise ValueError("row_seeds: expected one seed per row when sampling")
            processors.append(_RowSampler(
                row_seeds, kwargs["max_new_tokens"], inputs["input_ids"].shape[1],
                self.cfg.temperature, self.cfg.top_p, self.device))
        kwargs["logits_processor"] = LogitsProcessorList(processors)
        from bpo_fast.models.vlm import images_used

        with images_used(self.model):
            out = self.model.generate(**inputs, **kwargs)
        watch.check()
        new = out[:, inputs["input_ids"].shape[1]:]
        ntok = _count_generated(new, self.eos)
        texts = self.tok.batch_decode(new, skip_special_tokens=True)
        return [t.strip() for t in texts], ntok


    def generate_split(self, texts, pixel_values=None, row_seeds=None, max_new_tokens=None,
                       on_split=None):
        """:meth:`generate`, halving the rows on CUDA out-of-memory (a batch of unusually long
        prompts must not kill a day-long run); ``on_split()`` is called for each halving. Each
        row keeps its seed, so a halved batch gives the same answers."""
        try:
            return self.generate(texts, pixel_values, row_seeds, max_new_tokens)
        except torch.cuda.OutOfMemoryError:
            if len(texts) <= 1:
                raise
        torch.cuda.empty_cache()
        if on_split is not None:
            on_split()
        h = len(texts) // 2
        rs = row_seeds if row_seeds is not None else [None] * len(texts)
        halves = [(texts[:h], None if pixel_values is None else pixel_values[:h],
                   None if row_seeds is None else rs[:h]),
                  (texts[h:], None if pixel_values is None else pixel_values[h:],
                   None if row_seeds is None else rs[h:])]
        answers, ntok = [], 0
        for t, pv, sd in halves:
            a, n = self.generate_split(t, pv, sd, max_new_tokens, on_split)
            answers.extend(a)
            ntok += n
        return answers, ntok


class NonFiniteLogitsError(UserError):
    """The model's next-token scores held NaN or +inf: its answers would be tokens picked from
    garbage (greedy decoding of NaN scores returns token 0 every step)."""


class _NonFiniteWatch:
    """A logits processor that only looks: each row's scores are checked for NaN / +inf on the
    device (``-inf`` is masking, e.g. ``min_new_tokens``), flags kept there, read once after
    ``generate`` (:meth:`check`: no host sync per token)."""

    def __init__(self, n_rows, device):
        self.bad = torch.zeros(n_rows, dtype=torch.bool, device=device)

    def __call__(self, input_ids, scores):
        self.bad |= (torch.isnan(scores) | (scores == float("inf"))).any(-1)
        return scores

    def check(self):
        rows = self.bad.nonzero().flatten().tolist()
        if rows:
            raise NonFiniteLogitsError(
                f"model: non-finite next-token scores (NaN or inf) in {len(rows)} of "
                f"{self.bad.numel()} rows of a batch (rows {rows[:8]}): the model's weights or "
                "its dtype overflow give no usable answers; check the checkpoint (e.g. a "
                "training run that diverged) or use a wider --dtype")


class _RowSampler:
    """A ``generate`` logits processor that samples each row from its own random stream.

    Row ``i`` draws its uniforms from ``torch.Generator().manual_seed(row_seeds[i])`` (on the
    CPU: the same numbers on every device), one per generated position, and picks its token by
    inverse CDF over the temperature-scaled, top-p-filtered distribution (ties broken by a stable
    sort). The scores it returns are -inf except at the picked token, so ``generate`` run greedy
    (after its own processors, e.g. ``min_new_tokens``) emits exactly these tokens. A row's answer
    therefore depends on its seed and its prompt only, not on the batch it was generated in.
    """

    CHUNK = 256  # uniforms drawn per row at a time

    def __init__(self, row_seeds, max_new_tokens, prompt_len, temperature, top_p, device):
        # the uniforms are drawn chunk by chunk as positions are generated: memory follows the
        # tokens generated, not --max-new-tokens (8 bytes a row and position); a generator's
        # stream does not depend on how it is split, so the numbers are those of one draw
        self.gens = [torch.Generator().manual_seed(int(sd)) for sd in row_seeds]
        self.max_new_tokens = int(max_new_tokens)
        self.chunks = []
        self.device = device
        self.prompt_len = prompt_len
        self.temperature = float(temperature)
        self.top_p = float(top_p)

    def uniforms(self, t):
        """Each row's uniform for generated position ``t`` (``[rows]`` float64)."""
        c, k = divmod(t, self.CHUNK)
        while len(self.chunks) <= c:
            n = min(self.CHUNK, self.max_new_tokens - len(self.chunks) * self.CHUNK)
            self.chunks.append(torch.stack([torch.rand(n, generator=g, dtype=torch.float64)
                                            for g in self.gens]).to(self.device))
        return self.chunks[c][:, k]

    def __call__(self, input_ids, scores):
        t = min(input_ids.shape[1] - self.prompt_len, self.max_new_tokens - 1)
        # the row's maximum first: a tiny temperature then sends the others to -inf, never
        # the maximum to inf (inf - inf: a NaN distribution that picked the last token)
        scores = scores.float()
        probs = torch.softmax((scores - scores.amax(-1, keepdim=True)) / self.temperature,
                              dim=-1)
        if self.top_p < 1.0:
            sp, idx = probs.sort(dim=-1, descending=True, stable=True)
            # the smallest prefix whose mass reaches top_p (the first token always stays)
            sp = sp * ((sp.cumsum(-1) - sp) < self.top_p)
        else:
            sp, idx = probs, None  # no sort needed: the CDF in vocabulary order
        cdf = sp.double().cumsum(-1)
        target = (self.uniforms(t) * cdf[:, -1]).unsqueeze(1)
        # the first position whose CDF passes the target: it has mass (u < 1, so one exists)
        j = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[1] - 1)
        tok = j if idx is None else idx.gather(1, j)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, tok, 0.0)


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

