import numpy as np
import pytest
import torch
from PIL import Image

from bpo_fast.models.tiny import (IMAGE_TOKEN, TinyLlavaConfig, build_tiny_llava,
                                  build_word_tokenizer)


def test_word_tokenizer_roundtrip_and_unknown_words():
    tok = build_word_tokenizer(["a", "red", "circle", ".", ","])
    ids = tok("A red circle, a RED zebra.").input_ids
    unk = tok.unk_token_id
    assert ids.count(unk) == 1  # only "zebra" is unknown
    assert tok.decode(tok("a red circle.").input_ids) == "a red circle."
    assert tok.convert_tokens_to_ids(IMAGE_TOKEN) != unk
    with pytest.raises(TypeError, match="words"):
        build_word_tokenizer("a red circle")


def test_tiny_llava_saves_loads_and_runs(tiny_llava_dir):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir)
    proc = AutoProcessor.from_pretrained(tiny_llava_dir)
    cfg = TinyLlavaConfig()
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image"}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True)
    assert text.startswith("USER: <image>\n") and text.endswith("ASSISTANT:")
    enc = proc(images=[img], text=[text], return_tensors="pt")
    assert enc.pixel_values.shape == (1, 3, cfg.image_size, cfg.image_size)
    n_img = int((enc.input_ids == model.config.image_token_id).sum())
    assert n_img == cfg.num_image_tokens
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (1, enc.input_ids.shape[1], len(proc.tokenizer))
    assert torch.isfinite(logits).all()


def test_same_seed_same_weights():
    m1, _ = build_tiny_llava(seed=3)
    m2, _ = build_tiny_llava(seed=3)
    m3, _ = build_tiny_llava(seed=4)
    p1, p2, p3 = (next(m.parameters()) for m in (m1, m2, m3))
    assert torch.equal(p1, p2) and not torch.equal(p1, p3)


def test_bad_geometry_is_rejected():
    with pytest.raises(ValueError, match="patch_size"):
        build_tiny_llava(config=TinyLlavaConfig(image_size=30, patch_size=8))
