import json
import os

import pytest
import torch

from bpo_fast.data.preference import PreferenceCollator, PreferenceDataset
from bpo_fast.models.preference import (PreferenceModel, default_lora_targets, load_vlm,
                                        prepare_policy)
from bpo_fast.train.synthetic import make_pairs

TOL = 1e-5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("pairs"))
    return make_pairs(root, n=6, seed=3), root


@pytest.fixture(scope="module")
def batch(data, tiny_llava_dir):
    from transformers import AutoProcessor

    path, root = data
    ds = PreferenceDataset(path, root)
    b = PreferenceCollator(AutoProcessor.from_pretrained(tiny_llava_dir))([ds[i] for i in range(3)])
    # make the rows of different lengths so padding is exercised
    b["attention_mask"][1, -3:] = 0
    b["labels"][1, -3:] = -100
    b["input_ids"][1, -3:] = 0
    return b


def _inputs(b):
    return {k: b[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values")}


def naive_logps(model, b, images=True):
    """The plain HF way: every row with its own copy of the image, full logits, log_softmax.
    ``images=False``: the image tokens keep their text embeddings (the images dropped, what
    transformers < 5.18 computed for our steps)."""
    with torch.no_grad():
        pv = torch.cat([b["pixel_values"], b["pixel_values"]]) if images else None
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                       pixel_values=pv).logits[:, :-1].float()
        lab = b["labels"][:, 1:]
        mask = lab != -100
        lp = torch.log_softmax(logits, -1).gather(-1, lab.clamp_min(0)[..., None])[..., 0]
        return (lp * mask).sum(-1)


class VisionCalls:
    """Counts vision-tower calls (and images seen) of one model."""

    def __init__(self, model):
        from bpo_fast.models.preference import unwrap

        self.calls, self.images = 0, 0
        tower = unwrap(model).model.vision_tower
        self.handle = tower.register_forward_hook(self._hook)

    def _hook(self, module, args, kwargs_or_out, *rest):
        self.calls += 1
        self.images += args[0].shape[0]


def _perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)


def test_model_reference_matches_naive_forward_and_encodes_once(tiny_llava_dir, batch):
    policy = prepare_policy(load_vlm(tiny_llava_dir))          # vision tower + projector frozen
    _perturb(policy.model.language_model, 1)                   # policy != reference
    reference = load_vlm(tiny_llava_dir)
    pm = PreferenceModel(policy, reference, beta=0.1)
    assert pm.share_image_features                             # same frozen image path
    cp, cr = VisionCalls(policy), VisionCalls(reference)
    out = pm(**_inputs(batch))
    assert (cp.calls, cp.images, cr.calls) == (1, 3, 0)
    want_p, want_r = naive_logps(policy, batch), naive_logps(reference, batch)
    torch.testing.assert_close(torch.cat([out.policy_chosen_logps, out.policy_rejected_logps]),
                               want_p, atol=TOL, rtol=0)
    torch.testing.assert_close(torch.cat([out.ref_chosen_logps, out.ref_rejected_logps]),
                               want_r, atol=TOL, rtol=0)
    n = (batch["labels"][:, 1:] != -100).sum(-1)
    assert torch.equal(torch.cat([out.chosen_tokens, out.rejected_tokens]), n)
    assert out.loss.requires_grad and not out.ref_chosen_logps.requires_grad

    # a reference with another image path encodes its own images, once
    other = load_vlm(tiny_llava_dir)
    _perturb(other.model.vision_tower, 2)
    pm2 = PreferenceModel(policy, other)
    assert not pm2.share_image_features
    cp2, co = VisionCalls(policy), VisionCalls(other)
    out2 = pm2(**_inputs(batch))
    assert (cp2.calls, cp2.images, co.calls, co.images) == (1, 3, 1, 3)
    torch.testing.assert_close(torch.cat([out2.ref_chosen_logps, out2.ref_rejected_logps]),
                               naive_logps(other, batch), atol=TOL, rtol=0)


