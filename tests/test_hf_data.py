"""HF datasets inputs (our schema, TRL standard/conversational formats), several images per pair,
text-only pairs, streaming (issue 16)."""

import json
import os

import pytest
import torch

datasets = pytest.importorskip("datasets")

from bpo_fast.data.hf_pairs import HFPreferenceDataset, normalize_record, open_pairs  # noqa: E402
from bpo_fast.train import TrainConfig, train  # noqa: E402
from bpo_fast.train.synthetic import make_pairs  # noqa: E402

Q = "what color is the square?"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("hf_pairs"))
    recs = [json.loads(line) for line in open(make_pairs(root, n=8, seed=5))]
    # our schema as Parquet (provenance fields optional here)
    ours = os.path.join(root, "ours.parquet")
    datasets.Dataset.from_list([{k: r[k] for k in ("id", "image", "prompt", "chosen", "rejected")}
                                for r in recs]).to_parquet(ours)
    # TRL conversational JSONL: one image per pair, one pair with two images, one text-only
    conv = []
    for i, r in enumerate(recs):
        images = [r["image"]] if i not in (1, 2) else ([r["image"], recs[0]["image"]] if i == 1
                                                       else [])
        parts = [{"type": "image"} for _ in images] + [{"type": "text", "text": Q}]
        conv.append({"prompt": [{"role": "user", "content": parts}],
                     "chosen": [{"role": "assistant", "content": [{"type": "text",
                                                                   "text": r["chosen"]}]}],
                     "rejected": [{"role": "assistant", "content": [{"type": "text",
                                                                     "text": r["rejected"]}]}],
                     "images": images})
    conv_path = os.path.join(root, "conv.jsonl")
    with open(conv_path, "w") as f:
        f.writelines(json.dumps(x) + "\n" for x in conv)
    # TRL standard with the images inside the Parquet file (datasets.Image feature)
    from PIL import Image

    std = os.path.join(root, "std.parquet")
    feats = datasets.Features({"prompt": datasets.Value("string"),
                               "chosen": datasets.Value("string"),
                               "rejected": datasets.Value("string"),
                               "images": datasets.Sequence(datasets.Image())})
    datasets.Dataset.from_dict({
        "prompt": [Q] * 8, "chosen": [r["chosen"] for r in recs],
        "rejected": [r["rejected"] for r in recs],
        "images": [[Image.open(os.path.join(root, r["image"])).convert("RGB")] for r in recs],
    }, features=feats).to_parquet(std)
    return root, ours, conv_path, std


