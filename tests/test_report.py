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
    assert "![CHAIR of every arm per seed](chair.png)" in md
    assert "![DPO training curves](training.png)" in md
    assert "BPO lowered CHAIR-i in all 3 seeds: from 31.0% to 19.0%" in md
    assert "BPO beats the SFT start on CHAIR-i in all 3 seeds; mean difference (BPO - SFT " \
        "start) -12.0 [-12.0, -12.0] points, outside the seed noise" in md
    # without a control arm the aim is not claimed
    assert "within the tolerance" in md and "is not met in this run: no supervised control" in md
    assert md.index("is not met") < md.index("## Setup")                # the headline comes first
    assert "| beta | 0.1 |" in md and "a red circle \\| and" in md and "Nothing else" in md
    assert "| BPO | 2 | 120 | 0.577 -> 0.010 |" in md      # the training table, per seed
    assert "- **BPO**, mean of 3 runs: the DPO loss went from 0.578 to 0.010" in md
    table = out["table"].splitlines()
    assert table[1].split() == ["seed", "SFT", "BPO"] * 1 + ["SFT", "BPO"] * 2
    assert [line.split()[0] for line in table[3:9]] == ["0", "1", "2", "mean", "CI", "CI"]
    assert table[6].split()[1:3] == ["31.0", "19.0"] and table[7].split()[2:4] == ["30.0", "18.0"]
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
    assert "recall dropped by 20.0 points" in md
    # higher CHAIR-i everywhere
    out = write_report(str(tmp_path), chair_before={"chair_i": 0.1, "chair_s": 0.2, "recall": 0.5},
                       chair_after={"chair_i": 0.2, "chair_s": 0.3, "recall": 0.6})
    md = open(out["report"]).read()
    assert "BPO raised CHAIR-i: from 10.0% to 20.0%" in md and "Recall did not drop" in md
    assert "BPO does not beat the SFT start on CHAIR-i in its one seed" in md
    assert "no claim beyond this seed" in md
    # a single run given without a seed: its table row is not labelled "run"
    assert out["table"].splitlines()[3].split()[0] == "-"
    assert "run" not in out["table"].split()
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
    assert "| prior-partner hallucination | 70.0 [60.0, 80.0] | 20.0 (1 seed, no CI) |" in md
    assert json.load(open(out["summary_json"]))["extra"]["prior-partner hallucination"]["n"] == 2
    with pytest.raises(TypeError, match="extra_metrics"):
        write_report(str(tmp_path), chair_before=ok, chair_after=ok, extra_metrics={"x": 0.5})
    with pytest.raises(ValueError, match="extra_metrics"):
        write_report(str(tmp_path), chair_before=ok, chair_after=ok, extra_metrics={"x": (0.5, "a")})


def _arms(bpo_ci, ctl_ci, sft_ci=(0.60, 0.62, 0.61), recall=(0.70, 0.70)):
    mk = lambda ci, r: {s: {"chair_i": v, "chair_s": 0.5, "recall": r}  # noqa: E731
                        for s, v in enumerate(ci)}
    return mk(sft_ci, recall[0]), mk(bpo_ci, recall[1]), mk(ctl_ci, recall[0])


