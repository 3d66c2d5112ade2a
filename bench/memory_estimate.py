"""GPU memory of a BPO run on a real model, computed (not measured) from parameter counts.

    python bench/memory_estimate.py            # LLaVA-1.5-7B, the README's table

The model is built on the ``meta`` device from its published configuration (LLaVA-1.5-7B:
Vicuna-7B = Llama-2-7B shapes, CLIP ViT-L/14 at 336 px, a 2-layer MLP projector), so every
parameter is counted and nothing is downloaded or allocated. What each part costs is what
``bpo-fast train`` keeps (bpo_fast/train/trainer.py, models/preference.py):

- weights: frozen ones in the compute dtype (bf16, 2 B); trained ones as fp32 masters (4 B),
  their gradients (4 B) and AdamW's two moments (8 B); the image path (vision tower, projector)
  frozen, as the trainer's default;
- the reference: ``--reference lora`` (LoRA's default) is the policy with its adapters off, no
  second copy; full fine-tuning keeps a frozen bf16 copy (``--reference model``); under FSDP2
  (torchrun) every rank holds 1/N of all of it (the sharded policy is fp32 throughout);
- activations of the policy's forward, kept for backward (the reference runs without grad):
  per token and decoder layer, bf16, with SDPA / flash attention (no T x T matrix): the layer
  input (2h), attention norm output (2h), q, k, v (6h), attention output (2h), MLP norm output
  (2h), gate and up outputs and the activation (6i) and the product feeding down_proj (2i):
  16h + 8i bytes; with LoRA and ``--lora-dropout`` > 0 (train's default 0.05) peft keeps each
  adapted projection's input once more, as the fp32 tensor its dropout works on: 4 x (6h + i)
  more (q, k, v, o, gate, up read h-wide inputs, down an i-wide one), which nearly doubles a
  LoRA layer; ``--gradient-checkpointing`` keeps only the layer inputs (2h) plus one layer's
  worth during its recomputation. tests/test_next_steps.py counts the bytes autograd saves in
  one decoder layer (bf16 autocast, on CPU) and holds this rule to them;
- the LM head: our fused log-prob op never builds logits; a plain forward would hold
  ``[rows, T, V]`` logits (bf16) and their fp32 log-softmax (shown for comparison).

Tokens per step: ``--batch-size`` pairs x 2 rows ([chosen; rejected]) x ``--max-length``
(LLaVA-1.5: 576 image tokens + the prompt and answer). CUDA context, allocator slack and
fragmentation (typically 1-3 GB) are not included.
"""

import argparse

GB = 1e9


def llava15_7b():
    """LLaVA-1.5-7B on the meta device (the published config's shapes)."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       max_position_embeddings=4096)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=336, patch_size=14,
                              projection_dim=768)
    cfg = LlavaConfig(text_config=text, vision_config=vision, image_token_index=32000,
                      projector_hidden_act="gelu", vision_feature_layer=-2,
                      vision_feature_select_strategy="default")
    with torch.device("meta"):
        return LlavaForConditionalGeneration(cfg), text


def counts(model, lora_r):
    """Parameter counts: all, image path, language model, LoRA adapters of rank ``lora_r`` on
    the language model's q/k/v/o/gate/up/down projections (the trainer's default targets)."""
    import torch

    total = sum(p.numel() for p in model.parameters())
    image = sum(p.numel() for n, p in model.named_parameters()
                if "vision_tower" in n or "multi_modal_projector" in n)
    lora = 0
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and "language_model" in n and n.endswith(targets):
            lora += lora_r * (m.in_features + m.out_features)
    return {"total": total, "image": image, "llm": total - image, "lora": lora}


def train_lora_dropout():
    """``train``'s default ``--lora-dropout`` (declared once, in TrainConfig)."""
    import dataclasses

    from bpo_fast.train.config import TrainConfig

    return next(f.default for f in dataclasses.fields(TrainConfig) if f.name == "lora_dropout")


def layer_activation_bytes(h, i, *, mode, lora_dropout=None):
    """Bytes per token one decoder layer keeps for backward (see the module docstring);
    ``lora_dropout``: None for train's default."""
    per_layer = 16 * h + 8 * i
    if lora_dropout is None:
        lora_dropout = train_lora_dropout()
    if mode == "lora" and lora_dropout > 0:
        per_layer += 4 * (6 * h + i)
    return per_layer


def estimate(c, text, *, mode, gpus=1, batch=4, max_length=1024, checkpointing=True):
    """Bytes per GPU by part (see the module docstring)."""
    h, i, layers, v = (text.hidden_size, text.intermediate_size, text.num_hidden_layers,
                       text.vocab_size)
    tokens = batch * 2 * max_length
    per_layer = layer_activation_bytes(h, i, mode=mode)
    act = tokens * (layers * 2 * h + per_layer) if checkpointing else tokens * layers * per_layer
    if mode == "lora":
        weights = 2 * c["total"] + 4 * c["lora"]
        train = 12 * c["lora"]                      # fp32 grads + two AdamW moments
        ref = 0
    else:
        fsdp = gpus > 1                             # the sharded policy is fp32 throughout
        weights = (4 * c["total"] if fsdp else 2 * c["image"] + 4 * c["llm"]) / gpus
        train = 12 * c["llm"] / gpus
        ref = 2 * c["total"] / gpus
    return {"weights": weights, "grads+adam": train, "reference": ref, "activations": act,
            "logits avoided": tokens * v * (2 + 4)}


def table(model_name="LLaVA-1.5-7B", batch=4, max_length=1024, lora_r=64):
    model, text = llava15_7b()
    c = counts(model, lora_r)
    rows = [("LoRA r %d, 1 GPU" % lora_r, "lora", 1, True),
            ("LoRA r %d, 1 GPU, no checkpointing" % lora_r, "lora", 1, False),
            ("full, 1 GPU", "full", 1, True),
            ("full, FSDP2 over 8 GPUs", "full", 8, True)]
    out = [f"{model_name}: {c['total'] / 1e9:.2f} B parameters ({c['image'] / 1e9:.2f} B vision "
           f"tower + projector, frozen; {c['llm'] / 1e9:.2f} B language model; LoRA r {lora_r} on "
           f"its q/k/v/o/gate/up/down: {c['lora'] / 1e6:.0f} M). Per GPU, {batch} pairs x "
           f"{max_length} tokens per step, bf16, computed by bench/memory_estimate.py:", "",
           "| run | weights | grads + AdamW | reference | activations | total | logits a plain "
           "forward would add |", "|---|---|---|---|---|---|---|"]
    for name, mode, gpus, ckpt in rows:
        e = estimate(c, text, mode=mode, gpus=gpus, batch=batch, max_length=max_length,
                     checkpointing=ckpt)
        total = sum(v for k, v in e.items() if k != "logits avoided")
        out.append(f"| {name}{'' if not ckpt else ', --gradient-checkpointing'} | "
                   f"{e['weights'] / GB:.1f} GB | {e['grads+adam'] / GB:.1f} GB | "
                   f"{e['reference'] / GB:.1f} GB | {e['activations'] / GB:.1f} GB | "
                   f"**{total / GB:.0f} GB** | {e['logits avoided'] / GB:.1f} GB |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--lora-r", type=int, default=64)
    a = p.parse_args(argv)
    print(table(batch=a.batch_size, max_length=a.max_length, lora_r=a.lora_r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
