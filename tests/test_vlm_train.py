"""`train` and `ref-logps` on the VLM families (tiny random models, mixed image sizes).

- `train` runs 2 steps, full fine-tune and LoRA, writes a checkpoint and a final model that
  ``from_pretrained`` loads (tied embeddings included);
- `ref-logps` writes exactly the HF forward's log-probs (Qwen2-VL: M-RoPE; PaliGemma 2: the
  logit soft-cap).
"""

import json
import os

import numpy as np
import pytest
import torch

from bpo_fast.models.tiny_vlm import FAMILIES, build_tiny_vlm
from bpo_fast.train import TrainConfig, train

TRAIN_FAMILIES = sorted(FAMILIES)  # every supported family, full and LoRA
SIZES = [(20, 12), (12, 28), (33, 17), (16, 16)]


def write_pairs(root, n=4):
    """Pair JSONL (our schema) with images of mixed sizes under ``root``."""
    from PIL import Image

    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    path = os.path.join(root, "pairs.jsonl")
    with open(path, "w") as f:
        for i in range(n):
            w, h = SIZES[i % len(SIZES)]
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
                os.path.join(root, "img", f"{i}.png"))
            f.write(json.dumps({
                "id": f"p{i}", "image": f"img/{i}.png",
                "prompt": [{"from": "human", "value": "<image>\nwhat is on the table ?"}],
                "chosen": "a red cup" + " and a book" * (i % 2), "rejected": "a blue ball .",
                "strategy": "image_weakened", "noise_step": 500, "injector": None}) + "\n")
    return path


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("vlm_pairs"))
    return write_pairs(root), root


_DIRS = {}


def _model_dir(family, tmp_path_factory, tie=False):
    key = (family, tie)
    if key not in _DIRS:
        path = str(tmp_path_factory.mktemp(f"{family}_model"))
        build_tiny_vlm(family, path, seed=2, tie_word_embeddings=tie)
        _DIRS[key] = path
    return _DIRS[key]


def _cfg(model, pairs, out, **kw):
    path, root = pairs
    base = dict(model=model, data=path, image_root=root, output=str(out), batch_size=2,
                device="cpu", max_length=256, learning_rate=1e-3, warmup_steps=0,
                progress=False, seed=0, max_steps=2, save_every=1)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("family", TRAIN_FAMILIES)
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_train_two_steps_and_final_model_loads(family, lora, pairs, tmp_path_factory, tmp_path):
    from transformers import AutoModelForImageTextToText

    # the LLaVA full fine-tune runs with tied embeddings (LM head = input embedding)
    tie = family == "llava" and not lora
    model = _model_dir(family, tmp_path_factory, tie)
    kw = dict(lora_r=4, reference="lora") if lora else {}
    res = train(_cfg(model, pairs, tmp_path, **kw))
    assert res["steps"] == 2
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows)
    assert os.path.isfile(tmp_path / "checkpoint-2" / "trainable.safetensors")
    if lora:
        from peft import PeftModel

        base = AutoModelForImageTextToText.from_pretrained(model)
        PeftModel.from_pretrained(base, str(tmp_path))
        return
    final = AutoModelForImageTextToText.from_pretrained(str(tmp_path))
    start = AutoModelForImageTextToText.from_pretrained(model)
    sd, sd0 = final.state_dict(), start.state_dict()
    assert sd.keys() == sd0.keys()
    assert any(not torch.equal(sd[k], sd0[k]) for k in sd)
    if tie:
        assert final.config.tie_word_embeddings
        assert final.get_output_embeddings().weight.data_ptr() == \
            final.get_input_embeddings().weight.data_ptr()


@pytest.mark.parametrize("family", ["qwen2_vl", "paligemma2"])
def test_ref_logps_equal_the_hf_forward(family, pairs, tmp_path_factory, tmp_path):
    """`ref-logps` writes exactly the HF forward's log-probs: Qwen2-VL (M-RoPE), PaliGemma 2
    (HF's capped logits: Gemma 2 final_logit_softcapping, applied inside the fused head; eager
    attention for its text model)."""
    from PIL import Image

    from bpo_fast.data.preference import PreferenceCollator
    from bpo_fast.models.preference import load_vlm
    from bpo_fast.models.vlm import load_processor
    from bpo_fast.train.ref_cache import RefLogpsCache, compute_reference_logps
    from test_vlm_families import hf_row_logps

    model_dir = _model_dir(family, tmp_path_factory)
    data, root = pairs
    out = str(tmp_path / "ref.safetensors")
    compute_reference_logps(model_dir, data, root, out, batch_size=3, device="cpu",
                            dtype=torch.float32, progress=False, max_length=256)
    cache = RefLogpsCache.load(out)
    model, proc = load_vlm(model_dir), load_processor(model_dir)
    collator = PreferenceCollator(proc)
    for rec in (json.loads(line) for line in open(data)):
        item = {"image": Image.open(os.path.join(root, rec["image"])).convert("RGB"),
                "prompt": rec["prompt"]}
        got = cache.lookup([rec["id"]])
        for key, value in (("chosen", got[0]), ("rejected", got[1])):
            want, _ = hf_row_logps(model, proc, collator, item, rec[key])
            torch.testing.assert_close(value[0], want, rtol=1e-5, atol=1e-6)


def test_train_cli_chat_template_option(pairs, tmp_path_factory, tmp_path, capsys):
    from bpo_fast.cli import main
    from bpo_fast.models.vlm import DEFAULT_CHAT_TEMPLATES

    model = _model_dir("qwen2_vl", tmp_path_factory)
    path, root = pairs
    tpl = tmp_path / "chat.jinja"
    tpl.write_text(DEFAULT_CHAT_TEMPLATES["qwen2_vl"]())
    base = ["train", "--model", model, "--data", path, "--image-root", root, "--device", "cpu",
            "--dtype", "fp32", "--max-steps", "1", "--batch-size", "2", "--lora-r", "2",
            "--no-progress", "--max-length", "256"]
    assert main(base + ["--output", str(tmp_path / "a"), "--chat-template", str(tpl)]) == 0
    rc = main(base + ["--output", str(tmp_path / "b"), "--chat-template", "no-such.jinja"])
    err = capsys.readouterr().err
    assert rc == 2 and "--chat-template" in err and "Traceback" not in err
