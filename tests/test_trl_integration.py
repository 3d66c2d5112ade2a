"""bpo_fast.integrations.trl against the real TRL 1.16 ``DPOTrainer`` (skipped only when
``trl`` cannot be imported).

Each parity test trains the same tiny model (random weights from a config, built twice from one
seed) on the same vision data set for 3 steps with TRL's own ``DPOTrainer`` and with ours (one
import changed), and compares per step the loss, each pair's policy log-probs and every
gradient. From step 2 on the policy differs from the reference, so the losses are not log 2 and
the comparison is of two computations of the same numbers: TRL sums log-softmax tiles of its
chunked LM head, we sum the fused head's per-token log-probs of the scored tokens, both in fp32,
in different orders; that is float noise of about 1e-7 relative per sum. The parity runs use
plain SGD (lr 0.1; LoRA 2.0), which carries that noise into the next steps unchanged (AdamW's first update
is about ``lr * sign(g)``: a gradient component that is noise in both runs moves the weights by
+-lr, and later gradients then differ by 4e-5 of their largest entry). Tolerances: losses and
log-probs ``rtol=2e-5, atol=2e-5`` (observed: at most 6e-6 on losses, 4e-6 on log-probs of
-27); gradients ``atol = 5e-6 * max|g|``, ``rtol=1e-3`` (observed: at most 5e-7 of the largest
entry). The README script and the 2-process test use AdamW (TRL's default).

About 2-3 minutes on 2 CPU cores (the 2-process ``accelerate launch`` test alone ~1 minute).
"""

import copy
import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

trl = pytest.importorskip("trl")
pytest.importorskip("datasets")

from readme_blocks import block  # noqa: E402

from bpo_fast.integrations import trl as bt  # noqa: E402
from bpo_fast.models.tiny_vlm import build_tiny_vlm  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "a the red blue green circle square cat dog left right of is big small".split()
LOSS_TOL = dict(rtol=2e-5, atol=2e-5)


def vision_dataset(n=6, seed=0, change=None):
    """``n`` TRL conversational vision records (images of three sizes, answers of different
    lengths); ``change``: the index of a record whose chosen answer gets one more word."""
    from datasets import Dataset
    from PIL import Image

    rng = np.random.default_rng(seed)
    recs = []
    for i in range(n):
        img = Image.fromarray(rng.integers(0, 256, (24 + 8 * (i % 3), 32, 3), dtype=np.uint8))
        chosen = " ".join(rng.choice(WORDS, 3 + i % 4))
        rejected = " ".join(rng.choice(WORDS, 2 + i % 5))
        if i == change:
            chosen += " dog"
        recs.append({
            "images": [img],
            "prompt": [{"role": "user", "content": [{"type": "image"},
                                                    {"type": "text", "text": "what is there ?"}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": chosen}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": rejected}]}]})
    return Dataset.from_list(recs)


class Record:
    """Per step: the loss (log history), each row's policy log-probs (a forward hook on the
    model: TRL's fused head output / our step's), the reference log-probs our step used, and
    every gradient (just before the optimizer step)."""

    def __init__(self, trainer):
        from transformers import TrainerCallback

        self.logps, self.ref, self.grads = [], [], []
        rec = self

        class Grads(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
                rec.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()
                                  if p.grad is not None})

        def hook(module, args, out):
            if isinstance(out, dict) and "chosen_logps" in out:  # our step
                self.logps.append(torch.cat([out["chosen_logps"], out["rejected_logps"]]))
                self.ref.append(torch.cat([out["ref_chosen_logps"], out["ref_rejected_logps"]]))
            elif torch.is_grad_enabled() and getattr(out, "log_probs", None) is not None:
                self.logps.append(out.log_probs.detach().sum(1))  # TRL's policy forward

        trainer.add_callback(Grads())
        trainer.model.register_forward_hook(hook)
        self.trainer = trainer

    @property
    def losses(self):
        return [h["loss"] for h in self.trainer.state.log_history if "loss" in h]


