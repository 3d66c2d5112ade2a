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
"""

import torch

__all__ = ["ProcessorRows"]

_TEXT_PAD = {"input_ids": None, "attention_mask": 0, "token_type_ids": 0, "mm_token_type_ids": 0}


class ProcessorRows:
    """Build ``model.generate`` inputs for rows ``(prompt text, PIL image, noise step or None,
    seed)`` with the family's processor and adapter."""

    def __init__(self, processor, model_type, schedule, processor_kwargs=None):
        from bpo_fast.models.vlm import get_adapter

        self.processor = processor
        self.adapter = get_adapter(model_type)
        self.schedule = schedule
        self.processor_kwargs = dict(processor_kwargs or {})
        tok = processor.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self._encoded = {}  # (prompt, image) -> processor output: one call for a record's levels

    def encode(self, text, image):
        """The processor's output for one row's prompt and image (kept until :meth:`clear`: the
        noise levels of a record share it)."""
        key = (text, id(image))
        if key not in self._encoded:
            enc = self.processor(images=[image], text=[text], return_tensors="pt",
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
        texts, images = [], []
        for text, image, step, seed in rows:
            enc = self.encode(text, image)
            texts.append({k: enc[k][0] for k in _TEXT_PAD if k in enc})
            img = dict(self.adapter.image_inputs(enc))
            img["pixel_values"] = self.noised(img["pixel_values"], step, seed)
            images.append(img)
        t = max(r["input_ids"].shape[0] for r in texts)
        batch = {}
        for key, fill in _TEXT_PAD.items():
            if key not in texts[0]:
                continue
            fill = self.pad_id if fill is None else fill
            out = torch.full((len(texts), t), fill, dtype=texts[0][key].dtype)
            for i, r in enumerate(texts):
                n = r[key].shape[0]
                out[i, t - n:] = r[key]  # left padding for generation
            batch[key] = out.to(device)
        for k, v in self.adapter.collate_images(images).items():
            if isinstance(v, torch.Tensor):
                v = v.to(device)
                if v.is_floating_point():
                    v = v.to(dtype)
            batch[k] = v
        return batch
