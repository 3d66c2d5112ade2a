"""The shapes world: drawn pixels match the ground truth, captions parse back, the prior holds."""

import json
import os
import random

import numpy as np
import pytest

from bpo_fast.demo import world as W
from bpo_fast.demo.world import (PALETTE, WorldConfig, caption, generate_scenes, make_world,
                                 parse_caption_objects, qa_pairs, render, scene_objects,
                                 world_lexicon, world_synonyms, world_vocabulary)

CONFIGS = [
    WorldConfig(),
    WorldConfig(image_size=48, grid=(3, 3), max_objects=5,
                colours=("red", "green", "blue", "yellow", "purple", "orange"),
                kinds=("circle", "square", "triangle", "cross", "diamond", "star")),
    WorldConfig(image_size=96, grid=(1, 3), min_objects=2, max_objects=3, prior_pairs=()),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["default", "3x3-all-kinds", "1x3-no-prior"])
def test_pixels_match_ground_truth(cfg):
    bg = np.array(cfg.background, dtype=np.uint8)
    for sc in generate_scenes(150, seed=3, config=cfg):
        img = np.asarray(render(sc, cfg))
        assert img.shape == (cfg.image_size, cfg.image_size, 3)
        assert cfg.min_objects <= len(sc.shapes) <= cfg.n_cells
        covered = np.zeros(img.shape[:2], dtype=bool)
        cells = set()
        for s in sc.shapes:
            x0, y0, x1, y1 = s.bbox
            assert 0 <= x0 < x1 <= cfg.image_size and 0 <= y0 < y1 <= cfg.image_size
            # the shape sits inside its own cell, so shapes never overlap
            cx0, cy0, cx1, cy1 = W._cell_box(cfg, s.cell)
            assert cx0 <= x0 and x1 <= cx1 and cy0 <= y0 and y1 <= cy1
            assert s.cell not in cells
            cells.add(s.cell)
            assert s.position == cfg.position_names()[s.cell]
            colour = np.array(PALETTE[s.colour], dtype=np.uint8)
            cx, cy = s.center
            assert (img[cy, cx] == colour).all(), (sc.id, s)
            box = img[y0:y1, x0:x1].reshape(-1, 3)
            is_fill = (box == colour).all(1)
            is_bg = (box == bg).all(1)
            assert (is_fill | is_bg).all(), "only the shape's colour and background in its box"
            frac = is_fill.mean()
            assert 0.2 < frac <= 1.0
            if s.kind == "square":
                assert frac == 1.0
            else:
                assert frac < 1.0
            covered[y0:y1, x0:x1] = True
        assert (img[~covered] == bg).all(), "background everywhere outside the shapes"


def test_kinds_are_distinguishable_by_fill():
    # Each kind fills its box in a characteristic proportion, so the drawing is the kind named.
    cfg = WorldConfig(image_size=96, grid=(1, 2), kinds=W.KINDS, prior_pairs=(), max_objects=2)
    fills = {}
    for sc in generate_scenes(300, seed=1, config=cfg):
        img = np.asarray(render(sc, cfg))
        for s in sc.shapes:
            x0, y0, x1, y1 = s.bbox
            f = (img[y0:y1, x0:x1] == PALETTE[s.colour]).all(-1).mean()
            fills.setdefault(s.kind, []).append(f)
    means = {k: float(np.mean(v)) for k, v in fills.items()}
    assert means["square"] == 1.0
    assert 0.70 < means["circle"] < 0.85          # pi / 4
    assert 0.40 < means["triangle"] < 0.60        # 1 / 2
    assert 0.40 < means["diamond"] < 0.60
    assert 0.30 < means["cross"] < 0.50 and 0.20 < means["star"] < 0.40


def test_triangle_and_diamond_profiles():
    # same fill, different outline: the triangle's base row is full, the diamond's middle row
    cfg = WorldConfig(image_size=96, grid=(1, 2), kinds=("triangle", "diamond"), prior_pairs=(),
                      max_objects=2)
    for sc in generate_scenes(50, seed=4, config=cfg):
        img = np.asarray(render(sc, cfg))
        for s in sc.shapes:
            x0, y0, x1, y1 = s.bbox
            rows = (img[y0:y1, x0:x1] == PALETTE[s.colour]).all(-1).mean(1)
            mid = s.center[1] - y0
            if s.kind == "triangle":
                assert rows[-1] == 1.0 and rows[0] < 0.2
            else:
                assert rows[mid] == 1.0 and rows[0] < 0.2 and rows[-1] < 0.2


