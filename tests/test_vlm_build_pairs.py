"""`build-pairs` on the VLM families: the noised-image generations use the family's own prompt
format and image layout (its processor per row, noise on its normalised pixels)."""

import json

import pytest
import torch

from bpo_fast.data.pairs import PairBuilderConfig, build_pairs
from bpo_fast.models.tiny_vlm import build_tiny_vlm, model_type

BUILD_FAMILIES = ["qwen2_vl", "idefics3", "gemma3", "llava_next", "paligemma", "paligemma2"]


@pytest.mark.parametrize("family", BUILD_FAMILIES)
def test_build_pairs_image_weakened_with_the_family_prompt(family, tmp_path, monkeypatch):
    from test_pairs import make_data

    from bpo_fast.data import vlm_generation

    data, root = make_data(tmp_path, n=3, turns=1)
    model_dir = str(tmp_path / "model")
    build_tiny_vlm(family, model_dir, seed=3)
    seen = []
    orig = vlm_generation.ProcessorRows.__call__

    def spy(self, rows, device, dtype):
        seen.extend(rows)
        batch = orig(self, rows, device, dtype)
        seen.append(batch)
        return batch

    monkeypatch.setattr(vlm_generation.ProcessorRows, "__call__", spy)
    out = tmp_path / "pairs.jsonl"
    s = build_pairs(PairBuilderConfig(
        model=model_dir, data=data, image_root=root, out=str(out), batch_size=2,
        strategies=("image_weakened",), noise_steps=(None, 500), max_new_tokens=3,
        min_new_tokens=3, num_workers=0, progress=False, device="cpu", dtype="fp32"))
    recs = [json.loads(line) for line in open(out)]
    assert s.written.get("image_weakened", 0) == len(recs)
    assert len(recs) + sum(s.dropped.values()) == 6
    assert {r["noise_step"] for r in recs} <= {None, 500}
    rows = [r for r in seen if isinstance(r, tuple)]
    batches = [b for b in seen if isinstance(b, dict)]
    # the prompt is the family's chat format, the image placeholder its own
    from bpo_fast.models.vlm import load_processor, resolve_chat_template

    proc = load_processor(model_dir)
    template = resolve_chat_template(proc, model_type(family))
    if template is None:  # PaliGemma: the processor builds the prompt from image token + text
        want = proc.image_token + "what color is the circle ?"
    else:
        want = proc.apply_chat_template([{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": "what color is the circle ?"}]}],
            tokenize=False, add_generation_prompt=True, chat_template=template)
    assert rows[0][0] == want
    # each generated row is exactly the processor's expansion of that prompt and image
    # (left-padded), and its pixels the processor's (clean) or x_t of them (noised)
    b0, first = batches[0], rows[0]
    enc = proc(images=[first[1]], text=[first[0]], return_tensors="pt")
    n = int(b0["attention_mask"][0].sum())
    assert b0["input_ids"][0, -n:].tolist() == enc["input_ids"][0].tolist()
    assn = vlm_generation.ProcessorRows(proc, model_type(family), _sched())
    pv = enc["pixel_values"]
    assert assn.noised(pv, None, 0) is pv
    x = assn.noised(pv, 500, 7)
    assert x.shape == pv.shape and not torch.allclose(x, pv)
    assert torch.equal(x, assn.noised(pv, 500, 7))          # seeded per row


def _sched():
    from bpo_fast.ops.noise import NoiseSchedule

    return NoiseSchedule("sigmoid", num_steps=1000)
