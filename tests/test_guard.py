"""What a command may touch (bpo_fast.errors.CommandGuard): an output never writes over an input,
two runs never share an output, Ctrl-C and a full disk end in one line that says what is kept,
and the run resumes to the result of an uninterrupted one."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from bpo_fast.cli import main
from bpo_fast.train.synthetic import make_pairs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT)
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _argv(cmd, **opts):
    return [cmd] + [x for k, v in opts.items() if v is not False
                    for x in ((k,) if v is None else (k, str(v)))]


def _one_line(capsys):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    return err.splitlines()[-1]


def _bytes(paths):
    return {p: open(p, "rb").read() for p in paths}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("guard")
    d = {"root": str(root)}
    d["pairs"] = make_pairs(str(root / "data"), n=8, seed=5)
    d["images"] = str(root / "data")
    conv = [{"from": "human", "value": "<image>\nwhat is it ?"}]
    colors = ("red", "blue", "green", "yellow")
    with open(root / "llava.jsonl", "w") as f:
        for i in range(3000):
            c = conv + [{"from": "gpt", "value": f"a {colors[i % 4]} square and {i % 7} dogs ."}]
            f.write(json.dumps({"id": f"r{i}", "image": "img.png", "conversations": c}) + "\n")
    from PIL import Image

    Image.new("RGB", (8, 8), (200, 10, 10)).save(root / "img.png")
    d["llava"] = str(root / "llava.jsonl")
    (root / "caps.jsonl").write_text('{"id": "1", "caption": "A man with a dog."}\n')
    (root / "gt.jsonl").write_text('{"id": "1", "objects": ["person", "dog"]}\n')
    d["caps"], d["gt"] = str(root / "caps.jsonl"), str(root / "gt.jsonl")
    return d


# --------------------------------------------------------------------------------------------
# an output never writes over an input
# --------------------------------------------------------------------------------------------

def _model_copy(tiny_llava_dir, tmp_path):
    m = str(tmp_path / "model")
    shutil.copytree(tiny_llava_dir, m)
    return m


def _train(f, m, out, **kw):
    return _argv("train", **{"--model": m, "--data": f["pairs"], "--image-root": f["images"],
                             "--output": out, "--no-progress": None, "--device": "cpu", **kw})


def _ref(f, m, out, **kw):
    return _argv("ref-logps", **{"--model": m, "--data": f["pairs"], "--image-root": f["images"],
                                 "--out": out, "--no-progress": None, "--device": "cpu", **kw})


def _bp(f, out, **kw):
    return _argv("build-pairs", **{"--data": f["llava"], "--image-root": f["root"], "--out": out,
                                   "--strategies": "error_injection", "--no-progress": None, **kw})


def _write(path, text):
    path.write_text(text)
    return str(path)


def _copy(src, dst):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.copy(src, dst)
    return str(dst)


# name -> (argv(files, model copy, tmp_path), the inputs that must stay untouched, words of the
# one-line error). Each of these wrote over its input before the guard (exit 0 or a traceback).
OVERLAPS = {
    "train output is the model": (lambda f, m, t: _train(f, m, m), ["model"],
                                  ["output", "model", "same folder"]),
    "train output inside the model": (lambda f, m, t: _train(f, m, m + "/run"), ["model"],
                                      ["output", "inside the input model"]),
    "train output holds the data": (
        lambda f, m, t: _train(f, m, str(t / "run"),
                               **{"--data": _copy(f["pairs"], t / "run" / "p.jsonl")}),
        [], ["output", "holds the input data"]),
    "train output holds its config": (
        lambda f, m, t: _train(f, m, str(t / "run"), **{"--config": _cfg(t / "run" / "c.yaml")}),
        [], ["output", "--config"]),
    "ref-logps out is the data (--overwrite)": (
        lambda f, m, t: _ref(f, m, _copy(f["pairs"], t / "p.jsonl"), **{
            "--data": str(t / "p.jsonl"), "--overwrite": None}), ["p.jsonl"], ["out", "data"]),
    "build-pairs out is the data (--overwrite)": (
        lambda f, m, t: _bp(f, _copy(f["llava"], t / "l.jsonl"), **{
            "--data": str(t / "l.jsonl"), "--overwrite": None}), ["l.jsonl"], ["out", "data"]),
    "build-pairs errors is the data": (
        lambda f, m, t: _bp(f, str(t / "o.jsonl"), **{"--errors": _copy(f["llava"], t / "l.jsonl"),
                                                     "--data": str(t / "l.jsonl")}),
        ["l.jsonl"], ["errors", "data"]),
    "build-pairs summary is out": (
        lambda f, m, t: _bp(f, str(t / "o.jsonl"), **{"--summary-json": str(t / "o.jsonl")}),
        [], ["summary_json", "out"]),
    "eval-chair out is the captions": (
        lambda f, m, t: _argv("eval-chair", **{"--captions": _copy(f["caps"], t / "c.jsonl"),
                                               "--ground-truth": f["gt"],
                                               "--out": str(t / "c.jsonl")}),
        ["c.jsonl"], ["--out", "--captions"]),
    "eval-chair out is a link to the ground truth": (
        lambda f, m, t: _argv("eval-chair", **{"--captions": f["caps"],
                                               "--ground-truth": _copy(f["gt"], t / "g.jsonl"),
                                               "--out": _link(t / "g.jsonl", t / "link.json")}),
        ["g.jsonl"], ["--out", "--ground-truth"]),
    "generate out inside the model": (
        lambda f, m, t: _argv("generate", **{"--model": m, "--data": f["llava"],
                                             "--image-root": f["root"], "--limit": 1,
                                             "--out": m + "/answers.jsonl", "--device": "cpu",
                                             "--no-progress": None}),
        ["model"], ["--out", "inside the input --model"]),
    # an image is read by name from an image root (ROOT: outputs may live there), but it is
    # still never written over
    "build-pairs summary is an image of the image root": (
        lambda f, m, t: _bp(f, str(t / "o.jsonl"), **{
            "--image-root": os.path.dirname(_copy(f["root"] + "/img.png", t / "imgs" / "img.png")),
            "--summary-json": str(t / "imgs" / "img.png")}),
        ["imgs/img.png"], ["summary_json", "PNG image", "not written by build-pairs"]),
    # a side file: an existing file there is replaced only when it is a build's summary
    "build-pairs summary is someone's notes": (
        lambda f, m, t: _bp(f, str(t / "o.jsonl"), **{
            "--summary-json": _write(t / "notes.json", '{"my": "notes"}')}),
        ["notes.json"], ["summary_json", "not written by bpo-fast build-pairs"]),
    "ref-logps out is an image of the data (--overwrite)": (
        lambda f, m, t: _ref(f, m, str(t / "data" / "img" / "0000.png"), **{
            "--image-root": _tree(f["images"], t / "data"), "--data": str(t / "data" / "pairs.jsonl"),
            "--overwrite": None}),
        ["data/img/0000.png"], ["out", "PNG image"]),
    # a run writes model.safetensors, config.json, metrics.jsonl into its folder
    "train output is another model's folder": (
        lambda f, m, t: _train(f, m, _tree(m, t / "other")),
        ["other/model.safetensors", "other/config.json"], ["output", "no training run wrote"]),
    "eval-pope questions are the ground truth": (
        lambda f, m, t: _argv("eval-pope", **{"--ground-truth": _copy(f["gt"], t / "g.jsonl"),
                                              "--write-questions": str(t / "g.jsonl")}),
        ["g.jsonl"], ["--write-questions", "--ground-truth"]),
}


def _tree(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _cfg(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.write("max_steps: 1\n")
    return str(path)


def _link(target, link):
    os.symlink(target, link)
    return str(link)


@pytest.mark.parametrize("name", sorted(OVERLAPS))
def test_an_output_never_writes_over_an_input(files, tiny_llava_dir, tmp_path, capsys, name):
    argv, keep, words = OVERLAPS[name]
    m = _model_copy(tiny_llava_dir, tmp_path)
    args = argv(files, m, tmp_path)
    kept = [m + "/" + n for n in os.listdir(m)] if "model" in keep else []
    kept += [str(tmp_path / n) for n in keep if n != "model"]
    before = _bytes(kept)
    assert main(args) == 2
    line = _one_line(capsys)
    for w in words:
        assert w in line, (w, line)
    assert _bytes(kept) == before
    assert sorted(os.listdir(m)) == sorted(os.listdir(tiny_llava_dir))   # nothing added


def test_outputs_inside_an_image_root_and_checkpoints_inside_the_output_are_fine(tmp_path):
    from bpo_fast.errors import DIR, OWNED, ROOT, check_no_overlap

    (tmp_path / "imgs").mkdir()
    check_no_overlap({"out": str(tmp_path / "imgs" / "pairs.jsonl")},
                     {"image_root": (str(tmp_path / "imgs"), ROOT)})
    check_no_overlap({"output": (str(tmp_path / "run"), DIR)},
                     {"resume": (str(tmp_path / "run" / "checkpoint-2"), OWNED)})


# --------------------------------------------------------------------------------------------
# one run per output
# --------------------------------------------------------------------------------------------

HOLD = ("import sys, time\n"
        "from bpo_fast.errors import CommandGuard\n"
        "CommandGuard('train', outputs=[('output', sys.argv[1], sys.argv[2])]).__enter__()\n"
        "print('locked', flush=True)\n"
        "time.sleep(600)\n")


def _holder(path, kind):
    p = subprocess.Popen([sys.executable, "-c", HOLD, path, kind], env=ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_a_second_run_into_one_output_stops_and_no_crash_leaves_a_lock(files, tiny_llava_dir,
                                                                       tmp_path, capsys):
    run = str(tmp_path / "run")
    holder = _holder(run, "dir")
    try:
        assert main(_train(files, tiny_llava_dir, run, **{"--max-steps": 1})) == 2
        line = _one_line(capsys)
        assert "output" in line and "another run" in line and f"pid {holder.pid}" in line, line
    finally:
        holder.kill()
        holder.wait()
    out = str(tmp_path / "chair.json")
    holder = _holder(out, "file")
    chair = _argv("eval-chair", **{"--captions": files["caps"], "--ground-truth": files["gt"],
                                   "--out": out})
    assert main(chair) == 2 and "another run" in _one_line(capsys)
    holder.send_signal(signal.SIGKILL)     # a crash: the kernel drops the lock
    holder.wait()
    assert main(chair) == 0 and os.path.isfile(out)
    assert sorted(os.listdir(tmp_path)) == ["chair.json", "run"]   # no lock file left behind


def test_a_second_run_through_a_symlink_to_the_output_stops(files, tmp_path, capsys):
    out = str(tmp_path / "m.jsonl")
    link = _link(out, tmp_path / "link.jsonl")
    holder = _holder(out, "file")
    try:
        assert main(_argv("merge-pairs", **{"--out": link}) + [files["pairs"]]) == 2
        line = _one_line(capsys)
        assert "another run" in line and f"pid {holder.pid}" in line, line
        assert not os.path.exists(out)
    finally:
        holder.kill()
        holder.wait()


def test_a_file_at_the_lock_path_that_bpo_fast_did_not_write_is_left_alone(files, tmp_path,
                                                                           capsys):
    lock = tmp_path / ".m.jsonl.lock"
    lock.write_text("my notes\n")
    assert main(_argv("merge-pairs", **{"--out": str(tmp_path / "m.jsonl")}) + [files["pairs"]]) == 2
    line = _one_line(capsys)
    assert ".m.jsonl.lock" in line and "not written by bpo-fast" in line, line
    assert lock.read_text() == "my notes\n" and not (tmp_path / "m.jsonl").exists()


# --------------------------------------------------------------------------------------------
# Ctrl-C: one line, exit 130, resume = uninterrupted
# --------------------------------------------------------------------------------------------

def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


TRAIN = {"--batch-size": 2, "--max-length": 64, "--lr": "2e-3", "--warmup-steps": 0,
         "--max-steps": 6, "--save-every": 2, "--seed": 0}


def _interrupt(argv, ready, timeout=180):
    """Run ``bpo-fast argv`` in a subprocess, send it a real SIGINT once ``ready()``; returns
    (exit status, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "bpo_fast.cli"] + argv, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while time.time() < deadline and not ready() and proc.poll() is None:
        time.sleep(0.002)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def test_ctrl_c_in_train_then_resume_equals_an_uninterrupted_run(files, tiny_llava_dir, tmp_path):
    full = str(tmp_path / "full")
    assert main(_train(files, tiny_llava_dir, full, **TRAIN)) == 0
    out = tmp_path / "run"
    argv = _train(files, tiny_llava_dir, str(out), **TRAIN)
    rc, err = _interrupt(argv, lambda: (out / "checkpoint-2").exists())
    last = err.strip().splitlines()[-1]
    assert rc == 130 and "Traceback" not in err, err
    assert last.startswith("bpo-fast train: interrupted after step") and "--resume" in last, last
    assert "checkpoint-" in last
    assert not [n for n in os.listdir(out) if n.endswith(".tmp") or n.startswith(".")]
    assert main(argv + ["--resume"]) == 0
    got, want = _metrics(str(out)), _metrics(full)
    assert [r["step"] for r in got] == list(range(1, 7))
    for a, b in zip(got, want):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_ctrl_c_in_build_pairs_then_resume_writes_the_same_bytes(files, tmp_path):
    full = str(tmp_path / "full.jsonl")
    assert main(_bp(files, full, **{"--batch-size": 4})) == 0
    out = str(tmp_path / "pairs.jsonl")

    def started():
        return os.path.exists(out) and os.path.getsize(out) > 0

    rc, err = _interrupt(_bp(files, out, **{"--batch-size": 4}), started)
    last = err.strip().splitlines()[-1]
    assert rc == 130 and "Traceback" not in err, err
    assert last.startswith("bpo-fast build-pairs: interrupted after") and "--resume" in last, last
    assert open(out, "rb").read() != open(full, "rb").read()      # it did stop mid-way
    assert main(_bp(files, out, **{"--batch-size": 4, "--resume": None})) == 0
    assert open(out, "rb").read() == open(full, "rb").read()