def make_trainer(cls, family, out, *, lora=False, loss="sigmoid", precompute=False, ref=True,
                 dataset=None, steps=3, **config):
    from peft import LoraConfig

    model, proc = build_tiny_vlm(family, seed=0)
    config.setdefault("loss_type", [loss])
    config.setdefault("save_strategy", "no")
    # plain SGD: AdamW's first update is about lr * sign(g) (m / sqrt(v) = g / |g|), so a
    # gradient component that is float noise (1e-9 in one run, -1e-9 in the other) moves by
    # +-lr and the next step's gradients differ by more than noise; SGD keeps noise noise
    config.setdefault("optim", "sgd")
    config.setdefault("learning_rate", 2.0 if lora else 0.1)  # LoRA: small gradients (B = 0)
    args = trl.DPOConfig(output_dir=str(out), per_device_train_batch_size=2, max_steps=steps,
                         report_to="none", use_cpu=True, bf16=False, logging_steps=1, seed=0,
                         gradient_checkpointing=False, max_length=None,
                         precompute_ref_log_probs=precompute, **config)
    lcfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]) if lora else None
    ref_model = copy.deepcopy(model) if ref and not lora else None
    return cls(model=model, ref_model=ref_model, args=args, train_dataset=dataset or vision_dataset(),
               processing_class=proc, peft_config=lcfg)


def train(trainer):
    rec = Record(trainer)
    trainer.train()
    return rec


def assert_same_steps(a, b, grads=True):
    assert len(a.losses) == len(b.losses) > 0 and len(a.logps) == len(b.logps) > 0
    np.testing.assert_allclose(a.losses, b.losses, **LOSS_TOL)
    for x, y in zip(a.logps, b.logps):
        torch.testing.assert_close(x, y, **LOSS_TOL)
    if grads:
        assert len(a.grads) == len(b.grads) == len(a.losses)
        for ga, gb in zip(a.grads, b.grads):
            assert ga.keys() == gb.keys()
            scale = max(float(g.abs().max()) for g in ga.values())
            for n in ga:
                torch.testing.assert_close(gb[n], ga[n], rtol=1e-3, atol=5e-6 * scale, msg=n)


# ----------------------------------------------------------------------------------------------
# the step: equal to TRL's own
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss", ["sigmoid", "sigmoid_norm"])
@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_step_equals_trl(family, mode, loss, tmp_path):
    lora = mode == "lora"
    theirs = train(make_trainer(trl.DPOTrainer, family, tmp_path / "trl", lora=lora, loss=loss))
    ours = train(make_trainer(bt.DPOTrainer, family, tmp_path / "ours", lora=lora, loss=loss))
    assert theirs.losses[0] == pytest.approx(np.log(2), abs=1e-6)  # step 1: policy = reference
    # then they part: the policy's log-probs move away from the reference's (nats)
    assert max(float((p - r).abs().max()) for p, r in zip(ours.logps[1:], ours.ref[1:])) > 1e-2
    assert_same_steps(theirs, ours)


