"""`bpo-fast demo --quick` end to end: world, SFT, pairs, DPO, CHAIR, report."""

import json
import os

import pytest
from PIL import Image

from bpo_fast.cli import main


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    rc = main(["demo", "--quick", "--out", str(out), "--seed", "3"])
    return rc, str(out)


def test_quick_demo_runs_end_to_end(quick_demo, capsys):
    rc, out = quick_demo
    assert rc == 0
    for name in ("report.md", "chair.png", "training.png", "summary.json", "demo_config.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    for png in ("chair.png", "training.png"):
        with Image.open(os.path.join(out, png)) as im:
            im.verify()
    seed_dir = os.path.join(out, "seed3")
    # every stage left its artefact, through the same code paths a user runs
    assert os.path.isfile(os.path.join(seed_dir, "sft_model", "config.json"))
    assert os.path.isfile(os.path.join(seed_dir, "bpo_model", "config.json"))
    assert os.path.isfile(os.path.join(seed_dir, "control_model", "config.json"))
    with open(os.path.join(seed_dir, "pairs", "pairs.jsonl")) as f:
        pairs = [json.loads(line) for line in f]
    assert {p["strategy"] for p in pairs} == {"image_weakened", "error_injection"}
    assert {p["injector"] for p in pairs if p["strategy"] == "error_injection"} == {"rules"}
    with open(os.path.join(seed_dir, "bpo_model", "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    assert metrics and all(m["loss"] == m["loss"] for m in metrics)  # no NaN
    # the DPO and RPO terms apart: their values, margins in nats, their gradient norms
    assert all(m["grad_norm_dpo"] > 0 and m["grad_norm_rpo"] > 0 and m["nll"] > 0
               and "logratio_margin_per_token" in m for m in metrics)
    # the paper's objective: plain DPO (sigmoid, beta 0.1, no NLL term) on the same pairs
    with open(os.path.join(seed_dir, "paper_model", "train_config.json")) as f:
        paper = json.load(f)
    assert (paper["loss_type"], paper["beta"], paper["rpo_alpha"]) == ("sigmoid", 0.1, None)
    with open(os.path.join(seed_dir, "paper_model", "metrics.jsonl")) as f:
        assert all(json.loads(line)["grad_norm_rpo"] == 0 for line in f)
    report = open(os.path.join(out, "report.md")).read()
    assert "CHAIR" in report and "recall" in report.lower()
    assert "supervised-only control" in report           # what the pairs add over more SFT
    lines = report.splitlines()
    # --quick says in its first line that it only checks the pipeline; then the plain summary
    assert "`--quick` run: it only checks that the pipeline runs" in lines[0]
    assert lines[4].startswith("In its one seed, BPO ")
    assert lines[6].startswith("**The aim (BPO below the SFT start and the control")
    # which seeds were used for what: seed 3 is one of the selection seeds
    assert "**seed 3 chose the settings** (the settings were chosen on the validation split " \
        "of seeds 0-4" in report
    assert "## DPO training: the two terms of the loss" in report
    assert "- **BPO** (sigmoid_norm, beta 0.3, + 1 x chosen NLL (RPO)), mean of 1 run: " in report
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert set(summary["compare"]["chair_i"]["arms"]) == {"before", "after", "paper", "control"}
    assert summary["compare"]["chair_i"]["bpo_vs_control"]["n"] == 1
    assert summary["compare"]["chair_i"]["bpo_vs_paper"]["n"] == 1
    assert set(summary["stage_times"]["3"]) >= {"world", "pretrain", "sft", "pairs", "bpo",
                                                 "paper", "control"}
    assert all(v is not None and v >= 0 for v in summary["stage_times"]["3"].values())
    # the POPE probe of every arm: greedy yes/no answers to the held-out images' questions
    assert "POPE prior accuracy" in summary["compare"]
    assert set(summary["compare"]["POPE prior accuracy"]["arms"]) == {"before", "after", "paper",
                                                                       "control"}
    with Image.open(os.path.join(out, "pope.png")) as im:
        im.verify()
    with open(os.path.join(seed_dir, "pope_after.jsonl")) as f:
        answers = [json.loads(line) for line in f]
    assert answers and all(a["question_id"].split(":")[1] in ("present", "random", "prior")
                           for a in answers)
    assert {a["question_id"].split(":")[1] for a in answers} == {"present", "random", "prior"}
    table = open(os.path.join(out, "report.md")).read()
    assert "\n3 " in table and "\nrun " not in table          # the one-seed row is the seed


def test_quick_demo_reuses_finished_stages(quick_demo):
    rc, out = quick_demo
    seed_dir = os.path.join(out, "seed3")
    before = os.path.getmtime(os.path.join(seed_dir, "bpo_model", "metrics.jsonl"))
    first = json.load(open(os.path.join(out, "summary.json")))["stage_times"]
    assert main(["demo", "--quick", "--out", out, "--seed", "3"]) == 0
    assert os.path.getmtime(os.path.join(seed_dir, "bpo_model", "metrics.jsonl")) == before
    # the reused stages report the times of the run that computed them
    assert json.load(open(os.path.join(out, "summary.json")))["stage_times"] == first


def _mtimes(seed_dir, names):
    return {n: os.path.getmtime(os.path.join(seed_dir, n)) for n in names}


def test_demo_takes_bpo_stage_settings_and_reuses_the_rest(quick_demo, tmp_path, capsys):
    """--beta/--loss-type/... (or --config): the BPO arm and what follows it run again, every
    earlier stage, the paper arm and the control are reused."""
    import shutil

    _, first = quick_demo
    out = str(tmp_path / "demo")
    shutil.copytree(first, out)
    seed_dir = os.path.join(out, "seed3")
    upstream = ["world/world.json", "pretrain_model/pretrain.done", "sft_model/sft.done",
                "pairs/pairs.jsonl.done", "captions_before.jsonl", "paper_model/bpo.done",
                "captions_paper.jsonl", "control_model/control.done", "captions_control.jsonl"]
    kept = _mtimes(seed_dir, upstream)
    bpo = _mtimes(seed_dir, ["bpo_model/bpo.done", "captions_after.jsonl"])
    # the README's command, on the quick world of the first run
    import shlex

    from readme_blocks import block

    argv = shlex.split(block("demo-settings"))
    assert argv[:2] == ["bpo-fast", "demo"] and "--out" in argv
    argv = argv[1:]
    argv[argv.index("--out") + 1] = out
    assert main(argv + ["--quick", "--seed", "3"]) == 0
    assert _mtimes(seed_dir, upstream) == kept
    assert all(t > bpo[k] for k, t in _mtimes(seed_dir, list(bpo)).items())
    with open(os.path.join(seed_dir, "bpo_model", "train_config.json")) as f:
        tc = json.load(f)
    assert (tc["beta"], tc["loss_type"], tc["rpo_alpha"]) == (0.5, "sigmoid_norm", 0.5)
    bpo = _mtimes(seed_dir, list(bpo))
    # a --config file of the same options; the command line wins over it
    config = tmp_path / "bpo.json"
    config.write_text(json.dumps({"beta": 0.5, "loss-type": "sigmoid", "rpo_alpha": 0.5}))
    capsys.readouterr()
    assert main(["demo", "--quick", "--out", out, "--seed", "3", "--config", str(config),
                 "--beta", "0.7"]) == 0                     # the command line wins
    printed = [line for line in capsys.readouterr().out.splitlines()
               if line.strip() and not line.startswith("[demo ")]   # the report, not the log
    assert printed[0].startswith("This is a `--quick` run: it only checks that the pipeline runs")
    assert _mtimes(seed_dir, upstream) == kept
    assert all(t > bpo[k] for k, t in _mtimes(seed_dir, list(bpo)).items())
    with open(os.path.join(seed_dir, "bpo_model", "train_config.json")) as f:
        tc = json.load(f)
    assert (tc["beta"], tc["loss_type"], tc["rpo_alpha"]) == (0.7, "sigmoid", 0.5)
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["settings"]["DPO"].startswith("sigmoid, beta 0.7, lr 0.0001")
    assert summary["objectives"]["after"] == {"loss_type": "sigmoid", "beta": 0.7,
                                              "rpo_alpha": 0.5}
    # the demo's objective set to the paper's: no second, identical arm
    assert main(["demo", "--quick", "--out", out, "--seed", "3", "--loss-type", "sigmoid",
                 "--beta", "0.1", "--rpo-alpha", "0"]) == 0
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert "paper" not in summary["arms"]
    assert summary["settings"]["paper's objective"].startswith("not run (the BPO arm's")


def test_demo_bad_arguments(tmp_path, capsys):
    assert main(["demo", "--seeds", "0,x", "--out", str(tmp_path)]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert main(["demo", "--seeds", "0,1", "--seed", "2", "--out", str(tmp_path)]) == 2
    assert "--seed/--seeds" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--device", "tpu"])
    # BPO-stage settings are checked before any stage runs
    assert main(["demo", "--beta", "-1", "--out", str(tmp_path)]) == 2
    assert "--loss-type/--beta" in capsys.readouterr().err
    assert main(["demo", "--loss-type", "exo_pair", "--out", str(tmp_path)]) == 2
    assert "--loss-type/--beta" in capsys.readouterr().err
    assert main(["demo", "--rpo-alpha", "-2", "--out", str(tmp_path)]) == 2
    assert "--rpo-alpha" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--epochs", "0"])
    bad = tmp_path / "c.json"
    bad.write_text('{"beta": 0.5, "model": "x"}')
    assert main(["demo", "--config", str(bad), "--out", str(tmp_path)]) == 2
    assert "unknown option(s) ['model']" in capsys.readouterr().err
    assert not any(n.startswith("seed") for n in os.listdir(tmp_path))


def test_report_seeds_are_never_selection_seeds(tmp_path, capsys):
    """The demo reports on seeds no choice looked at; choosing (the validation split) refuses
    them, in the pipeline and in the investigation tool, before anything runs."""
    from bench import demo_investigation as inv
    from bpo_fast.demo.pipeline import (REPORT_SEEDS, SELECTION_SEEDS, DemoConfig,
                                        check_selection_seeds, run_seed)

    assert not set(REPORT_SEEDS) & set(SELECTION_SEEDS) and len(REPORT_SEEDS) == 10
    assert DemoConfig().seeds == REPORT_SEEDS and DemoConfig.quick().seeds[0] in REPORT_SEEDS
    check_selection_seeds(SELECTION_SEEDS)
    cfg = DemoConfig(out=str(tmp_path / "inv"), score_split="val")
    with pytest.raises(ValueError, match=r"seeds: \[104\] are the demo's report seeds"):
        run_seed(cfg, 104)
    assert not os.path.exists(tmp_path / "inv")
    with pytest.raises(SystemExit) as e:
        inv.main(["--name", "x", "--seeds", "0,101", "--root", str(tmp_path),
                  "--results", str(tmp_path / "r.jsonl")])
    assert e.value.code == 2 and "[101] are the demo's report seeds" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
    # every run in the investigation record used selection seeds only
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "docs", "demo-investigation.jsonl"), encoding="utf-8") as f:
        used = {s for line in f if line.strip() for s in json.loads(line)["seeds"]}
    assert used and used <= set(SELECTION_SEEDS)


def test_readme_section_is_generated_from_the_demo_folder(quick_demo, tmp_path, capsys):
    from bpo_fast.demo import report as R

    _, out = quick_demo
    readme = tmp_path / "README.md"
    readme.write_text(f"# intro\n\n{R.README_BEGIN}\nstale numbers\n{R.README_END}\n\n## after\n")
    assert R.main(["--readme", str(readme), out, "--wall-time", "1 min 2 s"]) == 0
    text = readme.read_text()
    assert "stale numbers" not in text and text.startswith("# intro") and "## after" in text
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["headline"][0] in text                  # the headline, from the numbers
    assert "measured wall time 1 min 2 s" in text
    assert "\n3 " in text                                   # the seed's row of the table
    from readme_blocks import blocks

    assert [b.marker for b in blocks(str(readme))] == [{"id": "demo-table", "output": True}]
    assert "| BPO - control |" in text.replace("BPO - SFT start | ", "")
    assert "(docs/demo_chair.png)" in text and "(docs/demo_pope.png)" in text
    for name in ("demo_chair.png", "demo_pope.png"):
        with Image.open(tmp_path / "docs" / name) as im:
            im.verify()
    # rerunning gives the same README
    assert R.main(["--readme", str(readme), out, "--wall-time", "1 min 2 s"]) == 0
    assert readme.read_text() == text
    # a README without the markers, or a folder that is no demo: one-line error, exit 2
    bare = tmp_path / "bare.md"
    bare.write_text("# no markers\n")
    assert R.main(["--readme", str(bare), out]) == 2
    assert "markers" in capsys.readouterr().err
    assert R.main(["--readme", str(readme), str(tmp_path)]) == 2
    assert "not a finished demo folder" in capsys.readouterr().err


def test_repository_readme_has_the_generated_demo_section():
    from bpo_fast.demo import report as R

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "README.md"), encoding="utf-8").read()
    assert text.count(R.README_BEGIN) == 1 and text.count(R.README_END) == 1
    assert text.index(R.README_BEGIN) < text.index(R.README_END)