def test_ctrl_c_in_the_other_commands_is_one_line_and_130(files, tmp_path, capsys, monkeypatch):
    import bpo_fast.demo.pipeline as pipeline
    import bpo_fast.eval.chair as chair

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(chair, "compute_chair", interrupt)
    out = str(tmp_path / "c.json")
    assert main(_argv("eval-chair", **{"--captions": files["caps"], "--ground-truth": files["gt"],
                                       "--out": out})) == 130
    line = _one_line(capsys)
    assert line.startswith("bpo-fast eval-chair: interrupted") and "nothing was written" in line
    assert not os.listdir(tmp_path)

    def seed_stage(cfg, seed):
        pipeline._CURRENT.update(stage="bpo", seed=f"seed{seed}")
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run_seed", seed_stage)
    monkeypatch.setattr(pipeline, "_CURRENT", {})
    assert main(["demo", "--quick", "--out", str(tmp_path / "demo")]) == 130
    line = _one_line(capsys)
    assert "interrupted in stage bpo of seed" in line and "rerun the same command" in line, line


def test_ctrl_c_inside_a_dcp_checkpoint_write_is_one_line_and_resumes(files, tiny_llava_dir,
                                                                     tmp_path, capsys,
                                                                     monkeypatch):
    """DCP catches the KeyboardInterrupt of a Ctrl-C during the optimizer's write and raises its
    own CheckpointException (a BaseException) with it inside: still an interrupt."""
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    full = str(tmp_path / "full")
    assert main(_train(files, tiny_llava_dir, full, **TRAIN)) == 0
    out = str(tmp_path / "run")
    real = FileSystemWriter.write_data

    def write_data(self, plan, planner):
        if "checkpoint-4.tmp" in str(self.path):
            raise KeyboardInterrupt
        return real(self, plan, planner)

    monkeypatch.setattr(FileSystemWriter, "write_data", write_data)
    argv = _train(files, tiny_llava_dir, out, **TRAIN)
    assert main(argv) == 130
    line = _one_line(capsys)
    assert line.startswith("bpo-fast train: interrupted after step 4 of 6"), line
    assert "checkpoint-2, is kept" in line and "--resume" in line, line
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) == ["checkpoint-2"]
    monkeypatch.setattr(FileSystemWriter, "write_data", real)
    assert main(argv + ["--resume"]) == 0
    for a, b in zip(_metrics(out), _metrics(full)):
        assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    assert len(_metrics(out)) == 6


