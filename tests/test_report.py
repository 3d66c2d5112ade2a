"""The report: valid PNGs, Markdown and a table from synthetic metrics and CHAIR results."""

import json
import math
import random

import pytest
from PIL import Image

from bpo_fast.demo.report import (METRIC_KEYS, format_table, load_metrics, summarize,
                                  write_report)
from bpo_fast.eval.chair import compute_chair


def fake_metrics(n, seed, improve=True):
    rng = random.Random(seed)
    rows = []
    for i in range(1, n + 1):
        m = (0.04 * i if improve else 0.0) + 0.05 * rng.gauss(0, 1)
        rows.append({"step": i, "loss": math.log1p(math.exp(-m)), "reward_chosen": m / 3,
                     "reward_rejected": -2 * m / 3, "reward_margin": m,
                     "reward_accuracy": min(1.0, 0.5 + i / (2 * n) if improve else 0.5),
                     "lr": 1e-5, "tokens_per_s": 1000.0})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def check_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] > 200 and im.size[1] > 200


def test_report_several_seeds(tmp_path):
    metrics = {s: write_jsonl(tmp_path / f"m{s}.jsonl", fake_metrics(120, s)) for s in range(3)}
    before = {s: {"chair_i": 0.30 + 0.01 * s, "chair_s": 0.55, "recall": 0.80} for s in range(3)}
    after = {s: {"chair_i": 0.18 + 0.01 * s, "chair_s": 0.40, "recall": 0.79} for s in range(3)}
    out = write_report(str(tmp_path / "rep"), metrics=metrics, chair_before=before,
                       chair_after=after, settings={"beta": 0.1, "noise step": 500},
                       examples=[{"id": "eval_000001", "truth": ["red circle"],
                                  "before": "a red circle | and a blue square", "after": "a red circle"}],
                       notes="Nothing else to say.")
    check_png(out["chair_plot"])
    check_png(out["training_plot"])
    md = open(out["report"]).read()
    assert md.startswith("# BPO on the shapes world")
    assert "![CHAIR before and after BPO](chair.png)" in md
    assert "![DPO training curves](training.png)" in md
    assert "BPO lowered CHAIR-i in all 3 seeds: from 31.0% to 19.0%" in md
    assert "within the tolerance" in md and "is met in this run" in md
    assert "| beta | 0.1 |" in md and "a red circle \\| and" in md and "Nothing else" in md
    assert "Seed 2: 120 steps; DPO loss fell" in md
    table = out["table"]
    assert table.splitlines()[0].split()[:3] == ["run", "CHAIR-i", "before"]
    assert [line.split()[0] for line in table.splitlines()[2:6]] == ["0", "1", "2", "mean"]
    assert "31.0" in table.splitlines()[5] and "19.0" in table.splitlines()[5]
    summ = json.load(open(out["summary_json"]))
    assert summ["chair"]["chair_i"]["n_down"] == 3
    assert summ["chair"]["chair_i"]["change_mean"] == pytest.approx(-0.12)
    assert summ["settings"]["beta"] == 0.1


def test_report_says_what_the_numbers_say(tmp_path):
    # mixed directions within noise, and a large recall cost: the text must say so
    before = {0: {"chair_i": 0.30, "chair_s": 0.5, "recall": 0.8},
              1: {"chair_i": 0.30, "chair_s": 0.5, "recall": 0.8}}
    after = {0: {"chair_i": 0.25, "chair_s": 0.5, "recall": 0.6},
             1: {"chair_i": 0.33, "chair_s": 0.5, "recall": 0.6}}
    out = write_report(str(tmp_path), metrics={0: fake_metrics(20, 0, improve=False),
                                               1: fake_metrics(20, 1, improve=False)},
                       chair_before=before, chair_after=after)
    md = open(out["report"]).read()
    assert "CHAIR-i went down in 1 and up in 1 of the 2 seeds" in md
    assert "within the spread between seeds and should not be read as an effect" in md
    assert "more than the tolerance" in md and "is not met in this run" in md
    # higher CHAIR-i everywhere
    out = write_report(str(tmp_path), chair_before={"chair_i": 0.1, "chair_s": 0.2, "recall": 0.5},
                       chair_after={"chair_i": 0.2, "chair_s": 0.3, "recall": 0.6})
    md = open(out["report"]).read()
    assert "BPO raised CHAIR-i: from 10.0% to 20.0%" in md and "recall did not drop" in md
    assert "No training metrics were given." in md and out["training_plot"] is None
    assert "is not met" in md


