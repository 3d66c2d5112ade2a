"""Exactness per VLM family: PreferenceModel's sequence log-probs equal the Hugging Face forward.

For every family of :data:`bpo_fast.models.tiny_vlm.FAMILIES` a tiny random model and its real
processor class are built offline, saved and loaded back with ``from_pretrained``. A batch of
three pairs with images of different sizes and aspect ratios (so anyres / splitting / tiling give
different patch and tile counts per image, the processors' defaults) goes through our collator
and :class:`PreferenceModel`; each row is compared, in fp32, with
``log_softmax(model(**processor(images=[image], text=[full text])).logits)`` gathered on the
answer tokens, the row's token ids included. Gradients must reach the decoder. Batches that mix
text-only, single-image and multi-image pairs are held to the same contract (the reference
passes each sample's images as one list, as ``apply_chat_template`` does).
"""

import numpy as np
import pytest
import torch

from bpo_fast.data.preference import PreferenceCollator
from bpo_fast.models.preference import PreferenceModel, load_vlm, prepare_policy
from bpo_fast.models.tiny_vlm import FAMILIES, build_tiny_vlm, model_type
from bpo_fast.models.vlm import UnsupportedModelError, get_adapter, load_processor

RTOL = 1e-5
# (width, height): landscape, portrait, square: different patch / tile counts per image in every
# family with a variable layout (asserted below)
SIZES = [(20, 12), (12, 28), (36, 36)]
VARIABLE = {"llava_next", "llava_onevision", "idefics3", "smolvlm", "internvl", "qwen2_vl",
            "qwen2_5_vl", "qwen3_vl"}


def _items():
    from PIL import Image

    rng = np.random.default_rng(0)
    items = []
    for i, (w, h) in enumerate(SIZES):
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        items.append({"index": i, "id": f"p{i}", "image": img, "line": i + 1,
                      "prompt": [{"from": "human", "value": "<image>\nwhat is on the table ?"}],
                      "chosen": "a red cup" + " and a book" * i, "rejected": "a blue ball ."})
    return items


def _build(family, tmp_path_factory, cache={}):
    if family not in cache:
        path = str(tmp_path_factory.mktemp(family))
        build_tiny_vlm(family, path, seed=1)
        cache[family] = path
    return cache[family]


def _setup(family, tmp_path_factory, **load):
    """(path, processor, model, collator) of a family's tiny model (``load``: load_vlm's dtype,
    device)."""
    if family == "smolvlm":
        pytest.importorskip("num2words")  # the SmolVLM processor needs it (in the test extras)
    path = _build(family, tmp_path_factory)
    processor = load_processor(path)
    return path, processor, load_vlm(path, **load), PreferenceCollator(processor)


def hf_row_logps(model, processor, collator, item, answer, device="cpu"):
    """The plain HF way: the processor on the full text, full logits, log_softmax, gathered on
    the answer tokens. Returns (summed log-prob, input ids)."""
    from bpo_fast.data.schema import turns_to_messages

    messages = turns_to_messages(item["prompt"])
    # the sample's images as one list, as HF's apply_chat_template passes them (LLaVA-OneVision:
    # batch_num_images); None for a text-only pair
    images = item.get("images", [item.get("image")])
    images = [images] if images and images[0] is not None else None
    if collator.template is None:  # PaliGemma: prompt + suffix through the processor
        enc = processor(images=images, text=[collator.prompt_text(messages)],
                        suffix=[answer], return_tensors="pt")
        n_prompt = int((enc["token_type_ids"][0] == 0).sum())
    else:
        full = processor.apply_chat_template(
            messages + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}],
            tokenize=False, chat_template=collator.template)
        enc = processor(images=images, text=[full], return_tensors="pt")
        prompt = processor(images=images, text=[collator.prompt_text(messages)],
                           return_tensors="pt")
        n_prompt = prompt["input_ids"].shape[1]
    with torch.no_grad():
        dtype = model.dtype
        enc = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device)
               for k, v in enc.items()}
        logits = model(**enc).logits[0, :-1].float().cpu()
    ids = enc["input_ids"][0].cpu()
    lp = torch.log_softmax(logits, -1).gather(-1, ids[1:, None])[:, 0]
    return lp[n_prompt - 1:].sum(), ids


def _extra(batch):
    return {k: v for k, v in batch.items()
            if k not in ("input_ids", "attention_mask", "labels", "pixel_values", "ids", "index")}