# --------------------------------------------------------------------------------------------
# a full disk: one line naming the file and what is kept; resumable once space is freed
# --------------------------------------------------------------------------------------------

def test_full_disk_in_train_keeps_the_last_checkpoint_and_resumes(files, tiny_llava_dir,
                                                                  tmp_path, capsys, monkeypatch):
    import torch

    full = str(tmp_path / "full")
    assert main(_train(files, tiny_llava_dir, full, **TRAIN)) == 0
    out = str(tmp_path / "run")
    real_save = torch.save

    def save(obj, path, *a, **k):
        if "checkpoint-4.tmp" in str(path):
            raise ENOSPC
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    argv = _train(files, tiny_llava_dir, out, **TRAIN)
    assert main(argv) == 2
    line = _one_line(capsys)
    assert "checkpoint-4.tmp" in line and "No space left on device" in line, line
    assert "after step 4 of 6" in line and "checkpoint-2, is kept" in line, line
    assert "free some space, then rerun with --resume" in line, line
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) == ["checkpoint-2"]
    monkeypatch.setattr(torch, "save", real_save)          # space freed
    assert main(argv + ["--resume"]) == 0
    for a, b in zip(_metrics(out), _metrics(full)):
        assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    assert len(_metrics(out)) == 6


def test_full_disk_in_build_pairs_tears_one_line_and_resumes_to_the_same_bytes(
        files, tmp_path, capsys, monkeypatch):
    from bpo_fast.data.jsonl import JsonlWriter

    full = str(tmp_path / "full.jsonl")
    assert main(_bp(files, full, **{"--batch-size": 64})) == 0
    out = str(tmp_path / "pairs.jsonl")
    real = JsonlWriter.write_batch
    calls = []

    class FillsUp:
        """The pair file as the disk fills: half of the write lands, then ENOSPC."""

        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[:len(data) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.f, name)

    def write_batch(self, records):
        calls.append(1)
        if len(calls) == 5 and self.path == out:
            self._f = FillsUp(self._f)
        return real(self, records)

    monkeypatch.setattr(JsonlWriter, "write_batch", write_batch)
    assert main(_bp(files, out, **{"--batch-size": 64})) == 2
    line = _one_line(capsys)
    assert f"{out}: No space left on device" in line, line
    assert "after 256 new pair(s)" in line and "kept in" in line and "--resume" in line, line
    monkeypatch.setattr(JsonlWriter, "write_batch", real)
    assert main(_bp(files, out, **{"--batch-size": 64, "--resume": None})) == 0
    assert open(out, "rb").read() == open(full, "rb").read()