def test_headline_bpo_against_the_control(tmp_path):
    # the control ends below BPO in 2 of 3 seeds: the headline must say so, not "met"
    before, after, control = _arms((0.50, 0.52, 0.51), (0.49, 0.53, 0.50))
    out = write_report(str(tmp_path / "a"), chair_before=before, chair_after=after,
                       chair_control=control)
    md = open(out["report"]).read()
    # a plain two-sentence summary first, then the conditions
    summary, first = md.splitlines()[2], md.splitlines()[4]
    assert summary == ("Over 3 seeds, BPO lowered the share of hallucinated object mentions "
                       "(CHAIR-i) from 61.0% at the SFT start to 51.0% on average (lower in 3 "
                       "of 3 seeds), and the supervised control, trained on the same chosen "
                       "answers without the rejected ones, lowered it to 50.7%. Against the "
                       "control BPO won in 1, tied in 0 and lost in 2 of the 3 seeds, a mean "
                       "difference of +0.3 points (95% CI [-1.0, +1.0]), within the seed noise.")
    assert first.startswith("**The aim") and "is not met in this run" in first
    assert "BPO beat the control on CHAIR-i in 1 of 3 seeds" in first
    assert "the 95% CI of BPO minus the control on CHAIR-i does not exclude 0" in first
    assert "BPO beats the control on CHAIR-i in only 1 of 3 seeds; mean difference (BPO - " \
        "control) +0.3 [" in md and "within the seed noise" in md
    assert out["headline"][:3] == [summary, "", first]
    table = out["table"].splitlines()
    assert table[1].split()[:4] == ["seed", "SFT", "BPO", "control"]
    assert table[3].split()[:4] == ["0", "60.0", "50.0", "49.0"]
    cmp_ = json.load(open(out["summary_json"]))["compare"]["chair_i"]
    assert cmp_["bpo_vs_control"]["diffs"] == pytest.approx({"0": 0.01, "1": -0.01, "2": 0.01})
    assert cmp_["arms"]["control"]["mean"] == pytest.approx(0.50666, abs=1e-4)
    check_png(out["chair_plot"])
    # BPO below both in every seed, clearly, at no recall cost: met
    before, after, control = _arms((0.40, 0.42, 0.41), (0.50, 0.53, 0.51))
    out = write_report(str(tmp_path / "b"), chair_before=before, chair_after=after,
                       chair_control=control)
    md = open(out["report"]).read()
    assert "is met in this run" in md.splitlines()[4]
    assert "BPO beats the control on CHAIR-i in all 3 seeds" in md
    assert "outside the seed noise (the 95% CI excludes 0)" in md
    # ... but not at a recall loss of 3 points
    before, after, control = _arms((0.40, 0.42, 0.41), (0.50, 0.53, 0.51), recall=(0.70, 0.67))
    out = write_report(str(tmp_path / "c"), chair_before=before, chair_after=after,
                       chair_control=control)
    assert "is not met in this run: recall dropped by 3.0 points" in open(out["report"]).read()


def test_pope_in_the_report(tmp_path):
    before, after, control = _arms((0.40, 0.42, 0.41), (0.50, 0.53, 0.51))

    def res(prior_acc):
        return {"settings": {"prior": {"accuracy": prior_acc, "f1": prior_acc, "yes_ratio": 0.5},
                             "random": {"accuracy": 0.9, "f1": 0.9, "yes_ratio": 0.5}}}
    pope = {"before": {s: res(0.6) for s in range(3)},
            "after": {s: res(0.7 + 0.01 * s) for s in range(3)},
            "control": {s: res(0.72) for s in range(3)}}
    out = write_report(str(tmp_path), chair_before=before, chair_after=after,
                       chair_control=control, pope=pope)
    check_png(out["pope_plot"])
    md = open(out["report"]).read()
    # CHAIR-i beats the control, POPE prior accuracy does not (71 vs 72): not met
    assert "is not met in this run: BPO beat the control on POPE prior accuracy in 0 of 3" in md
    assert "| POPE prior accuracy | 60.0 [60.0, 60.0] | 71.0 [70.0, 72.0] | 72.0 [72.0, 72.0] " \
        "| +11.0 [+10.0, +12.0] | -1.0 [-2.0, +0.0] |" in md
    assert "![POPE of every arm per seed](pope.png)" in md
    with pytest.raises(TypeError, match="pope"):
        write_report(str(tmp_path), chair_before=before, chair_after=after, pope={"x": {}})


def test_stage_times_are_the_stages_own(tmp_path):
    ok = {"chair_i": 0.1, "chair_s": 0.1, "recall": 0.5}
    out = write_report(str(tmp_path), chair_before={3: ok}, chair_after={3: ok},
                       stage_times={3: {"world": 2.0, "sft": 601.4, "bpo": None}})
    md = open(out["report"]).read()
    assert "| world | 2s |" in md and "| sft | 601s |" in md and "| bpo | ? |" in md
    assert "| **all stages** | 603s+? |" in md
    assert out["table"].splitlines()[3].split()[0] == "3"       # the seed, not "run"
    summ = json.load(open(out["summary_json"]))
    assert summ["stage_times"]["3"]["sft"] == 601.4 and summ["stage_seconds_total"] is None
    with pytest.raises(TypeError, match="stage_times"):
        write_report(str(tmp_path), chair_before=ok, chair_after=ok, stage_times={3: 5})


