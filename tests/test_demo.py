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
    report = open(os.path.join(out, "report.md")).read()
    assert "CHAIR" in report and "recall" in report.lower()
    assert "supervised-only control" in report           # what the pairs add over more SFT
    assert report.splitlines()[2].startswith("**The aim (BPO below the SFT start and the control")
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert set(summary["compare"]["chair_i"]["arms"]) == {"before", "after", "control"}
    assert summary["compare"]["chair_i"]["bpo_vs_control"]["n"] == 1
    assert set(summary["stage_times"]["3"]) >= {"world", "pretrain", "sft", "pairs", "bpo",
                                                 "control"}
    assert all(v is not None and v >= 0 for v in summary["stage_times"]["3"].values())
    # the POPE probe of every arm: greedy yes/no answers to the held-out images' questions
    assert "POPE prior accuracy" in summary["compare"]
    assert set(summary["compare"]["POPE prior accuracy"]["arms"]) == {"before", "after", "control"}
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


def test_demo_bad_arguments(tmp_path, capsys):
    assert main(["demo", "--seeds", "0,x", "--out", str(tmp_path)]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert main(["demo", "--seeds", "0,1", "--seed", "2", "--out", str(tmp_path)]) == 2
    assert "--seed/--seeds" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--device", "tpu"])


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