def test_deterministic_and_independent_of_count():
    a = generate_scenes(20, seed=7)
    b = generate_scenes(40, seed=7)
    assert [s.to_dict() for s in a] == [s.to_dict() for s in b[:20]]
    c = generate_scenes(20, seed=8)
    assert [s.to_dict() for s in a] != [s.to_dict() for s in c]
    tail = generate_scenes(5, seed=7, start=35)
    assert [s.to_dict() for s in tail] == [s.to_dict() for s in b[35:]]
    assert np.array_equal(np.asarray(render(a[3])), np.asarray(render(b[3])))


@pytest.mark.parametrize("cfg", CONFIGS, ids=["default", "3x3-all-kinds", "1x3-no-prior"])
def test_captions_parse_back_to_ground_truth(cfg):
    for sc in generate_scenes(300, seed=0, config=cfg):
        groups = parse_caption_objects(caption(sc), cfg)
        assert [g["object"] for g in groups] == scene_objects(sc)
        for g in groups:
            shapes = [s for s in sc.shapes if s.object == g["object"]]
            assert g["count"] == len(shapes)
            assert g["positions"] == [s.position for s in shapes]
            assert (g["colour"], g["kind"]) == (shapes[0].colour, shapes[0].kind)


def test_caption_template_and_parser_on_hand_made_text():
    cfg = WorldConfig()
    sc = W.Scene("x", "train", 0, [
        W.Shape("circle", "red", 0, "top left", (2, 2, 20, 20)),
        W.Shape("square", "blue", 1, "top right", (34, 2, 50, 18)),
        W.Shape("square", "blue", 3, "bottom right", (34, 34, 50, 50)),
    ])
    assert caption(sc) == ("the image shows a red circle at the top left, and two blue squares "
                           "at the top right and the bottom right.")
    got = parse_caption_objects("Two Yellow Crosses at the bottom left. a dog, an green circle!", cfg)
    assert [(g["count"], g["object"], g["positions"]) for g in got] == [
        (2, "yellow cross", ["bottom left"]), (1, "green circle", [])]
    assert parse_caption_objects("", cfg) == []
    with pytest.raises(TypeError, match="text"):
        parse_caption_objects(None)


def test_language_prior_statistics():
    cfg = WorldConfig(prior_strength=0.85, eval_prior_strength=0.3)
    train = generate_scenes(4000, seed=0, config=cfg, split="train")
    held = generate_scenes(4000, seed=0, config=cfg, split="eval")
    st_train = W.prior_statistics(train, cfg)
    st_eval = W.prior_statistics(held, cfg)
    for key in st_train:
        n = st_train[key]["images_with_anchor"]
        assert n > 500
        assert abs(st_train[key]["p_partner_given_anchor"] - 0.85) < 0.04, st_train
        assert abs(st_eval[key]["p_partner_given_anchor"] - 0.3) < 0.04, st_eval
    # without the anchor, partners are as rare as any other object: the prior is the co-occurrence
    objs = [set(scene_objects(s)) for s in train]
    p_partner_alone = np.mean(["blue square" in o for o in objs if "red circle" not in o])
    assert p_partner_alone < 0.25
    # no prior at all: the partner is no more likely with the anchor than without
    flat = WorldConfig(prior_pairs=(), anchor_rate=0.0)
    objs = [set(scene_objects(s)) for s in generate_scenes(4000, seed=0, config=flat)]
    with_a = np.mean(["blue square" in o for o in objs if "red circle" in o])
    without = np.mean(["blue square" in o for o in objs if "red circle" not in o])
    assert abs(with_a - without) < 0.06


def test_vocabulary_covers_every_text_and_tokenizer_has_no_unknowns():
    cfg = WorldConfig()
    vocab = set(world_vocabulary(cfg))
    rng = random.Random(0)
    texts = list(W.DESCRIBE_PROMPTS)
    for sc in generate_scenes(400, seed=0, config=cfg):
        texts.append(caption(sc))
        for q, a in qa_pairs(sc, rng, 4, cfg):
            texts += [q, a]
    for t in texts:
        assert set(W._tokens(t)) <= vocab, t
    from bpo_fast.models.tiny import build_word_tokenizer

    tok = build_word_tokenizer(sorted(vocab))
    unk = tok.unk_token_id
    for t in texts[:300]:
        assert unk not in tok(t)["input_ids"], t


