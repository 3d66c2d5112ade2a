import json
import os

import pytest
import torch

from bpo_fast.train import METRIC_KEYS, TrainConfig, train
from bpo_fast.train.synthetic import make_pairs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("train_pairs"))
    return make_pairs(root, n=8, seed=5), root


def _cfg(tiny_llava_dir, data, out, **kw):
    path, root = data
    # CPU and fp32 even where a GPU exists: these tests compare numbers exactly
    base = dict(model=tiny_llava_dir, data=path, image_root=root, output=str(out), batch_size=2,
                device="cpu",
                max_length=64, learning_rate=2e-3, warmup_steps=0, progress=False, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_loss_goes_down_and_metrics_and_final_model(tiny_llava_dir, data, tmp_path):
    from transformers import LlavaForConditionalGeneration

    out = tmp_path / "full"
    # full-batch steps (4 pairs x 2 micro-batches = the 8 pairs): a deterministic descent
    res = train(_cfg(tiny_llava_dir, data, out, max_steps=6, batch_size=4, grad_accum=2,
                     learning_rate=1e-3, beta=0.5))
    rows = _metrics(str(out))
    assert [r["step"] for r in rows] == list(range(1, 7)) and res["history"] == rows
    assert all(tuple(r) == METRIC_KEYS for r in rows)
    assert all(isinstance(r[k], (int, float)) for r in rows for k in METRIC_KEYS)
    losses = [r["loss"] for r in rows]
    assert all(r["dpo_loss"] == r["loss"] for r in rows)     # no extra term
    assert abs(losses[0] - 0.6931) < 1e-3      # policy == reference at step 1
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.5
    assert rows[-1]["reward_margin"] > 0 and rows[-1]["reward_accuracy"] > 0.5
    assert rows[-1]["epoch"] == pytest.approx(6.0)
    # the final model loads with from_pretrained and differs from the start in the LLM only
    model = LlavaForConditionalGeneration.from_pretrained(str(out))
    start = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir)
    sd, sd0 = model.state_dict(), start.state_dict()
    changed = {k for k in sd if not torch.equal(sd[k], sd0[k])}
    assert changed and all("vision_tower" not in k and "multi_modal_projector" not in k
                           for k in changed)
    assert os.path.isfile(out / "checkpoint-6" / "trainable.safetensors")


def test_resume_gives_the_same_losses(tiny_llava_dir, data, tmp_path):
    from bpo_fast.cli import main

    full = tmp_path / "a"
    train(_cfg(tiny_llava_dir, data, full, max_steps=4, grad_accum=2, save_every=2, epochs=2))
    ref = _metrics(str(full))
    # "interrupted" run: checkpoint-2 copied to a fresh output, continued through the CLI
    import shutil

    part = tmp_path / "b"
    os.makedirs(part)
    shutil.copytree(full / "checkpoint-2", part / "checkpoint-2")
    with open(part / "metrics.jsonl", "w") as f:
        for r in ref[:3]:   # includes one line "written after" the checkpoint: must be dropped
            f.write(json.dumps(r) + "\n")
    path, root = data
    rc = main(["train", "--model", tiny_llava_dir, "--data", path, "--image-root", root,
               "--output", str(part), "--batch-size", "2", "--grad-accum", "2", "--max-steps", "4",
               "--max-length", "64", "--lr", "2e-3", "--warmup-steps", "0", "--save-every", "2",
               "--resume", "--no-progress", "--device", "cpu"])
    assert rc == 0
    got = _metrics(str(part))
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(ref[2:], got[2:]):
        for k in ("loss", "reward_margin", "logps_chosen", "logps_rejected", "lr"):
            assert a[k] == pytest.approx(b[k], abs=1e-6), k


def test_rpo_alpha_logs_the_dpo_part_apart(tiny_llava_dir, data, tmp_path):
    res = train(_cfg(tiny_llava_dir, data, tmp_path / "rpo", max_steps=2, rpo_alpha=0.5))
    for r in res["history"]:
        assert r["loss"] > r["dpo_loss"] > 0     # + 0.5 * the chosen tokens' NLL (> 0)
    with pytest.raises(ValueError, match="rpo_alpha"):
        _cfg(tiny_llava_dir, data, tmp_path / "x", rpo_alpha=-0.1)


