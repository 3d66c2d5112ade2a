"""POPE-style probe: question building, answer parsing, scores on hand-made answers with known
numbers, and `bpo-fast eval-pope`."""

import json

import pytest

from bpo_fast.cli import main
from bpo_fast.data.jsonl import atomic_write_jsonl
from bpo_fast.eval.pope import (build_questions, load_answers, load_prior, load_questions,
                                parse_yes_no, question_text, score_pope)

GT = {"1": ["dog", "cat"], "2": ["dog"], "3": ["car", "person"], "4": ["Cat", "bird"]}
PRIOR = {"dog": ["frisbee"], "car": ["road", "tree"], "bird": "tree"}


def test_questions_follow_the_ground_truth_and_the_prior():
    qs = build_questions(GT, seed=0, per_image=2, prior=PRIOR)
    by = {}
    for q in qs:
        by.setdefault((q["image_id"], q["split"]), []).append(q["object"])
        assert q["question"] == question_text(q["object"])
        assert q["question_id"] == f"{q['image_id']}:{q['split']}:{q['object']}"
        assert q["label"] == ("yes" if q["split"] == "present" else "no")
    assert sorted(by["1", "present"]) == ["cat", "dog"]
    assert by["2", "present"] == ["dog"]                       # fewer than per_image present
    assert by["1", "prior"] == ["frisbee"] and by["2", "prior"] == ["frisbee"]
    assert sorted(by["3", "prior"]) == ["road", "tree"]
    assert by["4", "prior"] == ["tree"]                        # {object: partner} works too
    assert ("4", "present") in by and sorted(by["4", "present"]) == ["bird", "cat"]  # normalised
    vocab = {"dog", "cat", "car", "person", "bird", "frisbee", "road", "tree"}
    for (img, split), objs in by.items():
        present = {o.lower() for o in GT[img]}
        assert len(objs) <= 2 and len(set(objs)) == len(objs)
        if split == "random":     # as many as present ones (balanced)
            assert len(objs) == len(by[img, "present"]) and set(objs) <= vocab - present
    # images in order, then present / random / prior
    order = [(q["image_id"], q["split"]) for q in qs]
    assert order == sorted(order, key=lambda t: (t[0], ["present", "random", "prior"].index(t[1])))
    assert question_text("apple") == "Is there an apple in the image?"
    assert question_text("red  Circle") == "Is there a red circle in the image?"


def test_questions_are_deterministic_per_image():
    vocab = [f"obj{i}" for i in range(30)]
    a = build_questions(GT, seed=3, per_image=3, vocabulary=vocab + ["dog", "cat"])
    b = build_questions(dict(reversed(list(GT.items()))), seed=3, per_image=3,
                        vocabulary=vocab + ["dog", "cat"])
    assert sorted(a, key=lambda q: q["question_id"]) == sorted(b, key=lambda q: q["question_id"])
    c = build_questions(GT, seed=4, per_image=3, vocabulary=vocab + ["dog", "cat"])
    assert {q["question_id"] for q in a} != {q["question_id"] for q in c}
    # pairs as [[anchor, partner]] give the same prior questions as the dict
    d = build_questions(GT, seed=0, per_image=2, prior=[["dog", "frisbee"], ["car", "road"],
                                                         ["car", "tree"], ["bird", "tree"]])
    assert d == build_questions(GT, seed=0, per_image=2, prior=PRIOR)
    assert not [q for q in build_questions(GT, seed=0) if q["split"] == "prior"]


def test_parse_yes_no_like_pope():
    assert parse_yes_no("Yes, there is a dog in the image.") == (True, True)
    assert parse_yes_no("No, there is no dog.") == (False, True)
    assert parse_yes_no("There is not a dog") == (False, True)
    assert parse_yes_no("yes. But no cat.") == (True, True)      # only the first sentence
    assert parse_yes_no("I think so") == (True, False)            # POPE: anything else is yes
    assert parse_yes_no("nope") == (True, False)
    with pytest.raises(TypeError, match="answer"):
        parse_yes_no(None)


def _q(img, split, obj):
    return {"question_id": f"{img}:{split}:{obj}", "image_id": img, "object": obj, "split": split}


