"""Every subcommand against a table of bad inputs: exit status 2 and one line naming the argument
or file. In-process (fast); a few cases also through a real subprocess."""

import json
import os
import subprocess
import sys

import pytest

from bpo_fast.cli import main
from bpo_fast.errors import UserError, is_user_error, run_command
from bpo_fast.train.synthetic import make_pairs


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """A small world of good and bad files; paths by name."""
    root = tmp_path_factory.mktemp("cli_errors")
    from PIL import Image

    d = {"root": str(root)}
    png = root / "img.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(png)
    d["png"] = str(png)
    d["dir"] = str(root / "a_dir")
    os.makedirs(d["dir"])
    d["text"] = str(root / "notes.txt")
    (root / "notes.txt").write_text("just some words\nand more words\n")
    d["file"] = d["text"]                               # a file where a folder is expected
    d["under_file"] = os.path.join(d["text"], "out.jsonl")   # a path no one can create
    d["under_file_dir"] = os.path.join(d["text"], "run")
    d["pairs"] = make_pairs(str(root / "pairs"), n=4, seed=1)
    d["pairs_root"] = str(root / "pairs")
    lines = open(d["pairs"]).read().splitlines()
    d["pairs_bad_mid"] = str(root / "pairs_bad_mid.jsonl")
    with open(d["pairs_bad_mid"], "w") as f:
        f.write("\n".join(lines[:2] + ['{"id": "broken", "chosen": '] + lines[2:]) + "\n")
    # LLaVA-format data for build-pairs
    conv = [{"from": "human", "value": "<image>\nwhat is it ?"}, {"from": "gpt", "value": "a red square ."}]
    recs = [json.dumps({"id": f"r{i}", "image": "img.png", "conversations": conv}) for i in range(3)]
    d["llava"] = str(root / "llava.jsonl")
    (root / "llava.jsonl").write_text("\n".join(recs) + "\n")
    d["llava_bad_mid"] = str(root / "llava_bad_mid.jsonl")
    (root / "llava_bad_mid.jsonl").write_text("\n".join(recs[:1] + ['{"id": "x", '] + recs[1:]) + "\n")
    d["caps"] = str(root / "caps.jsonl")
    (root / "caps.jsonl").write_text('{"id": "1", "caption": "A man with a dog."}\n')
    d["gt"] = str(root / "gt.jsonl")
    (root / "gt.jsonl").write_text('{"id": "1", "objects": ["person", "dog"]}\n')
    d["cfg_resume_int"] = str(root / "resume_int.yaml")
    (root / "resume_int.yaml").write_text("resume: 3\n")
    d["exists"] = str(root / "exists.safetensors")
    (root / "exists.safetensors").write_bytes(b"x")
    d["truncated_cache"] = str(root / "trunc.safetensors")
    (root / "trunc.safetensors").write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{\"__metadata")
    return d


def _bp(w, **over):
    a = {"--data": w["llava"], "--out": os.path.join(w["root"], "bp", "out.jsonl"),
         "--strategies": "error_injection", "--no-progress": None, "--image-root": w["root"]}
    a.update(over)
    return ["build-pairs"] + [x for k, v in a.items() if v is not False
                              for x in ((k,) if v is None else (k, v))]


def _train(w, m, **over):
    a = {"--model": m, "--data": w["pairs"], "--image-root": w["pairs_root"],
         "--output": os.path.join(w["root"], "train_out"), "--no-progress": None,
         "--device": "cpu"}
    a.update(over)
    return ["train"] + [x for k, v in a.items() if v is not False
                        for x in ((k,) if v is None else (k, v))]


def _ref(w, m, **over):
    a = {"--model": m, "--data": w["pairs"], "--image-root": w["pairs_root"],
         "--out": os.path.join(w["root"], "ref", "r.safetensors"), "--no-progress": None,
         "--device": "cpu"}
    a.update(over)
    return ["ref-logps"] + [x for k, v in a.items() if v is not False
                            for x in ((k,) if v is None else (k, v))]


def _gen(w, m, **over):
    a = {"--model": m, "--data": w["llava"], "--image-root": w["root"],
         "--out": os.path.join(w["root"], "gen", "answers.jsonl"), "--no-progress": None,
         "--device": "cpu"}
    a.update(over)
    return ["generate"] + [x for k, v in a.items() if v is not False
                           for x in ((k,) if v is None else (k, v))]


