"""Supervised warm-up of a (tiny) LLaVA on LLaVA-format records, and batched caption generation.

The demo's starting point is a model that describes images but leans on the language prior of
its captions; :func:`sft_train` makes it. Samples are the records' gpt turns (earlier turns are
the prompt), encoded with the model's own processor through
:meth:`bpo_fast.data.preference.PreferenceCollator.encode_pair`, so the SFT data sees exactly the
chat template, image tokens and label masking the DPO trainer uses.
"""

import json
import math
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
    """Pre-tokenised rows (the processor runs once per sample and each image once per run, not
    once per epoch; the pixels are kept as one tensor).

    ``pack=True`` (the ``turns="all"`` default): the samples of one record -- its gpt turns,
    each with the earlier turns as its prompt -- are one row, the record's whole conversation
    with every answer labelled, wherever each sample's tokens are a prefix of the last one's
    (checked; a record where they are not keeps one row per sample). A causal model's logits
    at a position depend only on the tokens before it, so every answer token is scored exactly
    as in its own sample, while the shared prefix (image tokens, earlier turns) is computed once
    instead of once per turn, and the rows are of similar length (little padding)."""

    def __init__(self, processor, samples, image_root, *, pack=False):
        from bpo_fast.data.images import open_image

        collator = PreferenceCollator(processor)
        self.pad_id = collator.pad_id
        self.rows, self.labels, self.image_index, self.answers, pixels = [], [], [], [], {}
        self.samples = len(samples)
        groups = []                                   # consecutive samples of one record
        for sample in samples:
            if pack and groups and groups[-1][0][0] is sample[0]:
                groups[-1].append(sample)
            else:
                groups.append([sample])
        for group in groups:
            rec = group[0][0]
            path, image = rec.get("image"), None   # the key of the record's pixels
            if path is not None:  # the one loader of every command (HF's RGB rule)
                image, _ = open_image(path, image_root)
            encoded = []
            for _, prompt, answer in group:
                # the collator's encoding (chat template, image tokens, prompt/answer split) of
                # one answer (its encode_pair renders a chosen and a rejected answer)
                messages = turns_to_messages(prompt)
                prompt_ids, (resp,), image_out = collator.adapter.encode_pair(
                    processor, collator.template, messages, collator.prompt_text(messages),
                    [answer], [image] if image is not None else [], collator.tokenizer)
                encoded.append((prompt_ids, resp))
            full = encoded[-1][0] + encoded[-1][1]
            if all(p + r == full[:len(p) + len(r)] for p, r in encoded):
                labels = [IGNORE_INDEX] * len(full)
                for p, r in encoded:
                    labels[len(p):len(p) + len(r)] = r
                rows = [(full, labels, len(encoded))]
            else:
                rows = [(p + r, [IGNORE_INDEX] * len(p) + r, 1) for p, r in encoded]
            if path is not None and path not in pixels:
                pixels[path] = (len(pixels), image_out["pixel_values"][0])
            for ids, labels, n in rows:
                self.rows.append(torch.tensor(ids, dtype=torch.long))
                self.labels.append(torch.tensor(labels, dtype=torch.long))
                self.answers.append(n)
                self.image_index.append(pixels[path][0] if path is not None else -1)
        if pixels and -1 in self.image_index:
            raise ValueError("data: records with and without an image in one data set; train "
                             "the text-only records in a call of their own")
        self.pixel_values = (torch.stack([p for _, p in sorted(pixels.values(),
                                                               key=lambda x: x[0])])
                             if pixels else None)

    def __len__(self):
        return len(self.rows)

    def epoch_batches(self, order, steps):
        """``order`` (row indices) cut into ``steps`` consecutive batches of about equally many
        answers (samples), so a step sees about ``samples / steps`` answers packed or not."""
        total = sum(self.answers[i] for i in order)
        out, cur, seen, k = [], [], 0, 1
        for i in order:
            cur.append(i)
            seen += self.answers[i]
            if seen >= k * total / steps - 1e-9:
                out.append(cur)
                cur = []
                while k < steps and seen >= k * total / steps - 1e-9:
                    k += 1
        if cur:
            out.append(cur)
        return out

    def batch(self, idx):
        t = max(len(self.rows[i]) for i in idx)
        ids = torch.full((len(idx), t), self.pad_id, dtype=torch.long)
        labels = torch.full((len(idx), t), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(idx), t), dtype=torch.long)
        for j, i in enumerate(idx):
            n = len(self.rows[i])
            ids[j, :n] = self.rows[i]
            labels[j, :n] = self.labels[i]
            mask[j, :n] = 1
        pix = (self.pixel_values[[self.image_index[i] for i in idx]]
               if self.pixel_values is not None else None)
        return ids, mask, labels, pix


