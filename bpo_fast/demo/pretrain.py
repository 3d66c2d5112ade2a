"""Text-only pretraining of a (tiny) LLaVA's language model: the first stage of the demo's world.

The paper's explanation of hallucination is an imbalance: the language model has read far more
text than the short image-caption alignment stage shows it images, so it answers from its text
prior. :func:`pretrain_text` makes that prior: the language model (through the full LLaVA
forward without an image) reads a corpus of text-only conversations, chat-formatted by the
model's own processor exactly as the alignment and DPO data are (through
:meth:`bpo_fast.data.preference.PreferenceCollator.encode_pair` with no image), and learns every
token of them (questions and answers: it *reads* the corpus). The vision tower and the projector
get no gradient (no image is seen).

LLaVA's vision tower is a CLIP encoder pretrained on its own before any alignment;
:func:`pretrain_vision` plays that part for the tiny model: the vision tower alone learns to name
what each image patch holds (per-patch classification heads, dropped afterwards), so the
alignment stage only has to connect a vision encoder that sees to a language model that already
"knows" the world's text.
"""

import math
import random

import torch

from bpo_fast.data.preference import PreferenceCollator

__all__ = ["encode_text_records", "pretrain_text", "pretrain_vision"]


def encode_text_records(processor, records):
    """Token ids of each text-only LLaVA-format record (its whole conversation, chat template
    included), as lists of ints."""
    collator = PreferenceCollator(processor)
    rows = []
    for rec in records:
        conv = rec.get("conversations")
        if not conv or len(conv) < 2 or conv[-1].get("from") != "gpt":
            raise ValueError(f"records: {rec.get('id')!r} is not a conversation ending in a gpt turn")
        if "image" in rec or any("<image>" in t["value"] for t in conv):
            raise ValueError(f"records: {rec.get('id')!r} has an image; the corpus is text only")
        item = {"id": rec.get("id"), "prompt": conv[:-1], "chosen": conv[-1]["value"],
                "rejected": conv[-1]["value"], "images": []}
        prompt, answer, _, _ = collator.encode_pair(item)
        rows.append(prompt + answer)
    return rows, collator.pad_id


def pretrain_text(model, processor, records, *, epochs=1, batch_size=64, lr=2e-3,
                  warmup_ratio=0.05, seed=0, device="cpu", log=None):
    """Train ``model``'s language model in place on text-only ``records`` (LLaVA format, no
    image); every token is a target. Returns the per-step losses; ``log(step, total, loss)`` is
    called after each step when given."""
    records = list(records)
    if not records:
        raise ValueError("records: no text records")
    if not isinstance(batch_size, int) or batch_size < 1 or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"batch_size/epochs: expected positive integers, got {batch_size!r}, "
                         f"{epochs!r}")
    rows, pad_id = encode_text_records(processor, records)
    n = len(rows)
    total = math.ceil(n / batch_size) * epochs
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, int(warmup_ratio * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    rng = random.Random(seed)
    losses = []
    step = 0
    for _ in range(epochs):
        order = list(range(n))
        rng.shuffle(order)
        for b in range(0, n, batch_size):
            idx = order[b:b + batch_size]
            t = max(len(rows[i]) for i in idx)
            ids = torch.full((len(idx), t), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), t), dtype=torch.long)
            for j, i in enumerate(idx):
                ids[j, :len(rows[i])] = torch.tensor(rows[i])
                mask[j, :len(rows[i])] = 1
            labels = ids.masked_fill(mask == 0, -100)
            ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(out.loss.detach().item())
            step += 1
            if log is not None:
                log(step, total, losses[-1])
    model.eval()
    return losses


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
    warmup = max(1, int(warmup_ratio * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    losses = []
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for b in range(0, n, batch_size):
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
            step += 1
            if log is not None:
                log(step, total, losses[-1])
    tower.eval()
    return losses