def _check_rows(family, model, processor, collator, items, batch):
    pm = PreferenceModel(model, reference_mode="cached")
    lp, _ = pm.sequence_logps(model, batch["input_ids"], batch["attention_mask"],
                              batch["labels"], batch.get("pixel_values"), **_extra(batch))
    b = len(items)
    for i, item in enumerate(items):
        for row, key in ((i, "chosen"), (b + i, "rejected")):
            want, ids = hf_row_logps(model, processor, collator, item, item[key])
            n = int(batch["attention_mask"][row].sum())
            assert batch["input_ids"][row, :n].tolist() == ids.tolist(), (family, row)
            torch.testing.assert_close(lp[row], want, rtol=RTOL, atol=1e-6,
                                       msg=lambda m: f"{family} row {row}: {m}")
    return lp


def _check_packed(model, batch, lp):
    """Packed rows (no padding; flash-attention varlen on GPUs) give the padded batch's numbers."""
    packed = PreferenceModel(model, reference_mode="cached", packing=True)
    lp2, _ = packed.sequence_logps(model, batch["input_ids"], batch["attention_mask"],
                                   batch["labels"], batch["pixel_values"], **_extra(batch))
    torch.testing.assert_close(lp2, lp, rtol=RTOL, atol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_logps_equal_hf_forward_and_grads_reach_decoder(family, tmp_path_factory):
    path, processor, model, collator = _setup(family, tmp_path_factory)
    assert get_adapter(model).name == model_type(family)
    assert collator.model_type == model_type(family)
    items = _items()
    shapes = {tuple(collator.encode_pair(it)[3]["pixel_values"].shape) for it in items}
    assert (len(shapes) > 1) == (family in VARIABLE), shapes
    batch = collator(items)
    b = len(items)
    lp = _check_rows(family, model, processor, collator, items, batch)

    # packed rows (no padding; flash-attention varlen on GPUs) give the same numbers
    if get_adapter(model).packable:
        _check_packed(model, batch, lp)
    else:
        with pytest.raises(ValueError, match="packing"):
            PreferenceModel(model, reference_mode="cached", packing=True)

    # the DPO step against a frozen reference copy: the reference reuses the policy's image
    # features (same frozen image path), equals it at the start; gradients reach the decoder
    policy = prepare_policy(model)
    policy.train()
    pm = PreferenceModel(policy, load_vlm(path), reference_mode="model")
    assert pm.share_image_features
    out = pm(batch["input_ids"], batch["attention_mask"], batch["labels"],
             batch["pixel_values"], **_extra(batch))
    torch.testing.assert_close(out.ref_chosen_logps, lp[:b].detach(), rtol=RTOL, atol=1e-5)
    torch.testing.assert_close(out.ref_rejected_logps, lp[b:].detach(), rtol=RTOL, atol=1e-5)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    decoder = model.get_decoder()
    grads = [p.grad for p in decoder.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads[:4])
    assert any(float(g.abs().sum()) > 0 for g in grads if g is not None)


def _image(w, h, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def _pair(i, images, question="what is on the table ?"):
    return {"index": i, "id": f"q{i}", "images": images,
            "image": images[0] if len(images) == 1 else None, "line": i + 1,
            "prompt": [{"from": "human", "value": "<image>\n" * len(images) + question}],
            "chosen": "a red cup" + " and a book" * i, "rejected": "a blue ball ."}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_text_only_and_multi_image_pairs(family, tmp_path_factory):
    """A batch mixing a 1-image pair, a text-only pair and a 2-image pair (images of different
    sizes; LLaVA-OneVision: anyres for the single image only, ``batch_num_images``), and an
    all-text batch: exact against the HF forward of each sample, and the DPO step's gradient
    reaches the decoder. Families that take one image per prompt (PaliGemma) raise, naming the
    pair and the limitation."""
    path, processor, model, collator = _setup(family, tmp_path_factory)
    mixed = [_pair(0, [_image(20, 12, 0)]), _pair(1, []),
             _pair(2, [_image(12, 28, 1), _image(36, 36, 2)])]
    text = [_pair(0, [], "why is the sky blue ?"), _pair(1, [])]
    adapter = get_adapter(model_type(family))
    if not (adapter.text_only_pairs and adapter.multi_image_pairs):  # PaliGemma
        if not adapter.text_only_pairs:
            with pytest.raises(ValueError, match=rf"pair 'q1' \(line 2\): a text-only pair .*{model_type(family)}"):
                collator(mixed)
        if not adapter.multi_image_pairs:
            with pytest.raises(ValueError, match=r"pair 'q2' \(line 3\): 2 images, .*one image"):
                collator([mixed[0], mixed[2]])
        return
    batch = collator(mixed)
    if family == "llava_onevision":  # the 2-image pair has no anyres patches
        assert batch["batch_num_images"].tolist() == [1, 2]
    lp = _check_rows(family, model, processor, collator, mixed, batch)
    if adapter.packable:  # packed rows (flash varlen) place the same features
        _check_packed(model, batch, lp)
    tbatch = collator(text)
    assert "pixel_values" not in tbatch
    _check_rows(family, model, processor, collator, text, tbatch)

    # forward + backward on both batches (cached reference values: the HF numbers)
    pm = PreferenceModel(prepare_policy(model), reference_mode="cached")
    pm.train()
    for bt, ref in ((batch, lp.detach()), (tbatch, None)):
        b = bt["input_ids"].shape[0] // 2
        ref = torch.zeros(2 * b) if ref is None else ref
        out = pm(bt["input_ids"], bt["attention_mask"], bt["labels"], bt.get("pixel_values"),
                 ref_chosen_logps=ref[:b], ref_rejected_logps=ref[b:], **_extra(bt))
        out.loss.backward()
    grads = [p.grad for p in model.get_decoder().parameters() if p.requires_grad]
    assert any(g is not None and float(g.abs().sum()) > 0 for g in grads)


def drop_images(monkeypatch, cls, pixels=False):
    """Make the base model class ``cls`` (e.g. ``type(model.model)``) drop its images the way
    transformers < 5.18 does: its forward swallows ``mm_encoder_outputs`` through ``**kwargs``
    (and, with ``pixels``, ignores ``pixel_values`` too, so the model never encodes them)."""
    orig = cls.forward

    def forward(self, *args, mm_encoder_outputs=None, **kwargs):
        if pixels:
            kwargs.pop("pixel_values", None)
        return orig(self, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", forward)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_dropped_images_are_an_error(family, tmp_path_factory, monkeypatch):
    """Every family, every path that runs the model on images: our preference forward
    (``mm_encoder_outputs``), HF's own forward on ``pixel_values`` and ``generate``. Real runs pass
    the check; a forward that drops the images (as under transformers 5.17) raises one line naming
    the family and the transformers version, where it used to return the no-image log-probs."""
    import re

    import transformers

    from bpo_fast.models.vlm import ImagesDroppedError, images_used

    path, processor, model, collator = _setup(family, tmp_path_factory)
    items = _items()[:2]
    batch = collator(items)
    pm = PreferenceModel(model, reference_mode="cached")

    def ours():
        return pm.sequence_logps(model, batch["input_ids"], batch["attention_mask"],
                                 batch["labels"], batch["pixel_values"], **_extra(batch))[0]

    # HF's forward and generate on one sample's processor output (pixel_values)
    from bpo_fast.data.schema import turns_to_messages

    messages = turns_to_messages(items[0]["prompt"])
    enc = processor(images=[[items[0]["image"]]], text=[collator.prompt_text(messages)],
                    return_tensors="pt")

    def hf_forward():
        with images_used(model), torch.no_grad():
            model(**enc)

    def hf_generate():
        with images_used(model), torch.no_grad():
            model.generate(**enc, max_new_tokens=2, do_sample=False)

    with_images = ours()
    hf_forward()
    hf_generate()
    name = re.escape(f"{model_type(family)} forward of transformers {transformers.__version__}")
    with monkeypatch.context() as m:
        drop_images(m, type(model.model))
        with pytest.raises(ImagesDroppedError, match=name + r".*dropped the images") as err:
            ours()
        assert "\n" not in str(err.value)
        with pytest.raises(ImagesDroppedError, match=name):
            hf_generate()
    with monkeypatch.context() as m:
        drop_images(m, type(model.model), pixels=True)
        with pytest.raises(ImagesDroppedError, match=name + ".*get_image_features never ran"):
            hf_forward()
    # the hooks are gone after each block: the unpatched model runs as before
    assert not hasattr(model.model, "_bpo_images_used")
    assert "get_image_features" not in vars(model.model)
    torch.testing.assert_close(ours(), with_images, rtol=0, atol=0)


def test_paligemma2_cap_and_attention(tmp_path_factory):
    """PaliGemma 2 (Gemma 2 text): the fused head applies the text config's
    final_logit_softcapping (the same numbers as HF's capped logits: the family test above), the
    cap matters on the tiny model, and loading picks eager attention for the Gemma 2 text model
    (it has no SDPA path) while the vision tower keeps SDPA."""
    from bpo_fast.models.vlm import logit_softcap

    path = _build("paligemma2", tmp_path_factory)
    model = load_vlm(path)
    assert logit_softcap(model.config) == model.config.text_config.final_logit_softcapping
    assert model.config.text_config._attn_implementation == "eager"
    assert model.config.vision_config._attn_implementation == "sdpa"
    collator = PreferenceCollator(load_processor(path))
    batch = collator(_items()[:1])
    pm = PreferenceModel(model, reference_mode="cached")
    lp, _ = pm.sequence_logps(model, batch["input_ids"], batch["attention_mask"],
                              batch["labels"], batch["pixel_values"], **_extra(batch))
    cap = model.config.text_config.final_logit_softcapping
    model.config.text_config.final_logit_softcapping = None
    try:
        uncapped, _ = pm.sequence_logps(model, batch["input_ids"], batch["attention_mask"],
                                        batch["labels"], batch["pixel_values"], **_extra(batch))
    finally:
        model.config.text_config.final_logit_softcapping = cap
    assert (lp - uncapped).abs().min() > 1e-2, (lp, uncapped)


def test_unsupported_families_fail_clearly(tmp_path):
    from transformers import MllamaConfig

    # a cap in a family whose forward does not apply it (Gemma 3's VLM forward ignores it)
    model, _ = build_tiny_vlm("gemma3")
    model.config.text_config.final_logit_softcapping = 30.0
    with pytest.raises(UnsupportedModelError, match="final_logit_softcapping"):
        PreferenceModel(model, reference_mode="cached")
    model.config.save_pretrained(tmp_path / "g3")
    with pytest.raises(UnsupportedModelError, match="final_logit_softcapping"):
        load_vlm(str(tmp_path / "g3"))  # before loading
    with pytest.raises(UnsupportedModelError, match="Mllama"):
        get_adapter("mllama")
    MllamaConfig().save_pretrained(tmp_path / "mllama")
    with pytest.raises(UnsupportedModelError, match="cross-attention"):
        load_vlm(str(tmp_path / "mllama"))


def test_one_chat_template_rule(tmp_path, tiny_llava_dir):
    from types import SimpleNamespace

    from bpo_fast.models.tiny import CHAT_TEMPLATE
    from bpo_fast.models.vlm import DEFAULT_CHAT_TEMPLATES, resolve_chat_template

    bare = SimpleNamespace(chat_template=None)
    # the processor's own template wins over the family default
    assert resolve_chat_template(SimpleNamespace(chat_template="{{ x }}"), "qwen2_vl") == "{{ x }}"
    # no template: the family's documented default
    assert resolve_chat_template(bare, "qwen2_vl") == DEFAULT_CHAT_TEMPLATES["qwen2_vl"]()
    assert resolve_chat_template(bare, "llava") == CHAT_TEMPLATE
    assert resolve_chat_template(bare, "paligemma") is None  # the processor builds the prompt
    # --chat-template: a template string or a file, over everything else
    f = tmp_path / "t.jinja"
    f.write_text("{{ messages }}")
    assert resolve_chat_template(SimpleNamespace(chat_template="{{ x }}"), "llava", str(f)) == \
        "{{ messages }}"
    with pytest.raises(ValueError, match="--chat-template"):
        resolve_chat_template(bare, "llava", "no-such-file")
    with pytest.raises(ValueError, match="--chat-template"):
        resolve_chat_template(bare, "some_new_vlm")
    # the collator applies the rule: a processor saved without a template gets the family's
    processor = load_processor(tiny_llava_dir)
    processor.chat_template = None
    assert PreferenceCollator(processor).template == CHAT_TEMPLATE
    assert PreferenceCollator(processor, chat_template="{{ 'Q' }}").template == "{{ 'Q' }}"


@pytest.mark.parametrize("command", ["ref-logps", "train", "build-pairs", "generate"])
def test_cli_names_the_unsupported_model(command, tmp_path, capsys):
    """Mllama: every command that loads a model stops with one line naming the limitation, from
    the config alone (the folder holds no weights: nothing is loaded first)."""
    import json

    from transformers import MllamaConfig

    from bpo_fast.cli import main

    from test_vlm_train import write_pairs

    model = str(tmp_path / "mllama")
    MllamaConfig().save_pretrained(model)
    data = write_pairs(str(tmp_path), n=1)
    common = ["--model", model, "--image-root", str(tmp_path), "--device", "cpu"]
    if command == "ref-logps":
        args = ["--data", data, "--out", str(tmp_path / "r.safetensors"), "--no-progress"]
    elif command == "train":
        args = ["--data", data, "--output", str(tmp_path / "out"), "--no-progress",
                "--batch-size", "1"]   # one pair: else the data is refused first
    else:
        llava = tmp_path / "llava.json"
        llava.write_text(json.dumps([{"id": "a", "image": "img/0.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat is on the table ?"},
            {"from": "gpt", "value": "a red cup"}]}]))
        args = ["--data", str(llava), "--out", str(tmp_path / "p.jsonl")]
    rc = main([command] + common + args)
    err = capsys.readouterr().err
    assert rc == 2 and "cross-attention" in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["ref-logps", "train", "build-pairs", "generate"])
