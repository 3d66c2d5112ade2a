"""Image-weakened generation for the families whose images are not one fixed-size tensor.

The pair builder's fast path (:mod:`bpo_fast.data.images` + :func:`bpo_fast.diffusion_noise`)
decodes images to the processor's fixed geometry as uint8 and noises them on the device in one
fused pass; it applies to CLIP-style processors (LLaVA-1.5, Gemma 3, PaliGemma: resize + crop to
one size). Processors that keep the aspect ratio, tile or flatten patches (Qwen2/2.5/3-VL,
LLaVA-NeXT/OneVision, Idefics3/SmolVLM, InternVL) go through this path instead:

- each row (one image, one prompt in the family's chat format, one noise level) is processed by
  the family's own processor (``processor(images=[image], text=[prompt])``): the image tokens are
  expanded exactly as in training and the pixel values come out normalised;
- the noise is added to those normalised pixel values, ``x_t = sqrt(abar_t) x_0 + sqrt(1 -
  abar_t) eps`` (the official BPO code noises the processed image tensor the same way; patches,
  tiles and flattening only rearrange the normalised pixels), with ``eps`` from a generator
  seeded per row;
- rows are left-padded (text inputs: ``input_ids``, ``attention_mask`` and the family's
  ``token_type_ids`` / ``mm_token_type_ids``) and their images batched by the family's adapter
  (:meth:`bpo_fast.models.vlm.VLMAdapter.collate_images`), then ``model.generate``.

Cost: the processor runs on CPU per row and the noise is plain PyTorch; the fused kernel path
stays the one for fixed-size processors.

:class:`Answerer` is the one way bpo-fast has a model answer questions about images, on this
path with clean images (any number per row, or none): ``bpo-fast generate``, the demo's
captions and POPE answers, and ``train --eval-generate`` all call it. The prompt comes from the
chat-template rule of :func:`bpo_fast.models.vlm.resolve_chat_template`, each row's images go
through the family's processor (every family of :data:`bpo_fast.models.vlm.ADAPTERS`), rows are
left-padded into one ``generate`` call, and a sampled row draws from its own seed
(:class:`bpo_fast.data.generation.Generator`), so an answer never depends on the rows it was
batched with.
"""

import torch

__all__ = ["ProcessorRows", "Answerer"]

_TEXT_PAD = {"input_ids": None, "attention_mask": 0, "token_type_ids": 0, "mm_token_type_ids": 0}


class ProcessorRows:
    """Build ``model.generate`` inputs for rows ``(prompt text, images, noise step or None,
    seed)`` with the family's processor and adapter. ``images``: one PIL image, or a list of
    them (one sample's images, as ``apply_chat_template`` passes them; empty: a text-only row).
    ``processor_kwargs``: extra keyword arguments of every processor call (the one place they
    enter generation)."""

    def __init__(self, processor, model_type, schedule, processor_kwargs=None):
        from bpo_fast.data.generation import pad_id
        from bpo_fast.models.vlm import get_adapter

        self.processor = processor
        self.adapter = get_adapter(model_type)
        self.schedule = schedule
        self.processor_kwargs = dict(processor_kwargs or {})
        self.pad_id = pad_id(processor.tokenizer)
        self._encoded = {}  # (prompt, image) -> processor output: one call for a record's levels

    def encode(self, text, image):
        """The processor's output for one row's prompt and image (kept until :meth:`clear`: the
        noise levels of a record share it)."""
        key = (text, id(image))
        if key not in self._encoded:
            if isinstance(image, (list, tuple)):
                # one sample's images as one list (LLaVA-OneVision: batch_num_images), or none
                images = [list(image)] if image else None
            else:
                images = [image]
            enc = self.processor(images=images, text=[text], return_tensors="pt",
                                 **self.processor_kwargs)
            self._encoded[key] = (image, enc)  # the image kept alive: its id stays unique
        return self._encoded[key][1]

    def check(self, text, image):
        """Run the processor on one prompt and image now; a sample it rejects (a ValueError: an
        aspect ratio Qwen2-VL cannot resize, a placeholder count that does not match) raises
        :class:`~bpo_fast.data.bad_samples.SampleError` saying why."""
        from bpo_fast.data.bad_samples import SampleError

        try:
            self.encode(text, image)
        except ValueError as exc:
            raise SampleError(f"the processor rejects it ({type(exc).__name__}: "
                              f"{' '.join(str(exc).split())})") from None

    def clear(self):
        self._encoded.clear()

    def noised(self, pixel_values, step, seed):
        """``x_t`` of the processor's normalised pixels (a clean copy for ``step`` None)."""
        if step is None:
            return pixel_values
        g = torch.Generator().manual_seed(int(seed) & (2 ** 63 - 1))
        eps = torch.randn(pixel_values.shape, generator=g, dtype=torch.float32)
        a = float(self.schedule.sqrt_alphas_cumprod[step])
        b = float(self.schedule.sqrt_one_minus_alphas_cumprod[step])
        return (a * pixel_values.float() + b * eps).to(pixel_values.dtype)

    def __call__(self, rows, device, dtype):
        from bpo_fast.data.generation import left_pad

        texts, images = [], []
        for text, image, step, seed in rows:
            enc = self.encode(text, image)
            texts.append({k: enc[k][0] for k in _TEXT_PAD if k in enc})
            img = dict(self.adapter.image_inputs(enc))
            if "pixel_values" in img:
                img["pixel_values"] = self.noised(img["pixel_values"], step, seed)
            images.append(img)
        batch = {}
        for key, fill in _TEXT_PAD.items():
            if key in texts[0]:   # left padding for generation
                batch[key] = left_pad([r[key] for r in texts],
                                      self.pad_id if fill is None else fill).to(device)
        for k, v in self.adapter.collate_images(images).items():
            if isinstance(v, torch.Tensor):
                v = v.to(device)
                if v.is_floating_point():
                    v = v.to(dtype)
            batch[k] = v
        return batch


