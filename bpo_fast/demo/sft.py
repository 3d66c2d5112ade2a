"""Supervised warm-up of a (tiny) LLaVA on LLaVA-format records, and batched caption generation.

The demo's starting point is a model that describes images but leans on the language prior of
its captions; :func:`sft_train` makes it. Samples are the records' gpt turns (earlier turns are
the prompt), encoded with the model's own processor through
:meth:`bpo_fast.data.preference.PreferenceCollator.encode_pair`, so the SFT data sees exactly the
chat template, image tokens and label masking the DPO trainer uses.
"""

import json
import math
import os
import random

import torch

from bpo_fast.data.preference import IGNORE_INDEX, PreferenceCollator
from bpo_fast.data.schema import turns_to_messages


def _load_records(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def sft_samples(records, *, turns="all"):
    """(record, prompt turns, answer) for each gpt turn (``turns="first"``: the first only,
    ``"last"``: the last only, with the earlier turns as its prompt)."""
    if turns not in ("all", "first", "last"):
        raise ValueError(f"turns: expected 'all', 'first' or 'last', got {turns!r}")
    out = []
    for rec in records:
        conv = rec["conversations"]
        idx = list(range(1, len(conv), 2))
        if turns == "first":
            idx = idx[:1]
        elif turns == "last":
            idx = idx[-1:]
        out.extend((rec, conv[:i], conv[i]["value"]) for i in idx)
    return out


class _Encoded:
    """Pre-tokenised samples (the processor runs once per image, not once per epoch)."""

    def __init__(self, processor, samples, image_root):
        from PIL import Image

        collator = PreferenceCollator(processor)
        self.pad_id = collator.pad_id
        self.rows, self.labels, self.image_index, pixels = [], [], [], {}
        for rec, prompt, answer in samples:
            path = os.path.join(image_root, rec["image"])
            with Image.open(path) as im:
                image = im.convert("RGB")
            item = {"image": image, "prompt": prompt, "chosen": answer, "rejected": answer,
                    "id": rec["id"]}
            prompt_ids, resp, _, image_out = collator.encode_pair(item)
            self.rows.append(prompt_ids + resp)
            self.labels.append([IGNORE_INDEX] * len(prompt_ids) + resp)
            if path not in pixels:
                pixels[path] = (len(pixels), image_out["pixel_values"][0])
            self.image_index.append(pixels[path][0])
        self.pixel_values = torch.stack([p for _, p in sorted(pixels.values(), key=lambda x: x[0])])

    def __len__(self):
        return len(self.rows)

    def batch(self, idx):
        t = max(len(self.rows[i]) for i in idx)
        ids = torch.full((len(idx), t), self.pad_id, dtype=torch.long)
        labels = torch.full((len(idx), t), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(idx), t), dtype=torch.long)
        for j, i in enumerate(idx):
            n = len(self.rows[i])
            ids[j, :n] = torch.tensor(self.rows[i])
            labels[j, :n] = torch.tensor(self.labels[i])
            mask[j, :n] = 1
        pix = self.pixel_values[[self.image_index[i] for i in idx]]
        return ids, mask, labels, pix


def sft_train(model, processor, data, image_root, *, epochs=3, batch_size=32, lr=3e-3,
              warmup_ratio=0.05, weight_decay=0.0, seed=0, device="cpu", turns="all",
              max_steps=None, log=None):
    """Train ``model`` in place on ``data`` (LLaVA-format JSON/JSONL path or record list).

    All parameters train (the tiny model is trained from scratch). Returns the per-step losses.
    ``log(step, total, loss)`` is called after each step when given.
    """
    records = _load_records(data) if isinstance(data, str) else list(data)
    if not records:
        raise ValueError("data: no records")
    if batch_size < 1 or epochs < 1:
        raise ValueError("batch_size/epochs: expected positive integers")
    enc = _Encoded(processor, sft_samples(records, turns=turns), image_root)
    n = len(enc)
    steps_per_epoch = math.ceil(n / batch_size)
    total = steps_per_epoch * epochs if max_steps is None else min(max_steps, steps_per_epoch * epochs)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, int(warmup_ratio * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    rng = random.Random(seed)
    losses, step = [], 0
    while step < total:
        order = list(range(n))
        rng.shuffle(order)
        for b in range(0, n, batch_size):
            if step >= total:
                break
            ids, mask, labels, pix = (t.to(device) for t in enc.batch(order[b:b + batch_size]))
            out = model(input_ids=ids, attention_mask=mask, pixel_values=pix.to(model.dtype),
                        labels=labels)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(out.loss.detach().item())
            step += 1
            if log is not None:
                log(step, total, losses[-1])
    model.eval()
    return losses


@torch.inference_mode()
def generate_answers(model, processor, images, prompt, *, batch_size=64, max_new_tokens=48,
                     device="cpu"):
    """Greedy answers of ``model`` to ``prompt`` (a question string, or a list of one question
    per image) for each PIL image."""
    tok = processor.tokenizer
    prompts = [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
    if len(prompts) != len(images):
        raise ValueError(f"prompt: expected one question per image ({len(images)}), got "
                         f"{len(prompts)}")
    texts = [processor.apply_chat_template(
        turns_to_messages([{"from": "human", "value": "<image>\n" + p}]),
        add_generation_prompt=True, tokenize=False) for p in prompts]
    model.to(device).eval()
    answers = []
    side = tok.padding_side
    tok.padding_side = "left"          # prompts of different lengths: generate after the prompt
    try:
        for b in range(0, len(images), batch_size):
            chunk = images[b:b + batch_size]
            enc = processor(images=chunk, text=texts[b:b + batch_size], return_tensors="pt",
                            padding=True)
            enc = {k: v.to(device) for k, v in enc.items()}
            enc["pixel_values"] = enc["pixel_values"].to(model.dtype)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            new = out[:, enc["input_ids"].shape[1]:]
            answers += [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
    finally:
        tok.padding_side = side
    return answers