def test_sft_weights_and_images_once(tmp_path):
    """loss_type [sigmoid, sft] with weights [w, v] is w * (sigmoid + (v / w) * nll) (RPO), and
    each pair's images reach the model once (the batch holds B images for 2B rows)."""
    cfg = dict(loss_type=["sigmoid", "sft"], loss_weights=[0.5, 0.8])
    theirs = make_trainer(trl.DPOTrainer, "qwen2_vl", tmp_path / "t", **cfg)
    ours = make_trainer(bt.DPOTrainer, "qwen2_vl", tmp_path / "o", **cfg)
    assert ours._bpo_scale == 0.5 and ours._bpo_model.rpo_alpha == pytest.approx(1.6)
    batch = next(iter(ours.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 4 and batch["image_grid_thw"].shape[0] == 2
    theirs_batch = next(iter(theirs.get_train_dataloader()))
    assert torch.equal(batch["input_ids"], theirs_batch["input_ids"])  # TRL's tokens
    assert theirs_batch["image_grid_thw"].shape[0] == 4
    assert_same_steps(train(theirs), train(ours))


# ----------------------------------------------------------------------------------------------
# precompute_ref_log_probs for vision data: TRL refuses, ours equals the live reference
# ----------------------------------------------------------------------------------------------

def test_precomputed_reference_equals_live(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="not supported for vision datasets"):
        make_trainer(trl.DPOTrainer, "qwen2_vl", tmp_path / "trl", precompute=True, ref=False)
    live = train(make_trainer(bt.DPOTrainer, "qwen2_vl", tmp_path / "live"))
    out = tmp_path / "pre"
    pre_trainer = make_trainer(bt.DPOTrainer, "qwen2_vl", out, precompute=True, ref=False)
    assert pre_trainer.ref_model is None  # no reference model held
    assert pre_trainer._bpo_model.reference_mode == "cached"
    pre = train(pre_trainer)
    assert_same_steps(live, pre)
    for x, y in zip(live.ref, pre.ref):  # the cached reference is the live one
        torch.testing.assert_close(y, x, **LOSS_TOL)

    from bpo_fast.train.ref_cache import RefLogpsCache

    files = sorted(p.name for p in out.glob("ref_logps.train.*.safetensors"))
    assert len(files) == 1
    cache = RefLogpsCache.load(str(out / files[0]))
    assert len(cache) == 6 and cache.metadata["tokens"] == bt.CACHE_TOKENS
    # a rerun reads the file back instead of computing (resume_from_checkpoint does the same)
    monkeypatch.setattr(bt.BPOFastMixin, "_reference_logps_over",
                        lambda *a: pytest.fail("recomputed a cached reference"))
    again = make_trainer(bt.DPOTrainer, "qwen2_vl", out, precompute=True, ref=False)
    assert again.train_dataset["ref_chosen_logps"] == pre_trainer.train_dataset["ref_chosen_logps"]
    # one answer changed: other pairs, another file (never the stale numbers)
    monkeypatch.undo()
    make_trainer(bt.DPOTrainer, "qwen2_vl", out, precompute=True, ref=False,
                 dataset=vision_dataset(change=3))
    assert len(list(out.glob("ref_logps.train.*.safetensors"))) == 2


def test_precomputed_reference_lora_and_eval(tmp_path):
    """LoRA (reference = adapters disabled) and an eval split: precomputed = live."""
    ds = vision_dataset(4, seed=1)
    live = make_trainer(bt.DPOTrainer, "llava_onevision", tmp_path / "a", lora=True, steps=2)
    pre = make_trainer(bt.DPOTrainer, "llava_onevision", tmp_path / "b", lora=True,
                       precompute=True, steps=2)
    a, b = train(live), train(pre)
    assert_same_steps(a, b, grads=False)
    ea, eb = live.evaluate(ds), pre.evaluate(ds)
    assert eb["eval_loss"] == pytest.approx(ea["eval_loss"], rel=2e-5)
    assert list((tmp_path / "b").glob("ref_logps.eval.*.safetensors"))


def _resumed(cls, out, monkeypatch=None, **kw):
    """Train 3 steps with a checkpoint per step, then resume from checkpoint-1 in a new
    trainer; the resumed run's record."""
    make_trainer(cls, "qwen2_vl", out, save_strategy="steps", save_steps=1, **kw).train()
    assert (out / "checkpoint-1").is_dir()
    if monkeypatch is not None:  # the cached reference is read back, not recomputed
        monkeypatch.setattr(bt.BPOFastMixin, "_reference_logps_over",
                            lambda *a: pytest.fail("recomputed a cached reference"))
    resumed = make_trainer(cls, "qwen2_vl", out, **kw)
    rec = Record(resumed)
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-1"))
    assert len(rec.logps) == 2 and len(rec.losses) == 3  # steps 2-3 run, step 1's log restored
    return rec


def test_checkpoint_resume_as_trl(tmp_path, monkeypatch):
    """TRL's checkpoints and resume_from_checkpoint keep working with our step and the cached
    reference: the resumed steps equal TRL's own resumed steps (the same weights, optimizer
    state and data; TRL's resumed run is not the uninterrupted one here, and neither is ours)."""
    kw = dict(optim="adamw_torch", learning_rate=1e-3)
    theirs = _resumed(trl.DPOTrainer, tmp_path / "trl", **kw)
    ours = _resumed(bt.DPOTrainer, tmp_path / "ours", monkeypatch, precompute=True, ref=False,
                    **kw)
    assert_same_steps(theirs, ours, grads=False)


# ----------------------------------------------------------------------------------------------
# what the step cannot compute exactly: refused when the trainer is built, naming the setting
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config, named", [
    (dict(loss_type=["sigmoid", "bco_pair"]), "loss_type"),
    (dict(loss_type=["aot"]), "loss_type"),
    (dict(loss_type=["sigmoid", "sft"], loss_weights=[0.0, 1.0]), "loss_weights"),
    (dict(f_divergence_type="js_divergence"), "f_divergence_type"),
    (dict(ld_alpha=0.5), "ld_alpha"),
    (dict(use_weighting=True), "use_weighting"),
    (dict(loss_type=["robust"], label_smoothing=0.5), "label_smoothing"),
])
def test_settings_refused(config, named, tmp_path):
    args = trl.DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, **config)
    with pytest.raises(ValueError, match=named):
        bt.step_settings(args)
    with pytest.raises(ValueError, match=named):  # before any model is loaded
        bt.DPOTrainer(model="/nonexistent", args=args, train_dataset=vision_dataset(2))