def test_gradients_match_naive_dpo(tiny_llava_dir, batch):
    from bpo_fast.ops.dpo import dpo_loss

    policy = prepare_policy(load_vlm(tiny_llava_dir), train_projector=True)
    _perturb(policy.model.language_model, 4)
    reference = load_vlm(tiny_llava_dir)
    pm = PreferenceModel(policy, reference, beta=0.5)
    out = pm(**_inputs(batch))
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}
    policy.zero_grad()
    assert any("multi_modal_projector" in n for n in got)       # projector trains when asked
    assert not any("vision_tower" in n for n in got)

    pv = torch.cat([batch["pixel_values"]] * 2)
    logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=pv).logits[:, :-1].float()
    lab = batch["labels"][:, 1:]
    lp = (torch.log_softmax(logits, -1).gather(-1, lab.clamp_min(0)[..., None])[..., 0]
          * (lab != -100)).sum(-1)
    ref = naive_logps(reference, batch)
    want = dpo_loss(lp[:3], lp[3:], ref[:3], ref[3:], beta=0.5, loss_type="sigmoid",
                    label_smoothing=0.0)
    want.loss.backward()
    torch.testing.assert_close(out.loss, want.loss, atol=TOL, rtol=0)
    for n, p in policy.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_rpo_term_is_the_chosen_token_nll(tiny_llava_dir, batch):
    policy = prepare_policy(load_vlm(tiny_llava_dir))
    _perturb(policy.model.language_model, 5)
    reference = load_vlm(tiny_llava_dir)
    plain = PreferenceModel(policy, reference, beta=0.3)(**_inputs(batch))
    out = PreferenceModel(policy, reference, beta=0.3, rpo_alpha=0.7)(**_inputs(batch))
    torch.testing.assert_close(out.dpo.loss, plain.dpo.loss)
    # TRL's RPO: cross-entropy over every chosen token of the batch (naive full logits here)
    pv = batch["pixel_values"]
    logits = policy(input_ids=batch["input_ids"][:3], attention_mask=batch["attention_mask"][:3],
                    pixel_values=pv).logits[:, :-1].float()
    lab = batch["labels"][:3, 1:]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), lab.reshape(-1),
                                            ignore_index=-100)
    torch.testing.assert_close(out.loss, plain.loss + 0.7 * nll, atol=TOL, rtol=0)
    # the term trains the chosen answers' likelihood up
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())
    with pytest.raises(ValueError, match="rpo_alpha"):
        PreferenceModel(policy, reference, rpo_alpha=-1.0)


def test_lora_reference_is_the_policy_without_adapters(tiny_llava_dir, batch):
    from peft import LoraConfig

    base = load_vlm(tiny_llava_dir)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                     target_modules=default_lora_targets(base))
    policy = prepare_policy(base, lora=cfg)
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("vision_tower" in n for n in trainable)
    pm = PreferenceModel(policy)
    assert pm.reference_mode == "lora" and pm.share_image_features and pm.reference is None
    calls = VisionCalls(policy)
    policy.eval()
    out = pm(**_inputs(batch))
    assert (calls.calls, calls.images) == (1, 3)                 # one encode for both passes
    want_p = naive_logps(policy, batch)
    with policy.disable_adapter():
        want_r = naive_logps(policy, batch)
    assert (want_p - want_r).abs().max() > 1e-3                  # the adapters do something
    torch.testing.assert_close(torch.cat([out.policy_chosen_logps, out.policy_rejected_logps]),
                               want_p, atol=TOL, rtol=0)
    torch.testing.assert_close(torch.cat([out.ref_chosen_logps, out.ref_rejected_logps]),
                               want_r, atol=TOL, rtol=0)
    out.loss.backward()
    assert all(p.grad is not None for n, p in policy.named_parameters() if p.requires_grad)


def test_cached_reference_via_cli_matches_naive(tiny_llava_dir, data, batch, tmp_path):
    from bpo_fast.cli import main
    from bpo_fast.train.ref_cache import RefLogpsCache

    path, root = data
    out_file = str(tmp_path / "ref.safetensors")
    rc = main(["ref-logps", "--model", tiny_llava_dir, "--data", path, "--image-root", root,
               "--out", out_file, "--batch-size", "4", "--no-progress", "--device", "cpu"])
    assert rc == 0 and os.path.isfile(out_file) and not os.path.exists(out_file + ".partial.jsonl")
    cache = RefLogpsCache.load(out_file)
    assert len(cache) == 6
    reference = load_vlm(tiny_llava_dir)
    c, r = cache.lookup(batch["ids"])
    want = naive_logps(reference, batch)
    # the fixture shortened row 1; its cached value is of the full row, so compare the others
    torch.testing.assert_close(c[[0, 2]], want[[0, 2]], atol=TOL, rtol=0)
    torch.testing.assert_close(r, want[3:], atol=TOL, rtol=0)

    policy = prepare_policy(load_vlm(tiny_llava_dir))
    pm = PreferenceModel(policy, reference_mode="cached")
    calls = VisionCalls(policy)
    out = pm(**_inputs(batch), ref_chosen_logps=c, ref_rejected_logps=r)
    assert calls.calls == 1
    torch.testing.assert_close(out.ref_chosen_logps, c)
    with pytest.raises(ValueError, match="cached"):
        pm(**_inputs(batch))
    with pytest.raises(KeyError, match="nope"):
        cache.lookup(["nope"])