def test_qa_answers_are_true():
    cfg = WorldConfig()
    rng = random.Random(1)
    for sc in generate_scenes(200, seed=2, config=cfg):
        objs = scene_objects(sc)
        for q, a in qa_pairs(sc, rng, 4, cfg):
            if q.startswith("is there"):
                obj = " ".join(q.split()[3:5])
                assert a.startswith("yes") == (obj in objs)
            elif q.startswith("how many"):
                colour, kinds = q.split()[2:4]
                n = sum(s.colour == colour and W._plural(s.kind) == kinds for s in sc.shapes)
                assert (W.COUNT_WORDS[n] if n != 1 else "one") in a or (n == 0 and " no " in a)
            elif q.startswith("what color"):
                assert a.split()[-1].rstrip(".") in cfg.colours
                kind, pos = q.split()[4], q.split(" at the ")[1].rstrip("?")
                assert any(s.kind == kind and s.position == pos and a.endswith(s.colour + ".")
                           for s in sc.shapes)


def test_make_world_on_disk(tmp_path):
    cfg = WorldConfig()
    paths = make_world(str(tmp_path / "w"), 30, 12, seed=5, config=cfg)
    recs = json.load(open(paths.train))
    held = json.load(open(paths.eval))
    assert len(recs) == 30 and len(held) == 12
    for r in recs + held:
        assert set(r) == {"id", "image", "conversations"}
        conv = r["conversations"]
        assert conv[0]["from"] == "human" and conv[0]["value"].startswith("<image>\n")
        assert [c["from"] for c in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert sum("<image>" in c["value"] for c in conv) == 1
        assert os.path.isfile(os.path.join(paths.images, r["image"]))
    assert all(len(r["conversations"]) == 2 * (1 + cfg.qa_per_image) for r in recs)
    assert all(r["conversations"][0]["value"] == "<image>\n" + W.EVAL_PROMPT for r in held)
    truth = [json.loads(line) for line in open(paths.eval_truth)]
    assert [t["id"] for t in truth] == [r["id"] for r in held]
    for t, r in zip(truth, held):
        got = [g["object"] for g in parse_caption_objects(r["conversations"][1]["value"])]
        assert got == t["objects"]
        # the saved PNG is the rendered scene
        from PIL import Image

        img = np.asarray(Image.open(os.path.join(paths.images, r["image"])).convert("RGB"))
        for s in t["shapes"]:
            x0, y0, x1, y1 = s["bbox"]
            assert tuple(img[(y0 + y1 - 1) // 2, (x0 + x1 - 1) // 2]) == PALETTE[s["colour"]]
    meta = json.load(open(paths.meta))
    assert meta["seed"] == 5 and meta["vocabulary"] == world_vocabulary(cfg)
    lex = json.load(open(paths.lexicon))
    from bpo_fast.data.inject import load_lexicon

    assert load_lexicon(lex)["objects"] == list(cfg.kinds)
    from bpo_fast.eval.chair import SynonymTable

    table = SynonymTable.from_file(paths.synonyms)
    assert sorted(table.objects) == sorted(cfg.objects)
    assert world_synonyms(cfg).keys() == set(cfg.objects)
    # same arguments: reused (not rewritten); other arguments: rewritten
    mtime = os.path.getmtime(paths.meta)
    os.remove(os.path.join(paths.images, recs[0]["image"]))
    make_world(str(tmp_path / "w"), 30, 12, seed=5, config=cfg)
    assert os.path.getmtime(paths.meta) == mtime
    make_world(str(tmp_path / "w"), 30, 12, seed=6, config=cfg)
    assert json.load(open(paths.meta))["seed"] == 6
    assert os.path.isfile(os.path.join(paths.images, recs[0]["image"]))


def test_lexicon_keeps_rule_injections_in_the_world():
    from bpo_fast.data.inject import RuleInjector

    cfg = WorldConfig()
    vocab = set(world_vocabulary(cfg))
    inj = RuleInjector(seed=0, lexicon=world_lexicon(cfg))
    rng = random.Random(0)
    texts = ["the image shows no shapes."]
    for sc in generate_scenes(300, seed=0, config=cfg):
        texts.append(caption(sc))
        texts += [a for _, a in qa_pairs(sc, rng, 2, cfg)]
    for i, text in enumerate(texts):
        out = inj.inject(text, key=str(i))
        assert out != text
        assert set(W._tokens(out)) <= vocab, out
    assert "also" in inj.inject("the image shows no shapes.", key="x")


@pytest.mark.parametrize("kwargs, match", [
    (dict(grid=(4, 4)), "grid"),
    (dict(grid=(1, 1)), "grid"),
    (dict(colours=("red", "mauve")), "colours"),
    (dict(kinds=("circle", "circle")), "kinds"),
    (dict(max_objects=5), "max_objects"),
    (dict(prior_pairs=(("red circle", "pink square"),)), "prior_pairs"),
    (dict(prior_pairs=(("red circle", "blue square"), ("blue square", "green cross"))), "prior_pairs"),
    (dict(prior_strength=1.5), "prior_strength"),
    (dict(image_size=8), "image_size"),
    (dict(background=PALETTE["red"]), "background"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WorldConfig(**kwargs)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="n_train"):
        make_world(str(tmp_path), -1, 2)
    with pytest.raises(TypeError, match="config"):
        make_world(str(tmp_path), 1, 2, config={"grid": (2, 2)})
    with pytest.raises(ValueError, match="split"):
        generate_scenes(2, split="Eval set")


def test_read_world_score_captions_and_prior_hallucination(tmp_path):
    cfg = WorldConfig(eval_prior_strength=0.0)
    paths = make_world(str(tmp_path / "w"), 0, 60, seed=2, config=cfg)
    p2, cfg2, meta = W.read_world(str(tmp_path / "w"))
    assert cfg2 == cfg and p2 == paths and meta["n_eval"] == 60
    with pytest.raises(FileNotFoundError, match="world.json"):
        W.read_world(str(tmp_path / "nothing"))
    recs = json.load(open(paths.eval))
    truth = {json.loads(line)["id"]: json.loads(line)["objects"] for line in open(paths.eval_truth)}
    refs = {r["id"]: r["conversations"][1]["value"] for r in recs}
    res = W.score_captions(refs, paths)
    assert res.chair_i == 0.0 and res.recall == 1.0
    # a "text-leaning" captioner: the reference caption plus the anchor's usual partner
    leaning = {}
    for i, text in refs.items():
        extra = [p for a, p in cfg.prior_pairs if a in truth[i]]
        leaning[i] = text + "".join(f" there is a {p} at the top left." for p in extra)
    res = W.score_captions(leaning, str(tmp_path / "w"))
    ph = W.prior_hallucination(res, cfg)
    # (image, pair) cases with the anchor; eval prior 0: the partner is never there too
    n_cases = sum(a in truth[i] for i in truth for a, _ in cfg.prior_pairs)
    assert ph["all"]["images"] == n_cases > 0
    assert ph["all"]["rate"] == 1.0
    assert res.n_hallucinated_mentions == n_cases
    assert W.prior_hallucination(W.score_captions(refs, paths), cfg)["all"]["rate"] == 0.0
    sub = W.score_captions(dict(list(refs.items())[:5]), paths, subset=True)
    assert sub.n_captions == 5


def test_records_are_read_by_the_pair_builder(tmp_path):
    from bpo_fast.data.llava_format import iter_records, record_to_samples

    cfg = WorldConfig(qa_per_image=3)
    paths = make_world(str(tmp_path / "w"), 10, 4, seed=0, config=cfg)
    for path, turns in ((paths.train, 1 + cfg.qa_per_image), (paths.eval, 1)):
        for idx, line, rec in iter_records(path):
            samples = record_to_samples(rec, turns="all", index=idx, line=line)
            assert len(samples) == turns
            # one description per conversation, first or (half of the training records, as a
            # POPE probe asks) after an opening question
            assert sum(s.question in W.DESCRIBE_PROMPTS for s in samples) == 1
            assert samples[0].question.endswith(("?", "."))
            assert samples[0].chosen == rec["conversations"][1]["value"]
            assert os.path.isfile(os.path.join(paths.images, samples[0].image))
