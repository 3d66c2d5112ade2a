"""Two processes on CPU (gloo) under torchrun, FSDP2-sharded: the same losses as one process with
the same global batch, and a sharded checkpoint that resumes to the same losses."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch.distributed as dist

from bpo_fast.train.synthetic import make_pairs

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _train_args(model, data, root, out, batch_size, *extra):
    return ["train", "--model", model, "--data", data, "--image-root", root, "--output", out,
            "--batch-size", str(batch_size), "--max-steps", "3", "--epochs", "2",
            "--max-length", "64", "--lr", "2e-3", "--warmup-steps", "0", "--save-every", "2",
            "--device", "cpu", "--no-progress", *extra]


def _torchrun(args, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "bpo_fast.cli", *args]
    proc = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def test_two_process_fsdp_matches_one_process_and_resumes(tiny_llava_dir, tmp_path):
    from bpo_fast.cli import main

    root = str(tmp_path / "data")
    data = make_pairs(root, n=8, seed=7)
    one, two, resumed = (str(tmp_path / n) for n in ("one", "two", "resumed"))

    assert main(_train_args(tiny_llava_dir, data, root, one, 4)) == 0
    _torchrun(_train_args(tiny_llava_dir, data, root, two, 2), tmp_path)
    a, b = _metrics(one), _metrics(two)
    assert [r["step"] for r in b] == [1, 2, 3]
    for x, y in zip(a, b):
        for k in ("loss", "reward_chosen", "reward_rejected", "logps_chosen", "logps_rejected"):
            assert x[k] == pytest.approx(y[k], abs=1e-4), (k, x[k], y[k])
    assert os.path.isdir(os.path.join(two, "checkpoint-2", "optimizer"))
    assert os.path.isfile(os.path.join(two, "checkpoint-2", "rng_1.pt"))

    # the sharded checkpoint resumes to the uninterrupted run's step 3
    os.makedirs(resumed)
    shutil.copytree(os.path.join(two, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    _torchrun(_train_args(tiny_llava_dir, data, root, resumed, 2, "--resume"), tmp_path)
    c = _metrics(resumed)
    assert [r["step"] for r in c] == [3]
    assert c[0]["loss"] == pytest.approx(b[2]["loss"], abs=1e-6)

    # the final model written by rank 0 loads and equals the 1-process result
    from transformers import LlavaForConditionalGeneration

    m1 = LlavaForConditionalGeneration.from_pretrained(one).state_dict()
    m2 = LlavaForConditionalGeneration.from_pretrained(two).state_dict()
    for k in m1:
        assert (m1[k] - m2[k]).abs().max() < 1e-4, k


def test_two_process_eval_matches_one_process(tiny_llava_dir, tmp_path):
    """Eval under FSDP2: each rank scores its share (3 pairs over 2 ranks: one padded, weight 0),
    the sums are all-reduced, greedy samples come from the sharded policy; the eval metrics equal
    the one-process run's."""
    from bpo_fast.cli import main

    root = str(tmp_path / "d")
    # make_pairs names its images img/0000.png..: the val set gets its own folder
    vroot = str(tmp_path / "v")
    val = make_pairs(vroot, n=3, seed=7, name="val.jsonl")
    data = make_pairs(root, n=8, seed=5)
    extra = ("--eval-data", f"val={val}", "--eval-image-root", vroot, "--eval-generate", "1",
             "--eval-max-new-tokens", "2", "--eval-batch-size", "1")
    one = str(tmp_path / "one")
    assert main(_train_args(tiny_llava_dir, data, root, one, 4, *extra)) == 0
    two = str(tmp_path / "two")
    _torchrun(_train_args(tiny_llava_dir, data, root, two, 2, *extra), tmp_path)
    ev1 = [r for r in _metrics(one) if "eval_val/loss" in r]
    ev2 = [r for r in _metrics(two) if "eval_val/loss" in r]
    assert len(ev1) == len(ev2) == 1
    for k in ev1[0]:
        assert ev1[0][k] == pytest.approx(ev2[0][k], abs=1e-4), k
    with open(os.path.join(two, "eval_samples.jsonl")) as f:
        assert len(f.read().splitlines()) == 1