def _chair(w, **over):
    a = {"--captions": w["caps"], "--ground-truth": w["gt"]}
    a.update(over)
    return ["eval-chair"] + [x for k, v in a.items() for x in (k, v)]


# (name, argv builder(w, model_dir), substrings the one-line message must hold)
CASES = [
    # build-pairs
    ("bp data png", lambda w, m: _bp(w, **{"--data": w["png"]}), ["data", "img.png", "PNG"]),
    ("bp data dir", lambda w, m: _bp(w, **{"--data": w["dir"]}), ["data", "a_dir", "directory"]),
    ("bp data missing", lambda w, m: _bp(w, **{"--data": w["dir"] + "/x.jsonl"}), ["data", "no such file"]),
    ("bp data not json", lambda w, m: _bp(w, **{"--data": w["text"]}), ["data", "notes.txt", "JSON"]),
    ("bp strict bad line", lambda w, m: _bp(w, **{"--data": w["llava_bad_mid"], "--strict": None}),
     ["llava_bad_mid.jsonl:2", "invalid JSON"]),
    ("bp out unwritable", lambda w, m: _bp(w, **{"--out": w["under_file"]}), ["out", "notes.txt"]),
    ("bp threads zero", lambda w, m: _bp(w, **{"--threads": "0"}), ["--threads", "0"]),
    ("bp out is dir", lambda w, m: _bp(w, **{"--out": w["dir"]}), ["out", "directory"]),
    ("bp errors unwritable", lambda w, m: _bp(w, **{"--errors": w["under_file"]}), ["errors"]),
    ("bp summary unwritable", lambda w, m: _bp(w, **{"--summary-json": w["under_file"]}),
     ["summary_json"]),
    ("bp lexicon png", lambda w, m: _bp(w, **{"--lexicon": w["png"]}), ["lexicon", "img.png", "PNG"]),
    ("bp lexicon not json", lambda w, m: _bp(w, **{"--lexicon": w["text"]}), ["lexicon", "notes.txt", "JSON"]),
    ("bp template dir", lambda w, m: _bp(w, **{"--inject-template": w["dir"], "--injector": "llm",
                                               "--model": m}), ["inject_template", "directory"]),
    ("bp image-root file", lambda w, m: _bp(w, **{"--image-root": w["file"]}), ["image_root", "notes.txt"]),
    ("bp model missing", lambda w, m: _bp(w, **{"--strategies": "image_weakened",
                                                "--model": w["dir"] + "/nope"}), ["model", "nope"]),
    ("bp model file", lambda w, m: _bp(w, **{"--strategies": "image_weakened", "--model": w["file"]}),
     ["model", "notes.txt"]),
    ("bp limit 0", lambda w, m: _bp(w, **{"--limit": "0"}), ["limit"]),
    ("bp batch 0", lambda w, m: _bp(w, **{"--batch-size": "0"}), ["--batch-size"]),
    ("bp noise steps", lambda w, m: _bp(w, **{"--noise-steps": "x"}), ["--noise-steps"]),
    ("bp strategies", lambda w, m: _bp(w, **{"--strategies": "nope"}), ["--strategies"]),
    ("bp resume+overwrite", lambda w, m: _bp(w, **{"--resume": None, "--overwrite": None}),
     ["resume", "overwrite"]),
    # merge-pairs
    ("merge png", lambda w, m: ["merge-pairs", "--out", w["root"] + "/m.jsonl", w["png"]],
     ["img.png", "PNG"]),
    ("merge dir", lambda w, m: ["merge-pairs", "--out", w["root"] + "/m.jsonl", w["dir"]],
     ["a_dir", "directory"]),
    ("merge missing", lambda w, m: ["merge-pairs", "--out", w["root"] + "/m.jsonl", w["dir"] + "/n.jsonl"],
     ["n.jsonl"]),
    ("merge bad mid line", lambda w, m: ["merge-pairs", "--out", w["root"] + "/m.jsonl", w["pairs_bad_mid"]],
     ["pairs_bad_mid.jsonl:3", "invalid JSON"]),
    ("merge out unwritable", lambda w, m: ["merge-pairs", "--out", w["under_file"], w["pairs"]],
     ["out", "notes.txt"]),
    # convert
    ("convert png", lambda w, m: ["convert", "--out", w["root"] + "/c.jsonl", w["png"]],
     ["INPUT", "img.png", "PNG"]),
    ("convert dir", lambda w, m: ["convert", "--out", w["root"] + "/c.jsonl", w["dir"]],
     ["INPUT", "a_dir", "directory"]),
    ("convert out unwritable", lambda w, m: ["convert", "--out", w["under_file"], w["pairs"]],
     ["out", "notes.txt"]),
    ("convert out is input", lambda w, m: ["convert", "--out", w["pairs"], w["pairs"]],
     ["out", "inputs"]),
    # ref-logps
    ("ref out exists", lambda w, m: _ref(w, m, **{"--out": w["exists"]}), ["out", "exists", "--overwrite"]),
    ("ref out unwritable", lambda w, m: _ref(w, m, **{"--out": w["under_file"]}), ["out", "notes.txt"]),
    ("ref data png", lambda w, m: _ref(w, m, **{"--data": w["png"]}), ["data", "PNG"]),
    ("ref data dir", lambda w, m: _ref(w, m, **{"--data": w["dir"]}), ["data", "directory"]),
    ("ref model missing", lambda w, m: _ref(w, m, **{"--model": w["dir"] + "/nope"}), ["model", "nope"]),
    ("ref image-root file", lambda w, m: _ref(w, m, **{"--image-root": w["file"]}), ["image_root"]),
    ("ref batch 0", lambda w, m: _ref(w, m, **{"--batch-size": "0"}), ["batch"]),
    # train
    ("train output unwritable", lambda w, m: _train(w, m, **{"--output": w["under_file_dir"]}),
     ["output", "notes.txt"]),
    ("train output is file", lambda w, m: _train(w, m, **{"--output": w["file"]}), ["output", "notes.txt"]),
    ("train data png", lambda w, m: _train(w, m, **{"--data": w["png"]}), ["data", "PNG"]),
    ("train model file", lambda w, m: _train(w, m, **{"--model": w["file"]}), ["model", "notes.txt"]),
    ("train ref cache missing", lambda w, m: _train(w, m, **{"--reference": "cached",
                                                             "--ref-cache": w["dir"] + "/r.st"}),
     ["ref_cache", "r.st"]),
    ("train ref cache truncated", lambda w, m: _train(w, m, **{"--reference": "cached",
                                                               "--ref-cache": w["truncated_cache"]}),
     ["ref_cache", "trunc.safetensors"]),
    ("train resume missing", lambda w, m: _train(w, m, **{"--resume": w["dir"] + "/ck"}), ["resume"]),
    ("train beta", lambda w, m: _train(w, m, **{"--beta": "-1"}), ["beta"]),
    ("train batch", lambda w, m: _train(w, m, **{"--batch-size": "0"}), ["batch"]),
    ("train dtype", lambda w, m: _train(w, m, **{"--dtype": "fp8"}), ["--dtype"]),
    ("train lr not a number", lambda w, m: _train(w, m, **{"--lr": "fast"}), ["--lr"]),
    ("train lr nan", lambda w, m: _train(w, m, **{"--lr": "nan"}), ["--lr", "finite"]),
    ("train adam beta1 1", lambda w, m: _train(w, m, **{"--adam-beta1": "1.0"}),
     ["--adam-beta1", "[0, 1)"]),
    ("train device mps", lambda w, m: _train(w, m, **{"--device": "mps"}), ["--device", "mps"]),
    ("train seed beyond numpy", lambda w, m: _train(w, m, **{"--seed": str(2 ** 32)}),
     ["--seed", "[0, 4294967295]"]),
    ("train config resume 3", lambda w, m: _train(w, m, **{"--config": w["cfg_resume_int"]}),
     ["resume", "checkpoint folder", "got 3"]),
    # generate
    ("gen data png", lambda w, m: _gen(w, m, **{"--data": w["png"]}), ["--data", "PNG"]),
    ("gen data dir", lambda w, m: _gen(w, m, **{"--data": w["dir"]}), ["--data", "a_dir"]),
    ("gen model missing", lambda w, m: _gen(w, m, **{"--model": w["dir"] + "/nope"}),
     ["--model", "nope"]),
    ("gen model not a model", lambda w, m: _gen(w, m, **{"--model": w["dir"]}),
     ["--model", "config.json"]),
    ("gen out unwritable", lambda w, m: _gen(w, m, **{"--out": w["under_file"]}),
     ["--out", "notes.txt"]),
    ("gen out is data", lambda w, m: _gen(w, m, **{"--out": w["llava"]}), ["--out", "input"]),
    ("gen image-root file", lambda w, m: _gen(w, m, **{"--image-root": w["file"]}),
     ["--image-root", "notes.txt"]),
    ("gen no questions", lambda w, m: _gen(w, m, **{"--data": False, "--image-root": False}),
     ["--data or --image-root"]),
    ("gen strict bad line", lambda w, m: _gen(w, m, **{"--data": w["llava_bad_mid"],
                                                       "--max-bad-fraction": "0"}),
     ["llava_bad_mid.jsonl:2", "invalid JSON"]),
    ("gen top-p", lambda w, m: _gen(w, m, **{"--sample": None, "--top-p": "0"}), ["top_p"]),
    # eval-chair
    ("chair captions dir", lambda w, m: _chair(w, **{"--captions": w["dir"]}), ["--captions", "directory"]),
    ("chair captions png", lambda w, m: _chair(w, **{"--captions": w["png"]}), ["--captions", "PNG"]),
    ("chair gt missing", lambda w, m: _chair(w, **{"--ground-truth": w["dir"] + "/g"}), ["--ground-truth"]),
    ("chair synonyms png", lambda w, m: _chair(w, **{"--synonyms": w["png"]}), ["--synonyms", "img.png"]),
    ("chair synonyms dir", lambda w, m: _chair(w, **{"--synonyms": w["dir"]}), ["--synonyms", "directory"]),
    ("chair out unwritable", lambda w, m: _chair(w, **{"--out": w["under_file"]}), ["--out", "notes.txt"]),
    ("chair out dir", lambda w, m: _chair(w, **{"--out": w["dir"]}), ["--out", "directory"]),
    # eval-pope
    ("pope gt png", lambda w, m: ["eval-pope", "--ground-truth", w["png"], "--answers", w["caps"]],
     ["--ground-truth", "PNG"]),
    ("pope answers dir", lambda w, m: ["eval-pope", "--ground-truth", w["gt"], "--answers", w["dir"]],
     ["--answers", "directory"]),
    ("pope nothing to do", lambda w, m: ["eval-pope", "--ground-truth", w["gt"]], ["--answers"]),
    ("pope answers unknown ids", lambda w, m: ["eval-pope", "--ground-truth", w["gt"],
                                              "--answers", w["caps"]], ["caps.jsonl", "answer"]),
    ("pope per-image 0", lambda w, m: ["eval-pope", "--ground-truth", w["gt"], "--per-image", "0"],
     ["--per-image"]),
    # demo
    ("train threads", lambda w, m: _train(w, m, **{"--threads": "two"}), ["--threads", "two"]),
    ("demo threads", lambda w, m: ["demo", "--threads", "-3", "--out", w["root"] + "/d"], ["--threads"]),
    ("demo seeds", lambda w, m: ["demo", "--seeds", "1,x", "--out", w["root"] + "/d"], ["--seeds"]),
    ("demo out unwritable", lambda w, m: ["demo", "--quick", "--out", w["under_file_dir"]],
     ["--out", "notes.txt"]),
    ("demo device", lambda w, m: ["demo", "--device", "tpu"], ["--device"]),
    # info / top level
    ("info extra", lambda w, m: ["info", "--nope"], ["--nope"]),
    ("no such command", lambda w, m: ["trian"], ["trian"]),
]