def test_ref_cache_resumes_from_partial_file(tiny_llava_dir, data, tmp_path):
    from bpo_fast.train.ref_cache import RefLogpsCache, compute_reference_logps

    path, root = data
    out_file = str(tmp_path / "ref.safetensors")
    full = compute_reference_logps(tiny_llava_dir, path, root, str(tmp_path / "full.safetensors"),
                                   batch_size=3, progress=False, device="cpu")
    from bpo_fast.train.ref_cache import model_fingerprint

    settings = {"model": os.path.abspath(tiny_llava_dir),
                "model_fingerprint": model_fingerprint(tiny_llava_dir), "temperature": 1.0,
                "max_length": None, "dtype": "float32"}

    def digest(i):
        return bytes(full.pair_digests[i].tolist()).hex()
    # an interrupted run: two pairs done (one with a sentinel value), then a torn line
    with open(out_file + ".partial.jsonl", "w") as f:
        f.write(json.dumps({"id": full.ids[0], "chosen": -1234.5, "rejected": -1.0,
                            "digest": digest(0), "settings": settings}) + "\n")
        f.write(json.dumps({"id": full.ids[1], "chosen": full.chosen_logps[1].item(),
                            "rejected": full.rejected_logps[1].item(), "digest": digest(1),
                            "settings": settings}) + "\n")
        f.write('{"id": "torn')
    compute_reference_logps(tiny_llava_dir, path, root, out_file, batch_size=3, progress=False,
                            device="cpu")
    got = RefLogpsCache.load(out_file)
    assert got.ids == full.ids
    assert got.chosen_logps[0].item() == -1234.5                 # kept, not recomputed
    assert torch.equal(got.chosen_logps[1:], full.chosen_logps[1:])
    assert torch.equal(got.rejected_logps[2:], full.rejected_logps[2:])
    # other settings cannot silently mix into a partial file
    with open(out_file + ".partial.jsonl", "w") as f:
        f.write(json.dumps({"id": full.ids[0], "chosen": 0.0, "rejected": 0.0, "chosen_tokens": 1,
                            "rejected_tokens": 1, "settings": {**settings, "max_length": 7}}) + "\n")
    with pytest.raises(ValueError, match="other settings"):
        compute_reference_logps(tiny_llava_dir, path, root, out_file, progress=False, device="cpu",
                                overwrite=True)


def test_packed_rows_match_padded(tiny_llava_dir, batch):
    policy = prepare_policy(load_vlm(tiny_llava_dir))
    reference = load_vlm(tiny_llava_dir)
    padded = PreferenceModel(policy, reference, packing=False)(**_inputs(batch))
    packed = PreferenceModel(policy, reference, packing=True)(**_inputs(batch))
    for a, b in ((padded.policy_chosen_logps, packed.policy_chosen_logps),
                 (padded.policy_rejected_logps, packed.policy_rejected_logps),
                 (padded.ref_rejected_logps, packed.ref_rejected_logps)):
        torch.testing.assert_close(a, b, atol=TOL, rtol=0)


def test_bad_inputs(tiny_llava_dir, batch):
    from transformers import LlamaConfig, LlamaForCausalLM

    policy = load_vlm(tiny_llava_dir)
    with pytest.raises(TypeError, match="get_image_features"):
        PreferenceModel(LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16,
                                                     intermediate_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2)))
    with pytest.raises(ValueError, match="peft"):
        PreferenceModel(policy, reference_mode="lora")
    with pytest.raises(ValueError, match="reference"):
        PreferenceModel(policy, reference_mode="model")
    with pytest.raises(ValueError, match="loss_type"):
        PreferenceModel(policy, reference_mode="cached", loss_type="nope")
    pm = PreferenceModel(policy, reference_mode="cached")
    inp = _inputs(batch)
    c = torch.zeros(3)
    with pytest.raises(ValueError, match="pixel_values"):
        pm(**{**inp, "pixel_values": inp["pixel_values"][:2]}, ref_chosen_logps=c, ref_rejected_logps=c)
    with pytest.raises(ValueError, match="even"):
        pm(inp["input_ids"][:5], inp["attention_mask"][:5], inp["labels"][:5],
           inp["pixel_values"], ref_chosen_logps=c, ref_rejected_logps=c)
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        pm(**inp, ref_chosen_logps=torch.zeros(2), ref_rejected_logps=torch.zeros(2))
    ids = inp["input_ids"].clone()
    ids[ids == policy.config.image_token_id] = 7
    with pytest.raises(ValueError, match="image tokens"):
        pm(ids, inp["attention_mask"], inp["labels"], inp["pixel_values"],
           ref_chosen_logps=c, ref_rejected_logps=c)