def test_report_from_chair_results_and_undefined_scores(tmp_path):
    gt = {"a": ["dog"], "b": ["cat"]}
    before = compute_chair({"a": "a dog and a cat", "b": "a dog"}, gt)
    after = compute_chair({"a": "a dog", "b": "a cat"}, gt)
    out = write_report(str(tmp_path), metrics=fake_metrics(5, 0), chair_before=before,
                       chair_after=after)
    check_png(out["chair_plot"])
    check_png(out["training_plot"])
    assert "from 66.7% to 0.0%" in open(out["report"]).read()
    # no mentions at all after: CHAIR-i is n/a, and the report does not invent a comparison
    none = compute_chair({"a": "nothing", "b": "nothing"}, gt)
    out = write_report(str(tmp_path), chair_before=before, chair_after=none)
    md = open(out["report"]).read()
    assert "n/a" in out["table"] and "no comparison can be made" in md
    check_png(out["chair_plot"])


def test_load_metrics(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"step": 2, "loss": 0.5}\n\n{"step": 1, "rewards/margins": 0.1, '
                 '"rewards/accuracies": 1.0, "learning_rate": 1e-5}\n{"step": 2, "loss": 0.4}\n')
    rows = load_metrics(str(p))
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["reward_margin"] == 0.1 and rows[0]["reward_accuracy"] == 1.0
    assert rows[0]["lr"] == 1e-5 and rows[1]["loss"] == 0.4   # the last line of a step wins
    assert set(METRIC_KEYS) >= {"step", "loss", "reward_margin", "reward_accuracy"}
    p.write_text('{"step": 1}\n{"step": 2, "loss": \n')
    with pytest.raises(ValueError, match=r"m.jsonl:2: invalid JSON"):
        load_metrics(str(p))
    p.write_text('{"loss": 1}\n')
    with pytest.raises(ValueError, match=r"m.jsonl:1: expected a numeric 'step'"):
        load_metrics(str(p))
    with pytest.raises(FileNotFoundError, match="metrics"):
        load_metrics(str(tmp_path / "nope.jsonl"))
    # an objective with an extra term (RPO): the DPO part is what the report shows
    p.write_text('{"step": 1, "loss": 1.9, "dpo_loss": 0.69}\n')
    assert load_metrics(str(p))[0]["loss"] == 0.69


def test_bad_arguments(tmp_path):
    ok = {"chair_i": 0.1, "chair_s": 0.1, "recall": 0.5}
    with pytest.raises(ValueError, match="same seeds"):
        format_table({0: ok, 1: ok}, {0: ok})
    with pytest.raises(TypeError, match="chair_before"):
        format_table({"chair_i": 0.1}, ok)
    with pytest.raises(ValueError, match="finite"):
        summarize(ok, {"chair_i": float("nan"), "chair_s": 0.1, "recall": 0.5})
    with pytest.raises(TypeError, match="metrics"):
        summarize(ok, ok, metrics=[1, 2])
    with pytest.raises(ValueError, match="recall_tolerance"):
        write_report(str(tmp_path), chair_before=ok, chair_after=ok, recall_tolerance=2)


def test_extra_metrics(tmp_path):
    ok = {"chair_i": 0.1, "chair_s": 0.1, "recall": 0.5}
    out = write_report(str(tmp_path), chair_before={0: ok, 1: ok}, chair_after={0: ok, 1: ok},
                       extra_metrics={"prior-partner hallucination": ({0: 0.8, 1: 0.6}, {0: 0.2, 1: None})})
    md = open(out["report"]).read()
    assert "| prior-partner hallucination | 70.0 | 20.0 |" in md
    assert json.load(open(out["summary_json"]))["extra"]["prior-partner hallucination"]["n"] == 2
    with pytest.raises(TypeError, match="extra_metrics"):
        write_report(str(tmp_path), chair_before=ok, chair_after=ok, extra_metrics={"x": 0.5})
    with pytest.raises(ValueError, match="extra_metrics"):
        write_report(str(tmp_path), chair_before=ok, chair_after=ok, extra_metrics={"x": (0.5, "a")})
