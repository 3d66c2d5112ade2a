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


def write_pairs(root, n=4, text_only=(), name="pairs.jsonl"):
    """Pair JSONL (our schema) with images of mixed sizes under ``root``; the pairs whose index
    is in ``text_only`` have no image (``"image": null``, no ``<image>`` in the prompt)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    path = os.path.join(root, name)
    with open(path, "w") as f:
        for i in range(n):
            w, h = SIZES[i % len(SIZES)]
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
                os.path.join(root, "img", f"{i}.png"))
            text = i in text_only
            f.write(json.dumps({
                "id": f"p{i}", "image": None if text else f"img/{i}.png",
                "prompt": [{"from": "human", "value": ("" if text else "<image>\n")
                            + "what is on the table ?"}],
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


def _assert_ref_logps_equal_hf(model_dir, data, root, out, batch_size):
    """``ref-logps`` on ``data`` equals, per pair, the HF forward of the processor's inputs of
    each sample (its images as one list, as ``apply_chat_template`` passes them; none for a
    text-only pair) gathered on the answer tokens."""
    from bpo_fast.data.hf_pairs import open_pairs
    from bpo_fast.data.preference import PreferenceCollator
    from bpo_fast.data.schema import turns_to_messages
    from bpo_fast.models.preference import load_vlm
    from bpo_fast.models.vlm import load_processor
    from bpo_fast.train.ref_cache import RefLogpsCache, compute_reference_logps
    from test_vlm_families import hf_row_logps

    compute_reference_logps(model_dir, data, root, out, batch_size=batch_size, device="cpu",
                            dtype=torch.float32, progress=False, max_length=256)
    cache = RefLogpsCache.load(out)
    model, proc = load_vlm(model_dir), load_processor(model_dir)
    template = PreferenceCollator(proc).template
    ds = open_pairs(data, root)
    for item in (ds[i] for i in range(len(ds))):
        images = [item["images"]] if item["images"] else None
        msgs = turns_to_messages(item["prompt"])
        prompt = proc(images=images, text=[proc.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=True, chat_template=template)],
            return_tensors="pt")["input_ids"].shape[1]
        got = cache.lookup([item["id"]])
        for key, value in (("chosen", got[0]), ("rejected", got[1])):
            full = proc.apply_chat_template(
                msgs + [{"role": "assistant", "content": [{"type": "text", "text": item[key]}]}],
                tokenize=False, chat_template=template)
            enc = proc(images=images, text=[full], return_tensors="pt")
            with torch.no_grad():
                logits = model(**enc).logits[0, :-1].float()
            ids = enc["input_ids"][0]
            lp = torch.log_softmax(logits, -1).gather(-1, ids[1:, None])[:, 0]
            torch.testing.assert_close(value[0], lp[prompt - 1:].sum(), rtol=1e-5, atol=1e-6)
    return ds


def test_ref_logps_equal_the_hf_forward_qwen2_vl(pairs, tmp_path_factory, tmp_path):
    data, root = pairs
    _assert_ref_logps_equal_hf(_model_dir("qwen2_vl", tmp_path_factory), data, root,
                               str(tmp_path / "ref.safetensors"), batch_size=3)


QWEN = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
TEXT_ONLY = (0, 1, 3)  # of 5 pairs: batches of 2 = [text, text], [image, text], [image]


@pytest.fixture(scope="module")
def mixed_pairs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("vlm_mixed_pairs"))
    return write_pairs(root, n=5, text_only=TEXT_ONLY), root


@pytest.mark.parametrize("family", QWEN)
def test_text_only_pairs_ref_logps_and_train_qwen(family, mixed_pairs, tmp_path_factory,
                                                  tmp_path):
    """Text-only pairs on the M-RoPE families: ``ref-logps`` over an all-text batch, a mixed one
    and an image-only one equals the HF forward; ``train`` (LoRA) runs 2 steps on them."""
    data, root = mixed_pairs
    model = _model_dir(family, tmp_path_factory)
    _assert_ref_logps_equal_hf(model, data, root, str(tmp_path / "ref.safetensors"),
                               batch_size=2)
    res = train(_cfg(model, mixed_pairs, tmp_path / "out", lora_r=4, reference="lora"))
    assert res["steps"] == 2
    rows = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows)


def test_multi_image_pairs_ref_logps_and_train_llava_onevision(pairs, tmp_path_factory,
                                                              tmp_path):
    """TRL conversational records (``images`` lists): a 2-image pair (two sizes) between
    1-image pairs and a text-only pair. LLaVA-OneVision runs the 2-image sample without anyres
    (``batch_num_images``); ``ref-logps`` equals the HF forward, ``train`` runs."""
    _, root = pairs
    data = str(tmp_path / "trl.jsonl")
    q = [{"type": "text", "text": "what is on the table ?"}]
    recs = [(["img/0.png"], "a red cup"), (["img/1.png", "img/2.png"], "two cups"),
            ([], "a book"), (["img/3.png"], "a red cup and a book")]
    with open(data, "w") as f:
        for i, (images, chosen) in enumerate(recs):
            f.write(json.dumps({
                "id": f"m{i}", "images": images,
                "prompt": [{"role": "user", "content": [{"type": "image"} for _ in images] + q}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": "a blue ball ."}]}) + "\n")
    model = _model_dir("llava_onevision", tmp_path_factory)
    ds = _assert_ref_logps_equal_hf(model, data, root, str(tmp_path / "ref.safetensors"),
                                    batch_size=4)
    assert [len(ds[i]["images"]) for i in range(len(ds))] == [1, 2, 0, 1]
    res = train(_cfg(model, (data, root), tmp_path / "out", lora_r=4, reference="lora",
                     batch_size=4, max_steps=1))
    assert res["steps"] == 1


def test_one_image_family_rejects_text_only_pairs_up_front(mixed_pairs, tmp_path_factory,
                                                          tmp_path, capsys):
    """PaliGemma (one image per prompt): ``ref-logps`` and ``train`` stop before any batch runs,
    naming the first text-only pair; exit 2, one line."""
    from bpo_fast.cli import main

    data, root = mixed_pairs
    model = _model_dir("paligemma", tmp_path_factory)
    out = tmp_path / "r.safetensors"
    rc = main(["ref-logps", "--model", model, "--data", data, "--image-root", root, "--out",
               str(out), "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "pair 'p0' (line 1): a text-only pair" in err and "paligemma" in err
    assert "Traceback" not in err and not out.exists()
    rc = main(["train", "--model", model, "--data", data, "--image-root", root, "--device", "cpu",
               "--output", str(tmp_path / "t"), "--max-steps", "1", "--batch-size", "2",
               "--lora-r", "2", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "a text-only pair" in err and "Traceback" not in err


def test_ref_logps_equal_the_hf_forward_paligemma2(pairs, tmp_path_factory, tmp_path):
    """`ref-logps` writes exactly the HF forward's log-probs on PaliGemma 2 (HF's capped logits:
    Gemma 2 final_logit_softcapping, applied inside the fused head; eager attention for its text
    model; the processor builds the prompt, so the family's own row builder is the reference)."""
    from PIL import Image

    from bpo_fast.data.preference import PreferenceCollator
    from bpo_fast.data.schema import turns_to_messages
    from bpo_fast.models.preference import load_vlm
    from bpo_fast.models.vlm import load_processor
    from bpo_fast.train.ref_cache import RefLogpsCache, compute_reference_logps
    from test_vlm_families import hf_row_logps

    model_dir = _model_dir("paligemma2", tmp_path_factory)
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
