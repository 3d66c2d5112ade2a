"""The loss registry (bpo_fast/ops/losses.py): kernel ids, docs, CLI choices and validation all
come from it; an invalid loss configuration fails when a config / op / module is built."""

import os
import subprocess
import sys

import pytest
import torch

from bpo_fast.ops import losses as R

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kernel_ids_are_the_kernel_module_constants():
    pytest.importorskip("triton")
    from bpo_fast.kernels import dpo as K

    for name, value in R.KERNEL_CONSTANTS.items():
        assert getattr(K, name) == value, name
    kernel_names = {v: k for k, v in R.KERNEL_CONSTANTS.items()}
    for spec in R.REGISTRY.values():
        assert spec.kernel_id in kernel_names, spec.name
        # each kernel branch is named after the loss type it computes (cdpo: the sigmoid branch
        # with label smoothing)
        want = "SIGMOID" if spec.name == "cdpo" else spec.name.upper()
        assert kernel_names[spec.kernel_id] == want


def test_derived_lists():
    assert R.LOSS_TYPES == tuple(R.REGISTRY)
    assert set(R.LENGTH_NORMALISED) == {"ipo", "sigmoid_norm"}
    from bpo_fast.ops import dpo

    assert dpo.LOSS_TYPES is R.LOSS_TYPES and dpo.LENGTH_NORMALISED is R.LENGTH_NORMALISED
    assert not set(R.TRL_NOT_SUPPORTED) & set(R.LOSS_TYPES)
    # every TRL 1.16 loss type is either here (under its TRL name) or listed with a reason
    trl_116 = {"sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair",
               "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft",
               "sigmoid_norm"}
    covered = {s.trl for s in R.REGISTRY.values() if s.trl} | set(R.TRL_NOT_SUPPORTED)
    assert covered == trl_116


def test_docs_page_is_generated_from_the_registry():
    with open(os.path.join(ROOT, "docs", "losses.md"), encoding="utf-8") as f:
        assert f.read() == R.docs_page(), \
            "regenerate: python -m bpo_fast.ops.losses > docs/losses.md"
    table = R.docs_table()
    for spec in R.REGISTRY.values():
        assert f"| `{spec.name}` | `{spec.formula}` |" in table


def test_cli_choices_come_from_the_registry():
    import argparse

    from bpo_fast.train.cli import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    action = next(a for a in p._actions if a.dest == "loss_type")
    assert tuple(action.choices) == R.LOSS_TYPES


@pytest.mark.parametrize("kw,match", [
    (dict(loss_type="exo_pair"), "label_smoothing must be >= 1e-06 for loss_type='exo_pair'"),
    (dict(label_smoothing=0.1), "label_smoothing is not read by loss_type='sigmoid'"),
    (dict(beta=1e300), r"beta must be in \[1e-06, 1e\+06\]"),
    (dict(beta=float("inf")), "beta must be finite"),
    (dict(loss_type="robust", label_smoothing=0.5), r"label_smoothing must be in \[0, 0.5\)"),
    (dict(loss_type="discopop", discopop_tau=1e-9), "discopop_tau must be in"),
    (dict(loss_type="aot"), "loss_type must be one of"),
])
def test_loss_config_refuses(kw, match):
    with pytest.raises(ValueError, match=match):
        R.loss_config(**kw)


def test_loss_config_and_rpo_alpha():
    cfg = R.loss_config("cdpo", 0.2, 0.1)
    assert (cfg.loss_type, cfg.beta, cfg.label_smoothing, cfg.kernel_id) == ("cdpo", 0.2, 0.1, 0)
    assert R.loss_config(cfg) is cfg
    assert R.check_rpo_alpha(None) == 0.0 and R.check_rpo_alpha(1) == 1.0
    for bad in (-0.1, 1e300, float("nan")):
        with pytest.raises(ValueError, match="rpo_alpha"):
            R.check_rpo_alpha(bad)
    with pytest.raises(TypeError, match="rpo_alpha must be a number"):
        R.check_rpo_alpha("1")
    with pytest.raises(ValueError, match="length_count must be one of"):
        R.check_length_count("tokens")


def test_every_op_and_module_validates_through_the_registry():
    from bpo_fast.models.preference import PreferenceModel  # noqa: F401
    from bpo_fast.ops.dpo import DPOLoss, dpo_loss, fused_dpo_loss
    from bpo_fast.ops.linear import LinearDPOLoss, fused_linear_dpo_loss
    from bpo_fast.ops.preference import PreferenceLoss, preference_loss

    h, w = torch.randn(2, 4, 8), torch.randn(11, 8)
    lab = torch.randint(0, 11, (2, 4))
    z = torch.zeros(1)
    msg = "label_smoothing must be >= 1e-06 for loss_type='exo_pair'"
    with pytest.raises(ValueError, match=msg):
        dpo_loss(z, z, z, z, loss_type="exo_pair")
    with pytest.raises(ValueError, match=msg):
        fused_dpo_loss(torch.randn(2, 4, 11), lab, z, z, loss_type="exo_pair")
    with pytest.raises(ValueError, match=msg):
        fused_linear_dpo_loss(h, w, lab, z, z, loss_type="exo_pair")
    with pytest.raises(ValueError, match=msg):
        preference_loss(h, w, lab, z, z, loss="exo_pair")
    for mod in (DPOLoss, LinearDPOLoss):
        with pytest.raises(ValueError, match=msg):
            mod(loss_type="exo_pair")
    with pytest.raises(ValueError, match=msg):
        PreferenceLoss("exo_pair")
    with pytest.raises(ValueError, match="rpo_alpha"):
        PreferenceLoss(rpo_alpha=-1)


def test_train_cli_refuses_a_bad_loss_before_loading_anything(tmp_path):
    """`bpo-fast train --loss-type exo_pair` without label smoothing: exit 2 and one line naming
    the argument, before the (missing) model, data or images are looked at."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    base = [sys.executable, "-m", "bpo_fast.cli", "train", "--model", str(tmp_path / "no-model"),
            "--data", str(tmp_path / "no.jsonl"), "--image-root", str(tmp_path / "no-images"),
            "--output", str(tmp_path / "out")]
    res = subprocess.run(base + ["--loss-type", "exo_pair"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "label_smoothing" in lines[0] and "exo_pair" in lines[0]
    assert not os.path.exists(tmp_path / "out")
    res = subprocess.run(base + ["--loss-type", "aot"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 2 and "--loss-type" in res.stderr and "invalid choice" in res.stderr