def test_term_metrics_nll_margins_and_term_gradients(tiny_llava_dir, data, tmp_path):
    """The DPO and RPO terms apart: the chosen NLL, the implicit reward margin in nats (summed
    and per token), and with log_term_grads each term's gradient norm, whose sum is the full
    gradient (measured before clipping)."""
    from bpo_fast.train.term_grads import TERM_KEYS

    rows = train(_cfg(tiny_llava_dir, data, tmp_path / "t", max_steps=3, rpo_alpha=0.5,
                      grad_accum=2, beta=0.5, log_term_grads=True,
                      max_grad_norm=1e-3))["history"]   # clipped: the norms are the unclipped
    for r in rows:
        assert r["loss"] == pytest.approx(r["dpo_loss"] + 0.5 * r["nll"], rel=1e-5)
        # rewards are beta * (policy - reference) log-probs, so the margin in nats is theirs / beta
        assert r["logratio_margin"] == pytest.approx(r["reward_margin"] / 0.5, abs=1e-5)
        assert set(TERM_KEYS) <= set(r) and r["grad_norm_dpo"] > 0 and r["grad_norm_rpo"] > 0
        cos = r["grad_cos_dpo_rpo"]
        assert -1 <= cos <= 1
        # |g|^2 = |g_dpo|^2 + |g_rpo|^2 + 2 g_dpo . g_rpo
        full = (r["grad_norm_dpo"] ** 2 + r["grad_norm_rpo"] ** 2
                + 2 * cos * r["grad_norm_dpo"] * r["grad_norm_rpo"]) ** 0.5
        assert full == pytest.approx(r["grad_norm"], rel=1e-4)
    assert rows[0]["logratio_margin"] == pytest.approx(0.0, abs=1e-5)   # policy == reference
    assert rows[-1]["logratio_margin"] != 0 and rows[-1]["logratio_margin_per_token"] != 0
    # the DPO term alone (no RPO): its gradient is the full one, the RPO term's is 0
    rows = train(_cfg(tiny_llava_dir, data, tmp_path / "d", max_steps=2,
                      log_term_grads=True))["history"]
    for r in rows:
        assert r["grad_norm_dpo"] == pytest.approx(r["grad_norm"], rel=1e-5)
        assert r["grad_norm_rpo"] == 0 and r["grad_cos_dpo_rpo"] is None
    # off by default: no extra backward, no term keys
    rows = train(_cfg(tiny_llava_dir, data, tmp_path / "n", max_steps=1))["history"]
    assert not set(TERM_KEYS) & set(rows[0])


def test_fresh_run_refuses_an_earlier_runs_checkpoints(tiny_llava_dir, data, tmp_path):
    out = tmp_path / "o"
    train(_cfg(tiny_llava_dir, data, out, max_steps=2, save_every=1))
    assert os.path.isdir(out / "checkpoint-2")
    # a later --resume would pick the old run's checkpoint: refuse, naming the way out
    with pytest.raises(ValueError, match="output.*checkpoint-2.*overwrite"):
        train(_cfg(tiny_llava_dir, data, out, max_steps=1))
    res = train(_cfg(tiny_llava_dir, data, out, max_steps=1, overwrite=True))
    assert res["steps"] == 1 and [r["step"] for r in _metrics(str(out))] == [1]
    assert sorted(os.listdir(out)).count("checkpoint-1") == 1
    assert not any(n in os.listdir(out) for n in ("checkpoint-2",))