# hand-made questions and answers: tp 3, fn 1 (present); fp 1, tn 3 (random); fp 2 (prior)
QUESTIONS = [_q("1", "present", "dog"), _q("1", "present", "cat"), _q("2", "present", "dog"),
             _q("3", "present", "car"), _q("1", "random", "car"), _q("2", "random", "cat"),
             _q("3", "random", "bird"), _q("4", "random", "dog"), _q("2", "prior", "frisbee"),
             _q("3", "prior", "road")]
ANSWERS = dict(zip([q["question_id"] for q in QUESTIONS],
                   ["Yes.", "yes", "No, there is not.", "Yes, a car.", "No.", "no", "No", "Yes.",
                    "yes", "I think so"]))


def test_scores_known_numbers():
    r = score_pope(QUESTIONS, ANSWERS, GT)
    p, rnd, pri = r.splits["present"], r.splits["random"], r.splits["prior"]
    assert (p["tp"], p["fn"], p["fp"], p["tn"]) == (3, 1, 0, 0)
    assert p["accuracy"] == p["recall"] == p["yes_ratio"] == 0.75 and p["precision"] == 1.0
    assert p["f1"] == pytest.approx(2 * 0.75 / 1.75)
    assert rnd["accuracy"] == 0.75 and rnd["yes_ratio"] == 0.25 and rnd["precision"] == 0.0
    assert rnd["recall"] is None and rnd["f1"] is None          # no positive: undefined, not NaN
    assert pri["accuracy"] == 0.0 and pri["yes_ratio"] == 1.0 and pri["n"] == 2
    s_r, s_p = r.settings["random"], r.settings["prior"]
    assert (s_r["accuracy"], s_r["precision"], s_r["recall"], s_r["f1"], s_r["yes_ratio"]) == \
        (0.75, 0.75, 0.75, 0.75, 0.5)
    assert s_p["accuracy"] == 0.5 and s_p["precision"] == pytest.approx(0.6)
    assert s_p["recall"] == 0.75 and s_p["f1"] == pytest.approx(2 / 3)
    assert s_p["yes_ratio"] == pytest.approx(5 / 6)
    assert r.n_questions == 10 and r.n_unclear == 1
    text = r.format()
    assert "split prior" in text and "POPE prior" in text and "n/a" in text
    assert json.loads(json.dumps(r.to_dict()))["settings"]["random"]["n"] == 8


def test_score_errors():
    with pytest.raises(ValueError, match="no answer for 1 of 10"):
        score_pope(QUESTIONS, {k: v for k, v in list(ANSWERS.items())[1:]})
    with pytest.raises(ValueError, match="unknown question ids: 'x'"):
        score_pope(QUESTIONS, {**ANSWERS, "x": "yes"})
    wrong = QUESTIONS[:-1] + [_q("3", "prior", "car")]           # car IS in image 3
    answers = {**{k: v for k, v in ANSWERS.items() if k != "3:prior:road"}, "3:prior:car": "no"}
    with pytest.raises(ValueError, match="'car' as prior, but the ground truth says it is in"):
        score_pope(wrong, answers, GT)
    assert score_pope(wrong, answers).splits["prior"]["tn"] == 1  # without truth: the split's label
    with pytest.raises(ValueError, match="per_image"):
        build_questions(GT, per_image=0)
    with pytest.raises(TypeError, match=r"prior\[0\]"):
        build_questions(GT, prior=[("dog",)])
    with pytest.raises(ValueError, match="two different"):
        build_questions(GT, prior={"dog": ["dog"]})


def test_files(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"question_id": "a", "text": "Yes"}\n{"question_id": "b", "answer": "no"}\n')
    assert load_answers(str(p)) == {"a": "Yes", "b": "no"}
    p.write_text('{"question_id": "a", "text": "Yes"}\n{"question_id": "a", "text": "no"}\n')
    with pytest.raises(ValueError, match=r"a.jsonl:2: duplicate question_id 'a'"):
        load_answers(str(p))
    p.write_text('{"id": "a", "text": "Yes"}\n')
    with pytest.raises(ValueError, match=r"a.jsonl:1: answer has no 'question_id'"):
        load_answers(str(p))
    pr = tmp_path / "prior.json"
    pr.write_text(json.dumps(PRIOR))
    assert load_prior(str(pr))["bird"] == ["tree"]
    pr.write_text("[1, 2]")
    with pytest.raises(ValueError, match="anchor, partner"):
        load_prior(str(pr))
    qs = build_questions(GT, prior=PRIOR)
    atomic_write_jsonl(str(tmp_path / "q.jsonl"), qs)
    assert load_questions(str(tmp_path / "q.jsonl")) == qs