def test_full_disk_and_ctrl_c_in_ref_logps_rerun_to_the_same_cache(files, tiny_llava_dir,
                                                                   tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file

    from bpo_fast.models.preference import PreferenceModel

    full = str(tmp_path / "full.safetensors")
    assert main(_ref(files, tiny_llava_dir, full, **{"--batch-size": 2, "--max-length": 64})) == 0
    out = str(tmp_path / "ref.safetensors")
    argv = _ref(files, tiny_llava_dir, out, **{"--batch-size": 2, "--max-length": 64})
    real_fsync, real_logps = os.fsync, PreferenceModel.sequence_logps
    calls = []

    def fsync(fd):
        calls.append(1)
        if len(calls) == 2:
            raise ENOSPC
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    assert main(argv) == 2
    line = _one_line(capsys)
    assert "ref.safetensors.partial.jsonl: No space left on device" in line, line
    assert "after 2 of 8 pairs" in line and "rerun the same command" in line, line
    monkeypatch.setattr(os, "fsync", real_fsync)

    def interrupt_third(self, *a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_logps(self, *a, **k)

    monkeypatch.setattr(PreferenceModel, "sequence_logps", interrupt_third)
    assert main(argv) == 130
    line = _one_line(capsys)
    assert line.startswith("bpo-fast ref-logps: interrupted after 6 of 8 pairs"), line
    monkeypatch.setattr(PreferenceModel, "sequence_logps", real_logps)
    assert main(argv) == 0
    a, b = load_file(out), load_file(full)
    assert all((a[k] == b[k]).all() for k in b)


@pytest.mark.parametrize("cmd", ["merge-pairs", "eval-chair"])
def test_full_disk_in_an_atomic_writer_writes_nothing(files, tmp_path, capsys, monkeypatch, cmd):
    out = str(tmp_path / "out.json")
    argv = (["merge-pairs", "--out", out, files["pairs"]] if cmd == "merge-pairs" else
            _argv("eval-chair", **{"--captions": files["caps"], "--ground-truth": files["gt"],
                                   "--out": out}))

    def replace(*a):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(os, "replace", replace)
    assert main(argv) == 2
    line = _one_line(capsys)
    assert f"{out}: {os.strerror(errno.EDQUOT)}" in line and "nothing was written" in line, line
    assert "raise the quota" in line and "rerun the same command" in line
    assert not os.listdir(tmp_path)


def test_a_full_disk_is_recognised_however_a_library_reports_it(tmp_path, monkeypatch):
    from bpo_fast import errors

    def fail(exc, **kw):
        with errors.writing(str(tmp_path / "x"), **kw):
            raise exc

    # safetensors' error names the OS error in its text; torch.save says only "unexpected pos":
    # then the file system itself says whether it is full
    with pytest.raises(errors.WriteFault) as e:
        fail(Exception("Error while serializing: I/O error: No space left on device (os error "
                       "28)"))
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "x")
    pos = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    with pytest.raises(RuntimeError):           # a bug when the disk has room
        fail(pos)
    monkeypatch.setattr(errors, "_disk_full", lambda path: True)
    cleaned = []
    with pytest.raises(errors.WriteFault):
        fail(pos, cleanup=lambda: cleaned.append(1))
    assert cleaned == [1]
    with pytest.raises(KeyboardInterrupt):      # Ctrl-C passes, after the cleanup
        fail(KeyboardInterrupt(), cleanup=lambda: cleaned.append(2))
    assert cleaned == [1, 2]
