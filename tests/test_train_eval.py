"""Evaluation during training, trackers and the best checkpoint (issue 16)."""

import json
import os
import shutil

import pytest

from bpo_fast.train import TrainConfig, train
from bpo_fast.train.eval import parse_eval_sets, resolve_best_metric
from bpo_fast.train.synthetic import make_pairs


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("train_pairs"))
    train_path = make_pairs(root, n=8, seed=5)
    eval_root = str(tmp_path_factory.mktemp("eval_pairs"))
    val = make_pairs(eval_root, n=4, seed=11, name="val.jsonl")
    # object annotations for CHAIR: the square's colour as an object ("red square"), as a
    # captioning set would carry them
    recs = [json.loads(line) for line in open(val)]
    for r in recs:
        r["objects"] = [r["chosen"].split()[3] + " square"]
    with open(val, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    hard = make_pairs(eval_root, n=3, seed=12, name="hard.jsonl")  # no objects
    return train_path, root, val, hard, eval_root


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _argv(tiny, sets, out, *extra):
    train_path, root, val, hard, eval_root = sets
    return ["train", "--model", tiny, "--data", train_path, "--image-root", root,
            "--output", str(out), "--batch-size", "2", "--max-length", "64", "--lr", "2e-3",
            "--warmup-steps", "0", "--no-progress", "--device", "cpu", *extra]


def test_eval_samples_chair_tensorboard_and_best(tiny_llava_dir, sets, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from bpo_fast.cli import main

    _, _, val, hard, eval_root = sets
    out = tmp_path / "run"
    rc = main(_argv(tiny_llava_dir, sets, out, "--max-steps", "4", "--eval-data",
                    f"val={val},hard={hard}", "--eval-image-root", eval_root, "--eval-every",
                    "2", "--eval-generate", "4", "--eval-max-new-tokens", "6", "--eval-chair",
                    "--report-to", "tensorboard", "--save-best", "eval_val/loss",
                    "--eval-batch-size", "3"))
    assert rc == 0
    rows = _metrics(str(out))
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if any(k.startswith("eval_") for k in r)]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert [r["step"] for r in eval_rows] == [2, 4]
    for r in train_rows:
        assert r["samples_per_s"] > 0 and r["tokens_per_s"] > 0 and r["peak_mem_bytes"] > 0
        assert r["grad_norm"] > 0
    for r in eval_rows:
        for s in ("val", "hard"):
            for k in ("loss", "dpo_loss", "reward_chosen", "reward_rejected", "reward_margin",
                      "reward_accuracy", "logps_chosen", "logps_rejected"):
                assert isinstance(r[f"eval_{s}/{k}"], float), (s, k)
            assert r[f"eval_{s}/reward_margin"] == pytest.approx(
                r[f"eval_{s}/reward_chosen"] - r[f"eval_{s}/reward_rejected"], abs=1e-6)
            assert 0 <= r[f"eval_{s}/reward_accuracy"] <= 1
            assert r[f"eval_{s}/logps_chosen"] < 0
        # CHAIR on the set with objects only
        assert 0 <= r["eval_val/chair_s"] <= 1 and 0 <= r["eval_val/chair_recall"] <= 1
        assert not any(k.startswith("eval_hard/chair") for k in r)
    # the policy moved between the two evaluations
    assert eval_rows[0]["eval_val/loss"] != eval_rows[1]["eval_val/loss"]
    # samples: 4 per set (val has 4 pairs, hard 3) per evaluation
    samples = [json.loads(line) for line in open(out / "eval_samples.jsonl")]
    assert len(samples) == 2 * (4 + 3)
    assert {(x["step"], x["set"]) for x in samples} == {(2, "val"), (4, "val"), (2, "hard"),
                                                          (4, "hard")}
    assert all(isinstance(x["answer"], str) and x["prompt"] and x["id"] for x in samples)
    # the best checkpoint by eval_val/loss: exactly one, where the loss was lowest
    best_step = min(eval_rows, key=lambda r: r["eval_val/loss"])["step"]
    bests = sorted(n for n in os.listdir(out) if n.startswith("best-"))
    assert bests == [f"best-{best_step}"]
    assert os.path.isfile(out / bests[0] / "manifest.json")
    st = json.load(open(out / "checkpoint-4" / "trainer_state.json"))
    assert st["best"]["step"] == best_step and st["best"]["mode"] == "min"
    assert st["best"]["value"] == pytest.approx(
        min(r["eval_val/loss"] for r in eval_rows))
    # TensorBoard: read the event file back
    tb = out / "tensorboard"
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"train/loss", "train/grad_norm", "train/lr", "train/tokens_per_s",
            "train/samples_per_s", "train/peak_mem_bytes", "eval_val/loss",
            "eval_val/reward_accuracy", "eval_hard/reward_margin",
            "eval_val/chair_s"} <= set(tags["scalars"])
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in train_rows], rel=1e-6)
    ev = acc.Scalars("eval_val/loss")
    assert [e.step for e in ev] == [2, 4]
    assert any("samples" in t for t in tags["tensors"])  # add_text lands as a tensor summary


