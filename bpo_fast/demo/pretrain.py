"""Vision-tower pretraining of a (tiny) LLaVA: part of the first stage of the demo's world.

(The language model's text-only pretraining is :func:`bpo_fast.demo.sft.sft_train` on
text-only records: no pixels, so the vision tower and projector get no gradient.)

LLaVA's vision tower is a CLIP encoder pretrained on its own before any alignment;
:func:`pretrain_vision` plays that part for the tiny model: the vision tower alone learns to name
what each image patch holds (per-patch classification heads, dropped afterwards), so the
alignment stage only has to connect a vision encoder that sees to a language model that already
"knows" the world's text.
"""

import math

import torch

from bpo_fast.demo.sft import warmup_cosine
from bpo_fast.runtime import adapt_threads

__all__ = ["pretrain_vision"]


def pretrain_vision(model, pixel_values, labels, *, epochs=2, batch_size=128, lr=2e-3,
                    warmup_ratio=0.05, seed=0, device="cpu", log=None):
    """Train ``model``'s vision tower in place to classify every patch: ``pixel_values``
    ``[N, 3, H, W]`` (the processor's output), ``labels`` ``[N, P, K]`` long (P patches, K
    targets per patch, e.g. colour and kind; class 0 = nothing there). One linear head per target
    reads the tower's last hidden states (the features LLaVA's projector gets); the heads are
    thrown away afterwards. Returns the per-step losses."""
    if pixel_values.dim() != 4 or labels.dim() != 3 or labels.shape[0] != pixel_values.shape[0]:
        raise ValueError(f"pixel_values/labels: expected [N, 3, H, W] and [N, P, K] with the same "
                         f"N, got {tuple(pixel_values.shape)} and {tuple(labels.shape)}")
    if not isinstance(batch_size, int) or batch_size < 1 or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"batch_size/epochs: expected positive integers, got {batch_size!r}, "
                         f"{epochs!r}")
    tower = model.model.vision_tower
    hidden = tower.config.hidden_size
    gen = torch.Generator().manual_seed(seed)
    heads = torch.nn.ModuleList(torch.nn.Linear(hidden, int(labels[..., k].max()) + 1)
                                for k in range(labels.shape[-1]))
    for h in heads:
        torch.nn.init.normal_(h.weight, std=0.02, generator=gen)
        torch.nn.init.zeros_(h.bias)
    tower.to(device).train()
    heads.to(device)
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    n = pixel_values.shape[0]
    total = math.ceil(n / batch_size) * epochs
    sched = warmup_cosine(opt, total, warmup_ratio)
    losses = []
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for b in range(0, n, batch_size):
            adapt_threads()
            idx = order[b:b + batch_size]
            pix = pixel_values[idx].to(device, tower.dtype)
            lab = labels[idx].to(device)
            feats = tower(pix, output_hidden_states=True).hidden_states[-1][:, 1:]
            if feats.shape[1] != lab.shape[1]:
                raise ValueError(f"labels: {lab.shape[1]} patches, but the vision tower gives "
                                 f"{feats.shape[1]}")
            loss = sum(torch.nn.functional.cross_entropy(h(feats).flatten(0, 1), lab[..., k].flatten())
                       for k, h in enumerate(heads))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach().item())
            if log is not None:
                log(len(losses), total, losses[-1])
    tower.eval()
    return losses