def test_a_tie_on_the_page_is_a_tie(tmp_path):
    # seed 2: BPO 29.674 vs control 29.702, both printed 29.7: a tie, never a win (issue 22)
    before = {s: {"chair_i": 0.35, "chair_s": 0.5, "recall": 0.7} for s in range(3)}
    after = {0: 0.28, 1: 0.27, 2: 0.29674}
    control = {0: 0.30, 1: 0.30, 2: 0.29702}
    mk = lambda d: {s: {"chair_i": v, "chair_s": 0.5, "recall": 0.7} for s, v in d.items()}  # noqa: E731
    out = write_report(str(tmp_path), chair_before=before, chair_after=mk(after),
                       chair_control=mk(control))
    md = open(out["report"]).read()
    assert "\n2            35.0     29.7     29.7" in md                # printed as a tie
    assert "BPO won in 2, tied in 1 and lost in 0 of the 3 seeds" in md
    assert "BPO beat the control on CHAIR-i in 2 of 3 seeds (tied in 1)" in md.splitlines()[4]
    assert "BPO beats the control on CHAIR-i in only 2 of 3 seeds (tied in 1)" in md
    cmp_ = out["summary"]["compare"]["chair_i"]["bpo_vs_control"]
    assert (cmp_["n_below"], cmp_["n_equal"], cmp_["n_above"]) == (2, 1, 0)
    assert cmp_["diffs"]["2"] == pytest.approx(-0.00028)              # the raw difference kept


def _term_rows(n, seed, rpo=True, moving=0.0):
    rng = random.Random(seed)
    rows = []
    for i in range(1, n + 1):
        m = moving * i
        rows.append({"step": i, "loss": 0.7, "dpo_loss": math.log1p(math.exp(-0.3 * m)),
                     "nll": 0.6 - 0.001 * i, "reward_margin": 0.3 * m * 20,
                     "reward_accuracy": 0.5, "logratio_margin": 20 * m,
                     "logratio_margin_per_token": m, "grad_norm": 1.0,
                     "grad_norm_dpo": 0.2 + 0.01 * rng.random(),
                     "grad_norm_rpo": (1.0 + 0.01 * rng.random()) if rpo else 0.0,
                     "grad_cos_dpo_rpo": 0.4 if rpo else None, "lr": 1e-4})
    return rows