def test_eval_resume_keeps_best_and_drops_later_lines(tiny_llava_dir, sets, tmp_path):
    from bpo_fast.cli import main

    _, _, val, hard, eval_root = sets
    common = ("--eval-data", f"val={val}", "--eval-image-root", eval_root, "--eval-every", "1",
              "--eval-generate", "1", "--eval-max-new-tokens", "3",
              "--save-best", "reward_accuracy", "--save-every", "2", "--max-steps", "3")
    full = tmp_path / "full"
    assert main(_argv(tiny_llava_dir, sets, full, *common)) == 0
    ref = _metrics(str(full))
    # interrupted after step 3's lines were written, checkpoint-2 the newest complete one
    part = tmp_path / "part"
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoint-3")
    assert main(_argv(tiny_llava_dir, sets, part, *common, "--resume")) == 0
    got = _metrics(str(part))
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    for a, b in zip(ref, got):
        for k in set(a) - {"tokens_per_s", "samples_per_s", "peak_mem_bytes"}:
            assert a[k] == pytest.approx(b[k], abs=1e-6), k
    samples = [json.loads(line) for line in open(part / "eval_samples.jsonl")]
    assert [x["step"] for x in samples] == [1, 2, 3]
    assert json.load(open(part / "checkpoint-3" / "trainer_state.json"))["best"] == \
        json.load(open(full / "checkpoint-3" / "trainer_state.json"))["best"]
    assert sorted(n for n in os.listdir(part) if n.startswith("best-")) == \
        sorted(n for n in os.listdir(full) if n.startswith("best-"))


def test_eval_options_are_checked(tiny_llava_dir, sets, tmp_path, capsys):
    from bpo_fast.cli import main

    _, _, val, hard, eval_root = sets
    assert parse_eval_sets(["a=x.jsonl,b=y.jsonl", "dir/z.jsonl"]) == [
        ("a", "x.jsonl"), ("b", "y.jsonl"), ("z", "dir/z.jsonl")]
    with pytest.raises(ValueError, match="given twice"):
        parse_eval_sets(["a=x.jsonl", "a=y.jsonl"])
    sets2 = [("val", "v"), ("hard", "h")]
    assert resolve_best_metric("eval_val/reward_accuracy", sets2) == (
        "eval_val/reward_accuracy", "max")
    assert resolve_best_metric("eval_hard/loss", sets2) == ("eval_hard/loss", "min")
    assert resolve_best_metric("loss", sets2[:1], "max") == ("eval_val/loss", "max")
    with pytest.raises(ValueError, match="ambiguous"):
        resolve_best_metric("loss", sets2)
    with pytest.raises(ValueError, match="no eval set 'x'"):
        resolve_best_metric("eval_x/loss", sets2)
    with pytest.raises(ValueError, match="--eval-chair"):
        resolve_best_metric("eval_val/chair_i", sets2)
    cases = [
        (("--eval-every", "2"), "eval_data"),
        (("--eval-data", f"val={val}", "--eval-chair"), "eval_generate"),
        (("--eval-data", f"val={tmp_path}/nope.jsonl"), "eval_data"),
        (("--eval-data", f"val={val}", "--save-best", "eval_val/bogus"), "save_best"),
        # no eval set with objects on the generated pairs
        (("--eval-data", f"hard={hard}", "--eval-image-root", eval_root, "--eval-generate", "1",
          "--eval-chair"), "eval_chair"),
    ]
    for extra, name in cases:
        rc = main(_argv(tiny_llava_dir, sets, tmp_path / "bad", "--max-steps", "1", *extra))
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and name in err[0], (extra, err)


def test_wandb_offline(tiny_llava_dir, sets, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    train_path, root, val, hard, eval_root = sets
    res = train(TrainConfig(model=tiny_llava_dir, data=train_path, image_root=root,
                            output=str(tmp_path / "w"), batch_size=2, device="cpu", max_length=64,
                            max_steps=1, progress=False, report_to="wandb"))
    assert res["steps"] == 1 and os.path.isdir(tmp_path / "w" / "wandb")


def test_eval_with_lora_reference(tiny_llava_dir, sets, tmp_path):
    """LoRA: the eval reference is the policy with its adapters off, samples come from the
    PeftModel; at step 0-like weights (lr 0) policy == reference, so the eval loss is log 2."""
    train_path, root, val, hard, eval_root = sets
    res = train(TrainConfig(model=tiny_llava_dir, data=train_path, image_root=root,
                            output=str(tmp_path / "lora"), batch_size=2, device="cpu",
                            max_length=64, max_steps=1, progress=False, lora_r=4,
                            learning_rate=0.0, warmup_steps=0, eval_data=[f"val={val}"],
                            eval_image_root=eval_root, eval_generate=2, eval_max_new_tokens=3))
    ev = [r for r in res["history"] if "eval_val/loss" in r]
    assert len(ev) == 1 and ev[0]["eval_val/loss"] == pytest.approx(0.693147, abs=1e-5)
    assert ev[0]["eval_val/reward_margin"] == pytest.approx(0.0, abs=1e-6)
    lines = open(tmp_path / "lora" / "eval_samples.jsonl").read().splitlines()
    assert len(lines) == 2