def test_cli_write_answer_score(tmp_path, capsys):
    gt = tmp_path / "gt.jsonl"
    gt.write_text("".join(json.dumps({"id": k, "objects": v}) + "\n" for k, v in GT.items()))
    prior = tmp_path / "prior.json"
    prior.write_text(json.dumps(PRIOR))
    q = tmp_path / "q.jsonl"
    assert main(["eval-pope", "--ground-truth", str(gt), "--prior", str(prior),
                 "--write-questions", str(q), "--seed", "7"]) == 0
    qs = [json.loads(line) for line in q.read_text().splitlines()]
    truth = {k: {o.lower() for o in v} for k, v in GT.items()}
    # an oracle, and a model that says yes to everything
    oracle = tmp_path / "oracle.jsonl"
    oracle.write_text("".join(json.dumps({"question_id": x["question_id"], "text":
                                          "Yes." if x["object"] in truth[x["image_id"]] else "No."})
                              + "\n" for x in qs))
    yes = tmp_path / "yes.jsonl"
    yes.write_text("".join(json.dumps({"question_id": x["question_id"], "answer": "Yes"}) + "\n"
                           for x in qs))
    capsys.readouterr()
    out = tmp_path / "scores.json"
    assert main(["eval-pope", "--ground-truth", str(gt), "--questions", str(q), "--answers",
                 str(oracle), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert all(s["accuracy"] == 1.0 for s in res["splits"].values())
    assert res["settings"]["prior"]["f1"] == 1.0 and res["n_unclear"] == 0
    assert "POPE prior" in capsys.readouterr().out
    # the same set is built again from the same options (no --questions)
    assert main(["eval-pope", "--ground-truth", str(gt), "--prior", str(prior), "--seed", "7",
                 "--answers", str(yes), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["splits"]["random"]["accuracy"] == 0.0 and res["splits"]["prior"]["yes_ratio"] == 1.0
    # balanced: as many random-absent questions as present ones, so always-yes scores 50%
    assert res["splits"]["random"]["n"] == res["splits"]["present"]["n"] == 7
    assert res["settings"]["random"]["accuracy"] == 0.5
    assert res["settings"]["random"]["yes_ratio"] == 1.0
    capsys.readouterr()
    # another seed is another set: the answers no longer fit, one line, exit 2
    assert main(["eval-pope", "--ground-truth", str(gt), "--prior", str(prior), "--seed", "8",
                 "--answers", str(yes)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("bpo-fast eval-pope: error: --answers:")
    assert main(["eval-pope", "--ground-truth", str(gt), "--questions", str(q), "--prior",
                 str(prior), "--answers", str(yes)]) == 2
    assert "--prior" in capsys.readouterr().err


def test_generate_answers_one_question_per_image(tiny_llava_dir):
    """Questions of different lengths in one batch (left padding) give the answers each gets
    alone."""
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from bpo_fast.demo.sft import generate_answers

    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir, local_files_only=True)
    processor = AutoProcessor.from_pretrained(tiny_llava_dir, local_files_only=True)
    images = [Image.new("RGB", (32, 32), c) for c in ((200, 10, 10), (10, 200, 10), (9, 9, 200))]
    prompts = ["is there a red circle in the image?", "what is it?",
               "is there a dog ? is there a cat ? is there a red circle in the image?"]
    batched = generate_answers(model, processor, images, prompts, max_new_tokens=4)
    alone = [generate_answers(model, processor, [im], p, max_new_tokens=4)[0]
             for im, p in zip(images, prompts)]
    assert batched == alone and all(isinstance(a, str) for a in batched)
    with pytest.raises(ValueError, match="one question per image"):
        generate_answers(model, processor, images, prompts[:2])