def test_cli_stops_when_images_are_dropped(command, tiny_llava_dir, tmp_path, capsys,
                                            monkeypatch):
    """A transformers whose LLaVA forward drops the images: every command that runs the model on
    images stops at its first batch with one line naming the family and the version, exit 2
    (it used to train on, and cache, the no-image log-probs)."""
    import transformers
    from transformers.models.llava.modeling_llava import LlavaModel

    from bpo_fast.cli import main

    from test_pairs import make_data
    from test_vlm_train import write_pairs

    drop_images(monkeypatch, LlavaModel)
    common = ["--model", tiny_llava_dir, "--device", "cpu"]
    if command == "build-pairs":
        data, root = make_data(tmp_path, n=2, turns=1)
        args = ["--data", str(data), "--image-root", str(root), "--out",
                str(tmp_path / "p.jsonl"), "--strategies", "image_weakened",
                "--max-new-tokens", "2", "--num-workers", "0", "--no-progress"]
    elif command == "generate":
        data, root = make_data(tmp_path, n=2, turns=1)
        args = ["--data", str(data), "--image-root", str(root), "--out",
                str(tmp_path / "a.jsonl"), "--max-new-tokens", "2", "--no-progress"]
    else:
        data = write_pairs(str(tmp_path), n=2)
        args = ["--data", data, "--image-root", str(tmp_path), "--no-progress"]
        args += (["--out", str(tmp_path / "r.safetensors")] if command == "ref-logps" else
                 ["--output", str(tmp_path / "out"), "--max-steps", "1", "--batch-size", "2"])
    rc = main([command] + common + args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"llava forward of transformers {transformers.__version__} dropped the images" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r.safetensors").exists()


def half_precision_vs_hf(family, device, tmp_path_factory, monkeypatch, dtype=torch.bfloat16):
    """Our per-row log-probs in ``dtype`` (the default attention: flash-attention with packing
    where installed and the family packs) against HF's fp32 forward, within the measured noise
    floor of HF's own ``dtype`` forward (:mod:`noise_floor`); negative control: HF's ``dtype``
    forward with the images dropped (what every command returned under transformers 5.17) must
    fail the same tolerance. Returns ``(ours, hf_fp32, hf_low, dropped)``, rows [chosen;
    rejected]."""
    from noise_floor import assert_noise_floor

    path, processor, model, collator = _setup(family, tmp_path_factory, dtype=dtype,
                                              device=device)
    items = _items()
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v
             for k, v in collator(items).items()}
    pm = PreferenceModel(model, reference_mode="cached")
    with torch.no_grad():
        ours, _ = pm.sequence_logps(model, batch["input_ids"], batch["attention_mask"],
                                    batch["labels"], batch["pixel_values"], **_extra(batch))
    ours = ours.float().cpu()

    def hf(m):
        return torch.stack([hf_row_logps(m, processor, collator, item, item[key], device=device)[0]
                            for key in ("chosen", "rejected") for item in items])

    low = hf(model)
    with monkeypatch.context() as m:
        drop_images(m, type(model.model), pixels=True)
        dropped = hf(model)
    del model
    ref32 = hf(load_vlm(path, device=device))
    assert_noise_floor(ours, ref32, low, wrong=dropped, what=f"{family} {dtype} on {device}")
    return ours, ref32, low, dropped


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_noise_floor_rule_on_cpu_bf16(family, tmp_path_factory, monkeypatch):
    """The GPU test below, run on the CPU in bf16 (which CPU matmuls support): the tolerance
    rule accepts the real computation and rejects a dropped image, for every family; and the
    rule's own check fails when a negative control cannot be told from the real output."""
    from noise_floor import assert_noise_floor

    ours, ref32, low, _ = half_precision_vs_hf(family, "cpu", tmp_path_factory, monkeypatch)
    with pytest.raises(AssertionError, match="negative control passes"):
        assert_noise_floor(ours, ref32, low, wrong=low)


@pytest.mark.cuda
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_cuda_bf16_matches_hf_forward(family, tmp_path_factory, monkeypatch):
    """On a GPU: bf16 against HF fp32 within the bf16 noise floor; dropped images rejected."""
    half_precision_vs_hf(family, "cuda", tmp_path_factory, monkeypatch)