class Answerer:
    """A model's answers to questions about images (see the module docstring): ``bpo-fast
    generate``, the demo's evaluation and ``train --eval-generate`` go through it.

    ``sampling``: :class:`bpo_fast.data.generation.Sampling` (or an options dataclass with its
    fields). ``device``/``dtype``: where the inputs go and the dtype of their pixels (default:
    the model's). ``processor_kwargs``: passed to every processor call.
    """

    def __init__(self, model, processor, sampling, *, device=None, dtype=None,
                 processor_kwargs=None):
        from bpo_fast.data.generation import Generator
        from bpo_fast.models.preference import unwrap

        params = [p for p in model.parameters() if p.is_floating_point()]
        device = torch.device(device) if device is not None else params[0].device
        dtype = dtype or params[0].dtype
        self.gen = Generator(model, processor, sampling, device, dtype)
        self.gen.chat_template()  # the chat-template rule fails here, before any answer
        self.rows = ProcessorRows(processor, unwrap(model).config.model_type, None,
                                  processor_kwargs=processor_kwargs)
        self.adapter = self.rows.adapter
        self.oom_splits = 0  # batches halved after CUDA out-of-memory

    def prompt(self, turns):
        """The prompt text of LLaVA ``turns`` (the last one the question) in the model's format."""
        return self.gen.prompt(turns)

    def check(self, turns, images):
        """Raise a ``ValueError`` (:class:`~bpo_fast.data.bad_samples.SampleError` when the
        family or the processor cannot take it) when this row cannot be answered, before it
        joins a batch."""
        try:
            self._check_row(self.prompt(turns), list(images))
        finally:
            self.rows.clear()

    def _check_row(self, text, images):
        from bpo_fast.data.bad_samples import SampleError

        try:   # what the family takes (PaliGemma: exactly one image per prompt)
            self.adapter.check_pair_images(len(images), "question")
        except ValueError as exc:
            raise SampleError(str(exc)) from None
        self.rows.check(text, images)   # the processor's output stays cached for the batch

    def __call__(self, items, seeds=None, on_bad=None):
        """``items``: ``(turns, images)`` per row (LLaVA turns ending with the question; a list
        of PIL images, empty for a text-only row). ``seeds``: one per row when sampling. Returns
        ``(answers, generated tokens)``; on CUDA out-of-memory the rows are halved (each keeps
        its seed, so the answers are the same).

        ``on_bad(i, exc)``: a row the family or the processor cannot take (a
        :data:`~bpo_fast.data.bad_samples.SAMPLE_ERRORS` exception) is passed to it and left
        out (its answer None), the other rows answered; without it, such a row raises. Each
        row goes through the processor once either way."""
        from bpo_fast.data.bad_samples import SAMPLE_ERRORS

        items = list(items)
        answers = [None] * len(items)
        rows, keep = [], []
        try:
            for i, (turns, images) in enumerate(items):
                row = (self.prompt(turns), list(images), None, None)
                try:
                    self._check_row(row[0], row[1])
                except SAMPLE_ERRORS as exc:
                    if on_bad is None:
                        raise
                    on_bad(i, exc)
                    continue
                rows.append(row)
                keep.append(i)
            if not rows:
                return answers, 0
            got, ntok = self._generate(rows, None if seeds is None else [seeds[i] for i in keep])
        finally:
            self.rows.clear()  # the processor outputs are cached per call, not kept
        for i, a in zip(keep, got):
            answers[i] = a
        return answers, ntok

    def _generate(self, rows, seeds):
        try:
            inputs = self.rows(rows, self.gen.device, self.gen.dtype)
            return self.gen.generate_inputs(inputs, row_seeds=seeds)
        except torch.cuda.OutOfMemoryError:
            if len(rows) <= 1:
                raise
        torch.cuda.empty_cache()
        self.oom_splits += 1
        h = len(rows) // 2
        a, n = self._generate(rows[:h], None if seeds is None else seeds[:h])
        b, m = self._generate(rows[h:], None if seeds is None else seeds[h:])
        return a + b, n + m