def test_settings_mapped(tmp_path):
    def kw(**c):
        return bt.step_settings(trl.DPOConfig(output_dir=str(tmp_path), report_to="none",
                                              use_cpu=True, **c))

    got, scale = kw(loss_type=["exo_pair"], label_smoothing=1e-3, beta=0.3)
    assert got == {"loss_type": "exo_pair", "beta": 0.3, "rpo_alpha": None,
                   "length_count": "completion", "label_smoothing": 1e-3} and scale == 1.0
    got, _ = kw(loss_type=["sigmoid"], label_smoothing=0.2)  # TRL ignores it there: so do we
    assert "label_smoothing" not in got
    got, _ = kw(loss_type=["discopop"], discopop_tau=0.2)
    assert got["discopop_tau"] == 0.2


def _cpu_args(tmp_path):
    return trl.DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False,
                         max_length=None)


def test_construction_refusals(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from bpo_fast.models.tiny import build_word_tokenizer

    args = _cpu_args(tmp_path)
    model, proc = build_tiny_vlm("qwen2_vl", seed=0)
    with pytest.raises(ValueError, match="data_collator"):
        bt.DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                      train_dataset=vision_dataset(2), processing_class=proc,
                      data_collator=lambda x: x)
    tok = build_word_tokenizer(WORDS)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2))
    from datasets import Dataset

    text = Dataset.from_list([{"prompt": "a", "chosen": " red", "rejected": " blue"}] * 2)
    with pytest.raises(ValueError, match="model: bpo_fast.integrations.trl runs vision-language"):
        bt.DPOTrainer(model=lm, ref_model=copy.deepcopy(lm), args=args, train_dataset=text,
                      processing_class=tok)


def test_paligemma_and_foreign_rows_refused(tmp_path):
    args = _cpu_args(tmp_path)
    model, proc = build_tiny_vlm("paligemma", seed=0)
    with pytest.raises(ValueError, match="model: PaliGemma is not supported"):
        bt.DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                      train_dataset=vision_dataset(2), processing_class=proc)
    # rows whose mm_token_type_ids are not what the adapter builds: refused, never run
    t = make_trainer(bt.DPOTrainer, "qwen2_vl", tmp_path / "q", steps=1)
    batch = t._prepare_inputs(next(iter(t.get_train_dataloader())))
    batch["mm_token_type_ids"] = torch.zeros_like(batch["mm_token_type_ids"])
    with pytest.raises(ValueError, match="mm_token_type_ids"):
        t.compute_loss(t.model, batch)


def test_own_trainer_subclass(tmp_path):
    class Mine(trl.DPOTrainer):
        pass

    cls = bt.bpo_fast_trainer(Mine)
    assert issubclass(cls, Mine) and issubclass(cls, bt.BPOFastMixin)
    assert bt.bpo_fast_trainer(cls) is cls
    with pytest.raises(TypeError, match="trainer_cls"):
        bt.bpo_fast_trainer(object)
    t = make_trainer(cls, "qwen2_vl", tmp_path, steps=1)
    assert train(t).losses[0] == pytest.approx(np.log(2), abs=1e-6)


# ----------------------------------------------------------------------------------------------
# accelerate launch: 2 processes (gloo, CPU) = 1 process on the same global batch
# ----------------------------------------------------------------------------------------------