def test_formats_normalise_to_one_record():
    conv = {"prompt": [{"role": "system", "content": "be brief"},
                       {"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                         "text": "q"}]}],
            "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "b"}]}],
            "images": ["x.png"]}
    r = normalize_record(conv, "f:0")
    assert r["id"] == "f:0" and r["chosen"] == "a" and r["rejected"] == "b"
    assert r["prompt"] == [{"from": "system", "value": "be brief"},
                           {"from": "human", "value": "<image>\nq"}]
    std = normalize_record({"prompt": "q", "chosen": "a", "rejected": "b",
                            "images": ["x.png", "y.png"]}, "f:1")
    assert std["prompt"] == [{"from": "human", "value": "<image>\n<image>\nq"}]
    assert normalize_record({"prompt": "q", "chosen": "a", "rejected": "b"}, "f:2")["images"] == []
    with pytest.raises(ValueError, match="implicit-prompt"):
        normalize_record({"prompt": [{"role": "user", "content": "q"}],
                          "chosen": [{"role": "user", "content": "q"},
                                     {"role": "assistant", "content": "a"}],
                          "rejected": [{"role": "assistant", "content": "b"}]}, "x")
    with pytest.raises(ValueError, match="2 image placeholder"):
        normalize_record({"prompt": "<image><image> q", "chosen": "a", "rejected": "b",
                          "images": ["x.png"]}, "x")


def test_readers_give_the_same_batches(tiny_llava_dir, files):
    """Our JSONL, our schema as Parquet and TRL standard with embedded images collate to the
    same tensors."""
    from bpo_fast.data.preference import PreferenceCollator
    from bpo_fast.models.vlm import load_processor

    root, ours, conv, std = files
    col = PreferenceCollator(load_processor(tiny_llava_dir), max_length=64)
    a = open_pairs(os.path.join(root, "pairs.jsonl"), root)
    b = open_pairs(ours, root)
    c = open_pairs(std, root)
    assert isinstance(b, HFPreferenceDataset) and isinstance(c, HFPreferenceDataset)
    assert type(a).__name__ == "PreferenceDataset" and len(a) == len(b) == len(c) == 8
    # embedded images stay undecoded bytes in the table until a pair is read
    assert set(c.table[0]["images"][0]) == {"bytes", "path"}
    ba, bb, bc = (col([d[i] for i in range(3)]) for d in (a, b, c))
    for k in ("input_ids", "labels", "attention_mask", "pixel_values"):
        assert torch.equal(ba[k], bb[k]), k
        assert torch.equal(ba[k], bc[k]), k


def _cfg(tiny, data, root, out, **kw):
    base = dict(model=tiny, data=data, image_root=root, output=str(out), batch_size=4,
                device="cpu", max_length=64, learning_rate=1e-3, warmup_steps=0, progress=False,
                seed=0, max_steps=2)
    base.update(kw)
    return TrainConfig(**base)


def test_conversational_multi_image_and_text_only_train(tiny_llava_dir, files, tmp_path,
                                                        monkeypatch):
    """TRL conversational data with a two-image pair and a text-only pair trains through the
    fused path; each image is encoded once per pair (policy; the reference reuses it)."""
    from bpo_fast.cli import main
    from bpo_fast.models import vlm

    root, ours, conv, std = files
    calls = []
    real = vlm.VLMAdapter.encode

    def spy(self, model, images):
        calls.append(int(images["pixel_values"].shape[0]))
        return real(self, model, images)

    monkeypatch.setattr(vlm.VLMAdapter, "encode", spy)
    # batch 1 = pairs {0, 1 (two images), 2 (text only), 3} in file order (no shuffle)
    ds = open_pairs(conv, root)
    assert [len(ds[i]["images"]) for i in range(4)] == [1, 2, 0, 1]
    rc = main(["train", "--model", tiny_llava_dir, "--data", conv, "--image-root", root,
               "--output", str(tmp_path / "conv"), "--batch-size", "4", "--max-steps", "2",
               "--max-length", "64", "--lr", "1e-3", "--warmup-steps", "0", "--no-progress",
               "--device", "cpu"])
    assert rc == 0
    # one encoder call per micro-batch holding each of its pairs' images once (the reference
    # shares the frozen image path): the 2 steps cover the 8 pairs, 6 x 1 + 2 + 0 images
    assert len(calls) == 2 and sum(calls) == 8
    # the one-image LLaVA case: 4 images per batch of 4 pairs, one call per micro-batch
    calls.clear()
    train(_cfg(tiny_llava_dir, ours, root, tmp_path / "one"))
    assert calls == [4, 4]
    rows = [json.loads(line) for line in open(tmp_path / "conv" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    assert abs(rows[0]["loss"] - 0.6931) < 1e-3 and all(r["loss"] == r["loss"] for r in rows)


def test_text_only_batch_and_image_count(tiny_llava_dir, files):
    """A batch of text-only pairs has no pixel_values and still gives finite DPO losses; a
    two-image pair sends two images to the encoder, once."""
    from bpo_fast.data.preference import PreferenceCollator
    from bpo_fast.models.preference import PreferenceModel
    from bpo_fast.models.vlm import load_processor

    root, ours, conv, std = files
    ds = open_pairs(conv, root)
    col = PreferenceCollator(load_processor(tiny_llava_dir), max_length=64)
    pm = PreferenceModel.from_pretrained(tiny_llava_dir)
    text = col([ds[2], ds[2]])
    assert "pixel_values" not in text
    out = pm(**{k: v for k, v in text.items() if isinstance(v, torch.Tensor) and k != "index"})
    assert torch.isfinite(out.loss) and abs(float(out.loss.detach()) - 0.6931) < 1e-4
    two = col([ds[1]])
    assert two["pixel_values"].shape[0] == 2
    out = pm(**{k: v for k, v in two.items() if isinstance(v, torch.Tensor) and k != "index"})
    assert torch.isfinite(out.loss)


def test_parquet_our_schema_trains_like_jsonl_and_streams(tiny_llava_dir, files, tmp_path):
    root, ours, conv, std = files
    a = train(_cfg(tiny_llava_dir, os.path.join(root, "pairs.jsonl"), root, tmp_path / "a"))
    b = train(_cfg(tiny_llava_dir, ours, root, tmp_path / "b"))
    for x, y in zip(a["history"], b["history"]):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6)
    # streaming: reads lazily, more steps than one pass (8 pairs = 2 batches of 4) is the next
    # epoch
    s = train(_cfg(tiny_llava_dir, ours, root, tmp_path / "s", streaming=True, max_steps=3))
    assert s["steps"] == 3 and [r["epoch"] for r in s["history"]] == [0, 0, 1]
    # resumed from checkpoint-2 (the end of the first pass): the same third step
    import shutil

    full = train(_cfg(tiny_llava_dir, ours, root, tmp_path / "sf", streaming=True, max_steps=3,
                      save_every=1))
    part = tmp_path / "sp"
    os.makedirs(part)
    shutil.copytree(tmp_path / "sf" / "checkpoint-2", part / "checkpoint-2")
    res = train(_cfg(tiny_llava_dir, ours, root, part, streaming=True, max_steps=3,
                     save_every=1, resume=True))
    assert res["history"][-1]["step"] == 3
    assert res["history"][-1]["loss"] == pytest.approx(full["history"][-1]["loss"], abs=1e-6)
    with pytest.raises(ValueError, match="max_steps"):
        _cfg(tiny_llava_dir, ours, root, tmp_path / "x", streaming=True, max_steps=None)


def test_ref_logps_reads_hf_data(tiny_llava_dir, files, tmp_path):
    from bpo_fast.train.ref_cache import RefLogpsCache, compute_reference_logps

    root, ours, conv, std = files
    out = str(tmp_path / "ref.safetensors")
    compute_reference_logps(tiny_llava_dir, conv, root, out, batch_size=4, max_length=64,
                            device="cpu", progress=False)
    cache = RefLogpsCache.load(out)
    assert len(cache) == 8 and "conv:1" in cache and "conv:2" in cache