def test_paper_arm_quick_note_and_term_diagnostics(tmp_path):
    before, after, control = _arms((0.30, 0.31, 0.29), (0.32, 0.33, 0.31))
    paper = {s: {"chair_i": v, "chair_s": 0.5, "recall": 0.6} for s, v in enumerate((0.4, 0.41, 0.39))}
    out = write_report(
        str(tmp_path), chair_before=before, chair_after=after, chair_control=control,
        chair_paper=paper, quick=True,
        metrics={s: _term_rows(40, s, moving=0.001) for s in range(3)},
        paper_metrics={s: _term_rows(40, 10 + s, rpo=False, moving=0.01) for s in range(3)},
        objectives={"after": {"loss_type": "sigmoid_norm", "beta": 0.3, "rpo_alpha": 1.0},
                    "paper": {"loss_type": "sigmoid", "beta": 0.1, "rpo_alpha": None}},
        pope={arm: {s: {"settings": {"prior": {"accuracy": 0.6, "f1": 0.6, "yes_ratio": 0.5},
                                     "random": {"accuracy": 0.5, "f1": 0.5, "yes_ratio": 0.5}}}
                    for s in range(3)} for arm in ("before", "after", "paper", "control")})
    md = open(out["report"]).read()
    # a --quick report says in its first line that it only checks the pipeline
    assert md.splitlines()[0] == ("# BPO on the shapes world: a `--quick` run: it only checks "
                                  "that the pipeline runs, its numbers mean nothing")
    assert out["headline"][0].startswith("**This is a `--quick` run")
    # the paper's objective: an arm of the tables, with its differences
    assert out["table"].splitlines()[1].split()[:5] == ["seed", "SFT", "BPO", "paper", "control"]
    assert "| metric (%, mean [bootstrap 95% CI] over seeds) | SFT start | BPO | BPO, paper's " \
        "loss | control | BPO - SFT start | BPO - control | paper - control | BPO - paper |" in md
    assert "| CHAIR-i | 61.0 [60.0, 62.0] | 30.0 [29.0, 31.0] | 40.0 [39.0, 41.0] | 32.0 " \
        "[31.0, 33.0] | -31.0 [-32.0, -30.0] | -2.0 [-2.0, -2.0] | +8.0 [+8.0, +8.0] | " \
        "-10.0 [-10.0, -10.0] |" in md
    assert "BPO beats the paper's objective on CHAIR-i in all 3 seeds" in md
    assert "with the paper's loss (plain DPO, no NLL term) BPO reached 40.0% (+8.0 [+8.0, " \
        "+8.0] points against the control)" in md.splitlines()[4]
    # the DPO and RPO terms apart, from the numbers: gradient norms, margins, the loss argument
    diag = out["summary"]["diagnostics_text"]
    assert diag[0].startswith("- **BPO** (sigmoid_norm, beta 0.3, + 1 x chosen NLL (RPO)), "
                              "mean of 3 runs: the DPO loss went from 0.693 to 0.687")
    assert "ended at +0.77 nats per answer, +0.038 per token; the loss sees beta x margin per " \
        "token = +0.012, where -log sigmoid is 0.687 (ln 2 - x/2 while |x| is well below 1" \
        in diag[0]
    # a large argument: the exact value, no claim of the linear region
    assert "the loss sees beta x margin = +0.770, where -log sigmoid is 0.380;" in diag[1]
    assert "DPO term 0.206, RPO term 1.01 (4.9 x the DPO term's), cosine between them +0.40: " \
        "the RPO term does most of the training" in diag[0]
    assert diag[1].startswith("- **BPO, paper's loss** (sigmoid, beta 0.1, no NLL term)")
    assert "the gradient norm (the DPO term alone) averaged 0.2" in diag[1]
    assert "| BPO, paper's loss | 2 | 40 | 0.689 -> 0.637 | 0.598 -> 0.561 | +7.70 | +0.385 | " \
        "0.204 | - |  |" in md                                   # no RPO term: no norm
    for png in ("chair_plot", "pope_plot", "training_plot"):
        check_png(out[png])
    # sized to read at normal zoom (the old pope.png was 1.9k pixels wide)
    for png, width in (("chair_plot", 1100), ("pope_plot", 800), ("training_plot", 1400)):
        with Image.open(out[png]) as im:
            assert im.size[0] <= width, (png, im.size)


def test_readme_says_whether_the_effect_shrinks_on_fresh_seeds():
    from bpo_fast.demo.report import _against_selection

    def summ(mean, lo, hi, seeds):
        return {"seeds": seeds, "compare": {"chair_i": {"bpo_vs_control": {
            "mean": mean, "lo": lo, "hi": hi, "n": len(seeds)}}}}

    sel = summ(-0.009, -0.019, 0.001, [0, 1, 2, 3, 4])
    fresh = summ(-0.003, -0.012, 0.006, list(range(100, 110)))
    txt = _against_selection(fresh, sel, "bpo-fast demo")
    assert txt.startswith("On the seeds the settings were chosen on (`bpo-fast demo --seeds "
                          "0,1,2,3,4`: the same settings, scored on the held-out images) BPO - "
                          "control on CHAIR-i was -0.9 [-1.9, +0.1] points; on this run's fresh "
                          "seeds it is -0.3 [-1.2, +0.6]: **the effect shrinks on fresh seeds**")
    gone = _against_selection(summ(0.004, -0.003, 0.01, [100, 101]), sel, "x")
    assert "**the effect is gone on fresh seeds**" in gone
    same = _against_selection(summ(-0.012, -0.02, -0.004, [100, 101]), sel, "x")
    assert same.endswith("-1.2 [-2.0, -0.4]: the effect does not shrink on fresh seeds.")