def test_lora_and_cached_reference_agree(tiny_llava_dir, data, tmp_path):
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    from bpo_fast.train.ref_cache import compute_reference_logps

    path, root = data
    lora = train(_cfg(tiny_llava_dir, data, tmp_path / "lora", max_steps=3, lora_r=4,
                      lora_dropout=0.0, learning_rate=1e-2, merge_lora=True,
                      gradient_checkpointing=True))
    assert lora["history"][-1]["loss"] < lora["history"][0]["loss"]
    merged = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "lora"))
    adapted = PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir),
                                        str(tmp_path / "lora" / "adapter"))
    ids = torch.tensor([[3, 7, 9, 11, 5]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits,
                                   adapted(input_ids=ids).logits, atol=1e-4, rtol=0)

    # full fine-tuning with a model reference == with the cached reference
    cache = str(tmp_path / "ref.safetensors")
    compute_reference_logps(tiny_llava_dir, path, root, cache, max_length=64, progress=False,
                            device="cpu")
    a = train(_cfg(tiny_llava_dir, data, tmp_path / "m", max_steps=3))["history"]
    b = train(_cfg(tiny_llava_dir, data, tmp_path / "c", max_steps=3, reference="cached",
                   ref_cache=cache))["history"]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
        assert x["reward_margin"] == pytest.approx(y["reward_margin"], abs=1e-5)
    with pytest.raises(ValueError, match="max_length"):
        train(_cfg(tiny_llava_dir, data, tmp_path / "d", max_steps=1, reference="cached",
                   ref_cache=cache, max_length=32))


def test_config_validation(tiny_llava_dir, data, tmp_path):
    with pytest.raises(ValueError, match="lora_r"):
        _cfg(tiny_llava_dir, data, tmp_path, reference="lora")
    with pytest.raises(ValueError, match="ref_cache"):
        _cfg(tiny_llava_dir, data, tmp_path, reference="cached")
    with pytest.raises(ValueError, match="batch_size"):
        _cfg(tiny_llava_dir, data, tmp_path, batch_size=0)
    with pytest.raises(ValueError, match="dtype"):
        _cfg(tiny_llava_dir, data, tmp_path, dtype="fp8")
    with pytest.raises(ValueError, match="loss_type"):
        _cfg(tiny_llava_dir, data, tmp_path, loss_type="nope")
    with pytest.raises(ValueError, match="merge_lora"):
        _cfg(tiny_llava_dir, data, tmp_path, merge_lora=True)
    for bad, name in [(dict(log_every=0), "log_every"), (dict(keep_checkpoints=0), "keep_checkpoints"),
                      (dict(warmup_steps=-1), "warmup_steps"), (dict(warmup_ratio=1.5), "warmup_ratio"),
                      (dict(learning_rate=-1.0), "learning_rate"), (dict(num_workers=-1), "num_workers"),
                      (dict(lora_r=4, lora_dropout=1.0), "lora_dropout"),
                      (dict(lora_r=4, train_vision=True), "train_vision")]:
        with pytest.raises(ValueError, match=name):
            _cfg(tiny_llava_dir, data, tmp_path, **bad)
    assert _cfg(tiny_llava_dir, data, tmp_path, lora_r=8).reference == "lora"
    with pytest.raises(ValueError, match="global batch"):
        train(_cfg(tiny_llava_dir, data, tmp_path / "x", batch_size=8, grad_accum=2))
    with pytest.raises(ValueError, match="resume"):
        train(_cfg(tiny_llava_dir, data, tmp_path / "y", resume=str(tmp_path / "none")))


def test_lora_target_modules_names_or_regex(tiny_llava_dir, data, tmp_path):
    from peft import get_peft_model

    from bpo_fast.models.preference import load_vlm
    from bpo_fast.train.trainer import _lora_config

    model = load_vlm(tiny_llava_dir)
    for spec, want in [("q_proj", ["q_proj"]), ("q_proj, v_proj", ["q_proj", "v_proj"]),
                       (r".*language_model.*\.q_proj", r".*language_model.*\.q_proj")]:
        lc = _lora_config(_cfg(tiny_llava_dir, data, tmp_path, lora_r=4, lora_target_modules=spec),
                          model)
        assert (sorted(lc.target_modules) if isinstance(want, list) else lc.target_modules) == want
    # a lone module name finds its modules (as a string it would be a full-match regex: none)
    lc = _lora_config(_cfg(tiny_llava_dir, data, tmp_path, lora_r=4, lora_target_modules="q_proj"),
                      model)
    peft_model = get_peft_model(model, lc)
    assert any("q_proj.lora_A" in n for n, _ in peft_model.named_parameters())


def test_cached_reference_settings_must_match(tiny_llava_dir, data, tmp_path):
    from bpo_fast.train.ref_cache import compute_reference_logps

    path, root = data
    cache = str(tmp_path / "ref_t2.safetensors")
    compute_reference_logps(tiny_llava_dir, path, root, cache, max_length=64, temperature=2.0,
                            progress=False, device="cpu")
    with pytest.raises(ValueError, match="temperature"):
        train(_cfg(tiny_llava_dir, data, tmp_path / "t", max_steps=1, reference="cached",
                   ref_cache=cache))


def test_cli_errors_name_the_argument(tiny_llava_dir, data, tmp_path, capsys):
    from bpo_fast.cli import main

    path, root = data
    base = ["--data", path, "--image-root", root, "--no-progress", "--device", "cpu"]
    assert main(["train", "--model", str(tmp_path / "nope"), "--output", str(tmp_path / "o"),
                 *base]) == 2
    assert "bpo-fast train: error: model:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:   # argparse checks the option's range
        main(["train", "--model", tiny_llava_dir, "--output", str(tmp_path / "o"),
              "--batch-size", "0", *base])
    assert e.value.code == 2 and "--batch-size" in capsys.readouterr().err
    assert main(["ref-logps", "--model", tiny_llava_dir, "--data", str(tmp_path / "none.jsonl"),
                 "--image-root", root, "--out", str(tmp_path / "r.safetensors"),
                 "--no-progress"]) == 2
    assert "bpo-fast ref-logps: error: data:" in capsys.readouterr().err


@pytest.mark.cuda
def test_cuda_bf16_training_runs(tiny_llava_dir, data, tmp_path):
    # dtype auto on CUDA: bf16 frozen weights, fp32 trainable master weights, autocast, fused AdamW
    res = train(_cfg(tiny_llava_dir, data, tmp_path / "cuda", max_steps=3, device="cuda",
                     lora_r=4, learning_rate=1e-2, gradient_checkpointing=True))
    rows = res["history"]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert all(r["peak_mem_bytes"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_cli_prints_our_checks_and_keeps_library_tracebacks():
    from bpo_fast.cli import raised_here

    with pytest.raises(ValueError) as ours:
        TrainConfig(model="m", data="d", image_root="r", output="o", beta=-1.0)
    assert raised_here(ours.value)
    with pytest.raises(ValueError) as theirs:   # raised inside torch: not a check of ours
        torch.nn.functional.binary_cross_entropy(torch.zeros(2), torch.zeros(3))
    assert not raised_here(theirs.value)
