"""Checkpoints you can trust: a damaged newest checkpoint is named and skipped, the run resumes
from the newest good one and loses nothing (the losses equal an uninterrupted run's)."""

import json
import os
import shutil

import pytest

from bpo_fast.cli import main
from bpo_fast.train import TrainConfig, train
from bpo_fast.train.synthetic import make_pairs
from bpo_fast.train.trainer import verify_checkpoint


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ckpt_pairs"))
    return make_pairs(root, n=8, seed=5), root


def _cfg(model, data, out, **kw):
    path, root = data
    base = dict(model=model, data=path, image_root=root, output=str(out), batch_size=2,
                device="cpu", max_length=64, learning_rate=2e-3, warmup_steps=0, progress=False,
                seed=0, max_steps=4, save_every=2)
    base.update(kw)
    return TrainConfig(**base)


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def full_run(tiny_llava_dir, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt_full")
    train(_cfg(tiny_llava_dir, data, out))
    return str(out)


def _truncate(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


def _optimizer_shard(ckpt):
    shards = [n for n in os.listdir(os.path.join(ckpt, "optimizer")) if n.endswith(".distcp")]
    return os.path.join("optimizer", sorted(shards)[0])


@pytest.mark.parametrize("victim", ["trainable.safetensors", "trainer_state.json", "optimizer",
                                    "rng_0.pt", "manifest.json"])
def test_damaged_newest_checkpoint_falls_back_and_loses_nothing(tiny_llava_dir, data, full_run,
                                                                tmp_path, caplog, victim):
    ref = _metrics(full_run)
    out = tmp_path / "run"
    shutil.copytree(full_run, out)
    ckpt = str(out / "checkpoint-4")
    assert verify_checkpoint(ckpt) is None
    rel = _optimizer_shard(ckpt) if victim == "optimizer" else victim
    if victim == "manifest.json":
        os.remove(os.path.join(ckpt, rel))
    else:
        _truncate(os.path.join(ckpt, rel))
    assert verify_checkpoint(ckpt) is not None
    with caplog.at_level("WARNING", logger="bpo_fast"):
        res = train(_cfg(tiny_llava_dir, data, out, resume=True))
    assert "checkpoint-4" in caplog.text and "falling back" in caplog.text
    assert res["steps"] == 4
    got = _metrics(str(out))
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(got, ref):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    assert verify_checkpoint(ckpt) is None    # rewritten whole


def test_resume_names_a_damaged_checkpoint(tiny_llava_dir, data, full_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(full_run, out)
    for c in ("checkpoint-2", "checkpoint-4"):
        _truncate(str(out / c / "trainable.safetensors"))
    path, root = data
    argv = ["train", "--model", tiny_llava_dir, "--data", path, "--image-root", root,
            "--output", str(out), "--max-steps", "4", "--batch-size", "2", "--max-length", "64",
            "--no-progress", "--device", "cpu", "--resume"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "checkpoint-2" in err and "checkpoint-4" in err and "trainable.safetensors" in err
    assert main(argv[:-1] + ["--resume", str(out / "checkpoint-4")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "checkpoint-4" in err and "damaged" in err


def test_checkpoint_is_written_with_a_manifest(full_run):
    for c in ("checkpoint-2", "checkpoint-4"):
        m = json.load(open(os.path.join(full_run, c, "manifest.json")))
        assert {"trainable.safetensors", "trainer_state.json", "scheduler.pt",
                "rng_0.pt"} <= set(m["files"])
        assert any(k.startswith("optimizer" + os.sep) for k in m["files"])
    assert not any(n.endswith(".tmp") for n in os.listdir(full_run))


@pytest.fixture
def nan_at_call(monkeypatch):
    """Make the loss of the n-th forward call NaN (what a diverging step looks like)."""
    from bpo_fast.models.preference import PreferenceModel

    orig = PreferenceModel.forward
    state = {"calls": 0, "at": None}

    def forward(self, *a, **kw):
        out = orig(self, *a, **kw)
        state["calls"] += 1
        if state["calls"] == state["at"]:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(PreferenceModel, "forward", forward)
    return state


def test_nonfinite_loss_stops_naming_the_records(tiny_llava_dir, data, tmp_path, nan_at_call,
                                                 capsys):
    nan_at_call["at"] = 3     # step 2's first micro-batch (grad_accum 2)
    path, root = data
    rc = main(["train", "--model", tiny_llava_dir, "--data", path, "--image-root", root,
               "--output", str(tmp_path / "o"), "--batch-size", "2", "--grad-accum", "2",
               "--max-steps", "3", "--max-length", "64", "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and "step 2: non-finite loss" in err and "pair-" in err, err
    assert "--on-nonfinite skip" in err


def test_nonfinite_step_is_skipped_and_grad_norm_logged(tiny_llava_dir, data, tmp_path,
                                                        nan_at_call, caplog):
    import math

    nan_at_call["at"] = 2
    with caplog.at_level("WARNING", logger="bpo_fast"):
        res = train(_cfg(tiny_llava_dir, data, tmp_path / "o", max_steps=3, save_every=0,
                         on_nonfinite="skip"))
    assert res["skipped_steps"] == 1 and res["steps"] == 3
    assert "step 2: non-finite loss" in caplog.text and "pair-" in caplog.text
    rows = _metrics(str(tmp_path / "o"))
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0
               for r in rows)


def test_sigkill_mid_run_then_resume_loses_nothing(tiny_llava_dir, data, full_run, tmp_path):
    """A real kill (SIGKILL) of `bpo-fast train` after its first checkpoint, then --resume: the
    metrics of every step equal those of the uninterrupted run."""
    import signal
    import subprocess
    import sys
    import time

    path, root = data
    out = tmp_path / "killed"
    argv = [sys.executable, "-m", "bpo_fast.cli", "train", "--model", tiny_llava_dir,
            "--data", path, "--image-root", root, "--output", str(out), "--batch-size", "2",
            "--max-length", "64", "--lr", "2e-3", "--warmup-steps", "0", "--max-steps", "4",
            "--save-every", "2", "--no-progress", "--device", "cpu"]     # as full_run's
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoint-2").exists() and proc.poll() is None:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run(argv + ["--resume"], env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    got, want = _metrics(str(out)), _metrics(full_run)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(got, want):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert all(verify_checkpoint(str(out / f"checkpoint-{s}")) is None for s in (2, 4))


def test_nonfinite_skips_in_a_row_stop_at_the_limit_naming_the_records(tiny_llava_dir, data,
                                                                       tmp_path, monkeypatch,
                                                                       capsys):
    """Weights that hold NaN make every step non-finite: `--on-nonfinite skip` used to skip
    forever (a skipped step does not advance the loop); it stops after the limit, exit 2."""
    from bpo_fast.models.preference import PreferenceModel

    orig = PreferenceModel.forward

    def forward(self, *a, **kw):
        out = orig(self, *a, **kw)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(PreferenceModel, "forward", forward)
    path, root = data
    rc = main(["train", "--model", tiny_llava_dir, "--data", path, "--image-root", root,
               "--output", str(tmp_path / "o"), "--batch-size", "2", "--max-steps", "3",
               "--max-length", "64", "--no-progress", "--device", "cpu",
               "--on-nonfinite", "skip", "--nonfinite-skip-limit", "5"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2, err
    assert "5 steps in a row after step 0 had a non-finite loss" in err, err
    assert err.count("pair-") == 10 and "nonfinite_skip_limit 5" in err, err   # 5 steps x 2


def _resume_argv(model, data, out, *extra):
    path, root = data
    return ["train", "--model", model, "--data", path, "--image-root", root, "--output", str(out),
            "--batch-size", "2", "--max-length", "64", "--lr", "2e-3", "--warmup-steps", "0",
            "--max-steps", "4", "--save-every", "2", "--no-progress", "--device", "cpu",
            "--resume", *extra]


def test_resume_with_settings_that_change_the_run_is_refused_naming_each(
        tiny_llava_dir, data, full_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(full_run, out)
    shutil.rmtree(out / "checkpoint-4")
    argv = _resume_argv(tiny_llava_dir, data, out)
    changed = argv[:]
    changed[changed.index("--batch-size") + 1] = "4"
    changed[changed.index("--lr") + 1] = "1e-3"
    assert main(changed) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "batch_size 2 -> 4" in err and "learning_rate 0.002 -> 0.001" in err, err
    assert "--resume-with-changes" in err and "checkpoint-2" in err, err
    # other pairs (a file edited, or another one): refused by content
    path, root = data
    edited = tmp_path / "edited.jsonl"
    lines = open(path).read().splitlines()
    edited.write_text("\n".join(lines[1:]) + "\n")
    other = argv[:]
    other[other.index("--data") + 1] = str(edited)
    assert main(other) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "data 8 pairs" in err and "-> 7 pairs" in err, err
    # the same pairs in a moved file are the same data: resumed, equal to the uninterrupted run
    moved = tmp_path / "moved.jsonl"
    shutil.copy(path, moved)
    same = argv[:]
    same[same.index("--data") + 1] = str(moved)
    assert main(same) == 0, capsys.readouterr().err
    for a, b in zip(_metrics(str(out)), _metrics(full_run)):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)


def test_resume_with_changes_when_asked(tiny_llava_dir, data, full_run, tmp_path, caplog):
    out = tmp_path / "run"
    shutil.copytree(full_run, out)
    argv = _resume_argv(tiny_llava_dir, data, out, "--resume-with-changes")
    argv[argv.index("--max-steps") + 1] = "5"      # one more step
    with caplog.at_level("WARNING", logger="bpo_fast"):
        assert main(argv) == 0
    assert "schedule 4 steps (warmup 0) -> 5 steps (warmup 0)" in caplog.text
    assert [r["step"] for r in _metrics(str(out))] == [1, 2, 3, 4, 5]