DIST_SCRIPT = r'''
import json, sys, warnings
import torch
warnings.filterwarnings("ignore")
sys.path.insert(0, sys.argv[3])
from test_trl_integration import vision_dataset
from trl import DPOConfig
from bpo_fast.integrations.trl import DPOTrainer
from bpo_fast.models.tiny_vlm import build_tiny_vlm

out, world = sys.argv[1], int(sys.argv[2])
model, proc = build_tiny_vlm("qwen2_vl", seed=0)
args = DPOConfig(output_dir=out, per_device_train_batch_size=4 // world, max_steps=3,
                 learning_rate=1e-3, loss_type=["sigmoid_norm"], precompute_ref_log_probs=True,
                 report_to="none", use_cpu=True, bf16=False, logging_steps=1, save_strategy="no",
                 seed=0, gradient_checkpointing=False, max_length=None)
trainer = DPOTrainer(model=model, args=args, train_dataset=vision_dataset(8),
                     processing_class=proc)
assert trainer.accelerator.num_processes == world, trainer.accelerator.num_processes
trainer.train()
if trainer.accelerator.is_main_process:
    params = {n: p.detach() for n, p in trainer.model.named_parameters() if p.requires_grad}
    torch.save(params, out + "/params.pt")
    with open(out + "/log.json", "w") as f:
        json.dump(trainer.state.log_history, f)
'''


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_two_processes_equal_one(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(DIST_SCRIPT)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    tests = os.path.join(ROOT, "tests")
    runs = {}
    for world in (1, 2):
        out = tmp_path / f"w{world}"
        out.mkdir()
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", str(world), "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
               str(script), str(out), str(world), tests]
        if world == 1:
            cmd = [sys.executable, str(script), str(out), "1", tests]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        logs = json.loads((out / "log.json").read_text())
        runs[world] = ([h for h in logs if "loss" in h], torch.load(out / "params.pt"))
        assert len(list(out.glob("ref_logps.train.*.safetensors"))) == 1
    (one, p1), (two, p2) = runs[1], runs[2]
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        for k in ("loss", "grad_norm", "rewards/margins", "logps/chosen", "logps/rejected"):
            assert b[k] == pytest.approx(a[k], rel=2e-5, abs=2e-5), k
    assert abs(one[-1]["loss"] - one[0]["loss"]) > 1e-4
    for n in p1:
        torch.testing.assert_close(p2[n], p1[n], rtol=1e-4, atol=1e-6, msg=n)


# ----------------------------------------------------------------------------------------------
# the README's "Use from TRL" script
# ----------------------------------------------------------------------------------------------

def _run_script(code, tmp_path, name):
    """Run the README block in its own folder; its losses (full precision, from the trainer
    the script built) and what it printed."""
    import contextlib
    import io

    cwd, d = os.getcwd(), tmp_path / name
    d.mkdir()
    os.chdir(d)
    ns = {"__name__": "__main__"}
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            exec(compile(code, f"README trl-script ({name})", "exec"), ns)
    finally:
        os.chdir(cwd)
    losses = [h["loss"] for h in ns["trainer"].state.log_history if "loss" in h]
    assert f"losses: {[round(x, 4) for x in losses]}" in buf.getvalue()
    return losses


def test_readme_trl_script(tmp_path):
    code = block("trl-script")
    ours_import = "from bpo_fast.integrations.trl import DPOTrainer"
    trl_import = "from trl import DPOTrainer"
    precompute = "precompute_ref_log_probs=True"
    assert code.count(ours_import) == 1 and code.count(precompute) == 1
    ours = _run_script(code, tmp_path, "ours")
    assert len(ours) == 4 and abs(ours[-1] - ours[0]) > 1e-3
    assert list((tmp_path / "ours" / "trl-out").glob("ref_logps.train.*.safetensors"))
    # TRL's own DPOTrainer refuses the vision reference cache ...
    with pytest.raises(ValueError, match="not supported for vision datasets"):
        _run_script(code.replace(ours_import, trl_import), tmp_path, "trl-precompute")
    # ... and without it (its live LoRA reference) computes the same losses
    theirs = _run_script(code.replace(ours_import, trl_import).replace(
        precompute, "precompute_ref_log_probs=False"), tmp_path, "trl")
    print("README script losses, ours / TRL:", ours, theirs)
    np.testing.assert_allclose(ours, theirs, **LOSS_TOL)