def test_load_and_prepare_errors_name_the_argument(tiny_llava_dir, tmp_path):
    from peft import LoraConfig

    with pytest.raises(FileNotFoundError, match="model: .*not a directory"):
        load_vlm(str(tmp_path / "no_such_model"))
    base = load_vlm(tiny_llava_dir)
    cfg = LoraConfig(r=4, target_modules=default_lora_targets(base))
    with pytest.raises(ValueError, match="freeze_vision"):
        prepare_policy(base, lora=cfg, freeze_vision=False)   # never silently ignored


def bf16_vs_naive(tiny_llava_dir, batch, device, attn="sdpa"):
    """The DPO step in bf16 (packing auto: on with flash-attention) against the naive HF forward
    in fp32, within the bf16 noise floor of the naive forward (tests/noise_floor.py); negative
    control: the naive bf16 forward with the images dropped must fail the same tolerance."""
    from noise_floor import assert_noise_floor

    from bpo_fast.models.preference import flash_attn_available

    if attn == "flash_attention_2" and not flash_attn_available():
        pytest.skip("flash-attn not installed")
    dev = torch.device(device)
    policy = prepare_policy(load_vlm(tiny_llava_dir, dtype=torch.bfloat16, device=dev,
                                     attn_implementation=attn))
    naive_model = load_vlm(tiny_llava_dir, dtype=torch.bfloat16, device=dev,
                           attn_implementation="sdpa")
    pm = PreferenceModel(policy, naive_model)
    assert pm._use_packing(policy) == (attn == "flash_attention_2")
    b = {k: v.to(dev) for k, v in _inputs(batch).items()}
    out = pm(**b)
    got = torch.cat([out.policy_chosen_logps, out.policy_rejected_logps]).detach()
    low = naive_logps(naive_model, b)
    dropped = naive_logps(naive_model, b, images=False)
    want = naive_logps(load_vlm(tiny_llava_dir, device=dev, attn_implementation="sdpa"), b)
    assert_noise_floor(got, want, low, wrong=dropped, what=f"llava bf16 {attn} on {device}")
    out.loss.backward()
    return got, want, low, dropped


def test_bf16_tolerance_rejects_dropped_images_on_cpu(tiny_llava_dir, batch):
    """The GPU test below on the CPU (bf16 matmuls): its tolerance accepts the step and rejects
    the images dropped."""
    bf16_vs_naive(tiny_llava_dir, batch, "cpu")


@pytest.mark.cuda
@pytest.mark.parametrize("attn", ["sdpa", "flash_attention_2"])
def test_cuda_bf16_matches_naive_forward(tiny_llava_dir, batch, attn):
    bf16_vs_naive(tiny_llava_dir, batch, "cuda", attn)


@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid_norm", "hinge"])
def test_length_normalised_losses_get_the_token_counts(tiny_llava_dir, batch, loss_type):
    from bpo_fast.ops.dpo import dpo_loss

    policy = load_vlm(tiny_llava_dir)
    pm = PreferenceModel(policy, reference_mode="cached", loss_type=loss_type, beta=0.2)
    ref = torch.tensor([-30.0, -20.0, -25.0]), torch.tensor([-28.0, -26.0, -21.0])
    out = pm(**_inputs(batch), ref_chosen_logps=ref[0], ref_rejected_logps=ref[1])
    lp = naive_logps(policy, batch)
    n = (batch["labels"][:, 1:] != -100).sum(-1)
    want = dpo_loss(lp[:3], lp[3:], ref[0], ref[1], beta=0.2, loss_type=loss_type,
                    chosen_lengths=n[:3], rejected_lengths=n[3:])
    torch.testing.assert_close(out.loss.detach(), want.loss, atol=1e-5, rtol=1e-5)
    assert torch.equal(out.chosen_tokens, n[:3]) and torch.equal(out.rejected_tokens, n[3:])