def warmup_cosine(opt, total, warmup_ratio):
    """The demo loops' learning-rate schedule: linear warm-up over ``warmup_ratio`` of the
    ``total`` steps, times a cosine from 1 to 0 over all of them."""
    warmup = max(1, int(warmup_ratio * total))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))


def sft_train(model, processor, data, image_root, *, epochs=3, batch_size=32, lr=3e-3,
              warmup_ratio=0.05, weight_decay=0.0, seed=0, device="cpu", turns="all",
              max_steps=None, log=None, pack=True):
    """Train ``model`` in place on ``data`` (LLaVA-format JSON/JSONL path or record list;
    records with ``"image": null`` or no image are text-only, e.g. a text pretraining corpus --
    all of a data set's records or none).

    All parameters train (the tiny model is trained from scratch). The loss of a step is the
    mean NLL of the answer tokens of its ``batch_size`` samples (gpt turns, each with the
    earlier turns as its prompt); an epoch is ``ceil(samples / batch_size)`` steps. ``pack``
    (``turns="all"``): a record's samples are computed as one row, its whole conversation (the
    same loss, a record's turns in the same step; see :class:`_Encoded`). Returns the per-step
    losses. ``log(step, total, loss)`` is called after each step when given.
    """
    from bpo_fast.runtime import adapt_threads

    records = _load_records(data) if isinstance(data, str) else list(data)
    if not records:
        raise ValueError("data: no records")
    if batch_size < 1 or epochs < 1:
        raise ValueError("batch_size/epochs: expected positive integers")
    enc = _Encoded(processor, sft_samples(records, turns=turns), image_root,
                   pack=pack and turns == "all")
    steps_per_epoch = math.ceil(enc.samples / batch_size)
    total = steps_per_epoch * epochs if max_steps is None else min(max_steps, steps_per_epoch * epochs)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    # one fused kernel for all parameters (CPU and CUDA), not ~10 small ops per parameter
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    sched = warmup_cosine(opt, total, warmup_ratio)
    rng = random.Random(seed)
    pixels = (enc.pixel_values.to(device=device, dtype=model.dtype)
              if enc.pixel_values is not None else None)   # None: text-only records
    losses, step = [], 0
    while step < total:
        order = list(range(len(enc)))
        rng.shuffle(order)
        for idx in enc.epoch_batches(order, steps_per_epoch):
            if step >= total:
                break
            adapt_threads()
            ids, mask, labels, _ = enc.batch(idx)
            pix = pixels[[enc.image_index[i] for i in idx]] if pixels is not None else None
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                        pixel_values=pix, labels=labels.to(device))
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
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
    per image) for each PIL image, through the one generation path of bpo-fast
    (:class:`bpo_fast.data.vlm_generation.Answerer`, as ``bpo-fast generate``)."""
    from bpo_fast.data.generation import Sampling
    from bpo_fast.data.vlm_generation import Answerer
    from bpo_fast.runtime import adapt_threads

    prompts = [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
    if len(prompts) != len(images):
        raise ValueError(f"prompt: expected one question per image ({len(images)}), got "
                         f"{len(prompts)}")
    model.to(device).eval()
    answer = Answerer(model, processor, Sampling(max_new_tokens=max_new_tokens))
    items = [([{"from": "human", "value": "<image>\n" + p}], [im]) for p, im in zip(prompts, images)]
    answers = []
    for b in range(0, len(items), batch_size):
        adapt_threads()
        answers += answer(items[b:b + batch_size])[0]
    return answers
