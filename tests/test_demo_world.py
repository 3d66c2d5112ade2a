"""The demo world's imbalance (text corpus, alignment, validation, held-out splits) and its
pretraining stages (text-only language model, vision tower)."""

import json
import os

import pytest
import torch

from bpo_fast.demo import world as W
from bpo_fast.demo.world import WorldConfig, make_world


def _scene_prior(scenes, cfg):
    return W.prior_statistics(scenes, cfg)


def test_splits_carry_the_imbalance(tmp_path):
    cfg = WorldConfig(text_prior_strength=0.95, prior_strength=0.7, eval_prior_strength=0.5,
                      anchor_rate=0.6)
    stats = {split: W.prior_statistics(W.generate_scenes(3000, 0, cfg, split), cfg)
             for split in ("text", "train", "val", "eval")}
    for split, want in (("text", 0.95), ("train", 0.7), ("val", 0.5), ("eval", 0.5)):
        for pair in stats[split].values():
            assert abs(pair["p_partner_given_anchor"] - want) < 0.05, (split, pair)
    # the validation and held-out images are different draws
    v = W.generate_scenes(5, 0, cfg, "val")
    e = W.generate_scenes(5, 0, cfg, "eval")
    assert [W.scene_objects(s) for s in v] != [W.scene_objects(s) for s in e]


def test_world_writes_text_corpus_and_validation_split(tmp_path):
    cfg = WorldConfig(qa_per_image=2)
    paths = make_world(str(tmp_path / "w"), 6, 4, seed=1, config=cfg, n_text=20, n_val=3)
    text = json.load(open(paths.text))
    assert len(text) == 20
    for rec in text:                    # text only: no image, no image token
        assert "image" not in rec
        assert not any("<image>" in t["value"] for t in rec["conversations"])
        assert len(rec["conversations"]) == 2 * (1 + cfg.qa_per_image)
    images = set(os.listdir(paths.images))
    assert not any(n.startswith("text_") for n in images)
    val = json.load(open(paths.val))
    assert [r["id"] for r in val] == ["val_000000", "val_000001", "val_000002"]
    assert all(r["image"] in images for r in val)
    assert paths.split("val") == (paths.val, paths.val_truth)
    assert paths.split("eval") == (paths.eval, paths.eval_truth)
    with pytest.raises(ValueError, match="split"):
        paths.split("train")
    truth = [json.loads(line) for line in open(paths.val_truth)]
    refs = {r["id"]: r["conversations"][1]["value"] for r in val}
    res = W.score_captions(refs, paths, split="val")
    assert res.n_captions == 3 and res.chair_i == 0.0 and res.recall == 1.0
    assert len(truth) == 3
    meta = json.load(open(paths.meta))
    assert meta["n_text"] == 20 and meta["n_val"] == 3 and "text_prior" in meta
    # the same arguments reuse the world; another corpus size rewrites it
    mtime = os.path.getmtime(paths.meta)
    make_world(str(tmp_path / "w"), 6, 4, seed=1, config=cfg, n_text=20, n_val=3)
    assert os.path.getmtime(paths.meta) == mtime
    make_world(str(tmp_path / "w"), 6, 4, seed=1, config=cfg, n_text=10, n_val=3)
    assert len(json.load(open(paths.text))) == 10


def test_training_conversations_open_with_a_question_or_a_description():
    cfg = WorldConfig(qa_per_image=2)
    recs = W._records(W.generate_scenes(200, 0, cfg, "train"), cfg, "train", 0)
    first = [r["conversations"][0]["value"].split("\n", 1)[1] for r in recs]
    n_describe = sum(q in W.DESCRIBE_PROMPTS for q in first)
    assert 60 < n_describe < 140          # about half open with a question (as POPE asks)
    # existence questions are answered yes about as often as no
    answers = [t["value"] for r in recs for t in r["conversations"][1::2]]
    yes = sum(a.startswith("yes") for a in answers)
    no = sum(a.startswith("no,") for a in answers)
    assert yes > 0 and no > 0 and 0.5 < yes / no < 2.0


def test_centred_shapes_and_patch_labels():
    cfg = WorldConfig(jitter=False, shape_scale=(0.7, 0.7))
    sc = W.generate_scenes(1, 0, cfg, "eval")[0]
    for sh in sc.shapes:
        x0, y0, x1, y1 = sh.bbox
        cx0, cy0, cx1, cy1 = W._cell_box(cfg, sh.cell)
        assert abs((x0 + x1) - (cx0 + cx1)) <= 1 and abs((y0 + y1) - (cy0 + cy1)) <= 1
    labels = W.patch_labels(sc, 32, cfg)          # 2x2 grid, 64 px: one patch a cell
    assert len(labels) == 4
    by_cell = {sh.cell: sh for sh in sc.shapes}
    for cell, (colour, kind) in enumerate(labels):
        if cell in by_cell:
            assert cfg.colours[colour - 1] == by_cell[cell].colour
            assert cfg.kinds[kind - 1] == by_cell[cell].kind
        else:
            assert (colour, kind) == (0, 0)
    assert len(W.patch_labels(sc, 16, cfg)) == 16
    with pytest.raises(ValueError, match="text_prior_strength"):
        WorldConfig(text_prior_strength=1.5)


@pytest.fixture(scope="module")
def tiny():
    from bpo_fast.demo.pipeline import DemoConfig, _tiny_config
    from bpo_fast.models.tiny import build_tiny_llava

    cfg = DemoConfig(hidden_size=32)
    model, processor = build_tiny_llava(None, _tiny_config(cfg), seed=0)
    return cfg, model, processor


def test_text_pretraining_trains_the_language_model_only(tiny):
    from bpo_fast.demo.sft import sft_train

    cfg, model, processor = tiny
    recs = W._records(W.generate_scenes(64, 0, cfg.world, "text"), cfg.world, "text", 0)
    vision = {k: v.clone() for k, v in model.model.vision_tower.state_dict().items()}
    lm = {k: v.clone() for k, v in model.model.language_model.state_dict().items()}
    losses = sft_train(model, processor, recs, None, epochs=2, batch_size=16, lr=5e-3)
    assert losses[-1] < losses[0]
    for k, v in model.model.vision_tower.state_dict().items():
        assert torch.equal(v, vision[k]), k
    assert any(not torch.equal(v, lm[k]) for k, v in model.model.language_model.state_dict().items())


def test_pretrain_vision_learns_patch_labels(tiny):
    from bpo_fast.demo.pretrain import pretrain_vision

    cfg, model, processor = tiny
    wc = WorldConfig(jitter=False, shape_scale=(0.7, 0.7))
    scenes = W.generate_scenes(128, 0, wc, "vision")
    pix = processor.image_processor([W.render(s, wc) for s in scenes],
                                    return_tensors="pt")["pixel_values"]
    labels = torch.tensor([W.patch_labels(s, cfg.patch_size, wc) for s in scenes])
    losses = pretrain_vision(model, pix, labels, epochs=6, batch_size=32, lr=3e-3)
    assert len(losses) == 24 and losses[-1] < 0.5 * losses[0]
    with pytest.raises(ValueError, match="patches"):
        pretrain_vision(model, pix, labels[:, :2], epochs=1)
    with pytest.raises(ValueError, match="pixel_values/labels"):
        pretrain_vision(model, pix[:3], labels, epochs=1)