@pytest.mark.parametrize("name,argv,expect", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(w, tiny_llava_dir, capsys, name, argv, expect):
    try:
        rc = main(argv(w, tiny_llava_dir))
    except SystemExit as exc:     # argparse's own errors
        rc = exc.code
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    last = err.splitlines()[-1]
    assert "Traceback" not in err
    assert last.startswith("bpo-fast"), err
    for s in expect:
        assert s in last, (s, last)


def test_every_subcommand_is_in_the_table():
    from bpo_fast.cli import COMMANDS

    firsts = set()
    for _, argv, _ in CASES:
        args = argv({k: "x" for k in ("llava", "root", "png", "dir", "text", "file", "under_file",
                                      "under_file_dir", "pairs", "pairs_root", "pairs_bad_mid",
                                      "llava_bad_mid", "caps", "gt", "exists", "truncated_cache",
                                      "cfg_resume_int")},
                    "m")
        firsts.add(args[0])
    assert set(COMMANDS) <= firsts


def test_bugs_keep_their_traceback():
    def ours_by_interpreter():
        a, b = [1, 2, 3]        # ValueError raised by Python in our code: a bug, not a check

    with pytest.raises(ValueError):
        run_command("x", ours_by_interpreter)
    with pytest.raises(ZeroDivisionError):
        run_command("x", lambda: 1 / 0)

    import torch

    with pytest.raises(RuntimeError):
        run_command("x", lambda: torch.zeros(2) @ torch.zeros(3))
    assert is_user_error(UserError("x"))
    assert is_user_error(FileNotFoundError(2, "No such file", "a.txt"))
    with pytest.raises(ValueError) as theirs:
        int("x")
    assert not is_user_error(theirs.value)


def test_subprocess_exit_codes(w, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p = subprocess.run([sys.executable, "-m", "bpo_fast.cli", "merge-pairs", "--out",
                        str(tmp_path / "m.jsonl"), w["png"]], capture_output=True, text=True, env=env)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "PNG" in p.stderr, p.stderr
    p = subprocess.run([sys.executable, "-m", "bpo_fast.cli", "demo", "--threads", "-3"],
                       capture_output=True, text=True, env=env)
    assert p.returncode == 2 and "--threads" in p.stderr
    p = subprocess.run([sys.executable, "-m", "bpo_fast.cli", "--help"], capture_output=True,
                       text=True, env=env)
    assert p.returncode == 0 and "preference training" in p.stdout
    assert all(f"  {c}" in p.stdout for c in ("build-pairs", "merge-pairs", "ref-logps", "train",
                                              "eval-chair", "demo", "info"))


def test_a_bug_under_main_keeps_its_traceback(w, monkeypatch):
    import bpo_fast.eval.chair as chair

    def broken(*a, **k):
        return {}["no such key"]       # a KeyError by the interpreter in our code: a bug

    monkeypatch.setattr(chair, "compute_chair", broken)
    with pytest.raises(KeyError):
        main(_chair(w))


def test_num_workers_beyond_the_cpus_are_clamped_with_a_note(w, tiny_llava_dir, tmp_path,
                                                             monkeypatch, caplog):
    """--num-workers 10000 forked 10000 DataLoader workers: the run never started."""
    import torch

    import bpo_fast.runtime as runtime

    monkeypatch.setattr(runtime, "_affinity", lambda: {0})
    seen = []
    real = torch.utils.data.DataLoader

    def loader(*a, **k):
        seen.append(k.get("num_workers"))
        return real(*a, **{**k, "num_workers": 0})   # the count is what is checked

    monkeypatch.setattr(torch.utils.data, "DataLoader", loader)
    out = str(tmp_path / "run")
    assert main(_train(w, tiny_llava_dir, **{"--output": out, "--max-steps": "1",
                                             "--batch-size": "2", "--num-workers": "10000"})) == 0
    assert seen and set(seen) == {1}, seen
    assert any("num_workers: 10000 requested" in r.getMessage() for r in caplog.records)


def test_resume_from_a_checkpoint_of_other_shapes_is_one_line(w, tiny_llava_dir, tmp_path,
                                                              capsys):
    """--resume-with-changes accepts other settings; weights of other shapes (another LoRA
    rank, another model) still cannot load: one line, not torch's size-mismatch traceback."""
    first = str(tmp_path / "r4")
    assert main(_train(w, tiny_llava_dir, **{"--output": first, "--max-steps": "1",
                                             "--batch-size": "2", "--lora-r": "4"})) == 0
    capsys.readouterr()
    rc = main(_train(w, tiny_llava_dir, **{"--output": str(tmp_path / "r8"), "--max-steps": "1",
                                           "--batch-size": "2", "--lora-r": "8",
                                           "--resume": first + "/checkpoint-1",
                                           "--resume-with-changes": None}))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert "resume" in last and "checkpoint-1" in last and "size mismatch for" in last, last
