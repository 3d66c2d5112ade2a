"""Tiny random-weight builds of every supported VLM family, offline: for tests and benchmarks.

``build_tiny_vlm(family, save_dir)`` makes the architecture's real ``*ForConditionalGeneration``
(2 decoder layers, hidden 64, a 1-2 layer vision tower) and its real processor class, with a
word-level tokenizer built locally (:func:`bpo_fast.models.tiny.build_word_tokenizer`) holding the
family's special tokens, and saves both so that ``from_pretrained`` loads them back like a
released checkpoint. Image processors are the PIL ("slow") backends (``*ImageProcessorPil``):
the torchvision ("fast") ones need a torchvision build matching the installed torch, which CPU
CI does not have; the processors are built from their parts, so no video processor (which needs
torchvision) is involved. Settings are each processor's defaults that matter for the layout
(LLaVA-NeXT/OneVision anyres on, Idefics3/SmolVLM image splitting on, InternVL crop to tiles
on), at tiny sizes so that mixed image sizes give different patch/tile counts.

The chat template saved with each processor is the family's default
(:data:`bpo_fast.models.vlm.DEFAULT_CHAT_TEMPLATES`), except PaliGemma, which has none.
``paligemma2`` is PaliGemma with a Gemma 2 text model (``model_type`` "paligemma"; logit
soft-capping, attention soft-capping, no SDPA).
"""

import os

import torch

from bpo_fast.models.tiny import DEFAULT_WORDS, build_word_tokenizer

__all__ = ["FAMILIES", "MODEL_TYPES", "UNSUPPORTED_FAMILIES", "build_tiny_vlm", "model_type"]

WORDS = list(DEFAULT_WORDS) + ["model", "system"]
H, I, LAYERS, HEADS, KV = 64, 128, 2, 4, 2


def _llama(tok, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tok), hidden_size=H, intermediate_size=I,
                       num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                       num_key_value_heads=KV, max_position_embeddings=2048,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, **kw)


def _clip(image_size, patch):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2, image_size=image_size, patch_size=patch,
                            projection_dim=32)


def _siglip(image_size, patch):
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, image_size=image_size, patch_size=patch)


def build_processor(cls, **parts):
    from bpo_fast.models.vlm import build_processor as build

    return build(cls, **parts)


def _template(family):
    from bpo_fast.models.vlm import DEFAULT_CHAT_TEMPLATES

    return DEFAULT_CHAT_TEMPLATES[family]()


def _llava(family, tie=False):
    from bpo_fast.models.tiny import TinyLlavaConfig, build_tiny_llava

    return build_tiny_llava(config=TinyLlavaConfig(words=WORDS, tie_word_embeddings=tie))


def _llava_next(family):
    from transformers import (LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessorPil, LlavaNextProcessor)

    tok = build_word_tokenizer(WORDS, named_tokens={"image_token": "<image>"})
    pins = [[16, 32], [32, 16], [32, 32]]
    cfg = LlavaNextConfig(vision_config=_clip(16, 8), text_config=_llama(tok),
                          image_token_id=tok.convert_tokens_to_ids("<image>"),
                          image_grid_pinpoints=pins, vision_feature_select_strategy="default",
                          vision_feature_layer=-1)
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                                    image_grid_pinpoints=pins)
    proc = build_processor(LlavaNextProcessor, image_processor=ip, tokenizer=tok, patch_size=8,
                              vision_feature_select_strategy="default", image_token="<image>",
                              num_additional_image_tokens=1, chat_template=_template(family))
    return LlavaNextForConditionalGeneration(cfg), proc


def _llava_onevision(family):
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionImageProcessorPil, LlavaOnevisionProcessor, Qwen2Config)

    tok = build_word_tokenizer(WORDS, special_tokens=["<|im_start|>", "<|im_end|>"],
                               named_tokens={"image_token": "<image>", "video_token": "<video>"})
    pins = [[16, 32], [32, 16], [32, 32]]
    text = Qwen2Config(vocab_size=len(tok), hidden_size=H, intermediate_size=I,
                       num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id)
    cfg = LlavaOnevisionConfig(vision_config=_siglip(16, 8), text_config=text,
                               image_token_id=tok.image_token_id, video_token_id=tok.video_token_id,
                               image_grid_pinpoints=pins, vision_feature_select_strategy="full",
                               vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9")
    ip = LlavaOnevisionImageProcessorPil(size={"height": 16, "width": 16}, image_grid_pinpoints=pins)
    proc = build_processor(LlavaOnevisionProcessor, image_processor=ip, tokenizer=tok, num_image_tokens=4,
                                   vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
                                   chat_template=_template(family))
    return LlavaOnevisionForConditionalGeneration(cfg), proc


def _qwen(family):
    import transformers as tr

    qwen_tokens = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                   "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}
    tok = build_word_tokenizer(WORDS, special_tokens=["<|im_start|>", "<|im_end|>"],
                               named_tokens=qwen_tokens)
    ids = {k + "_id": tok.convert_tokens_to_ids(v) for k, v in qwen_tokens.items()}
    text = dict(vocab_size=len(tok), hidden_size=H, intermediate_size=I, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, num_key_value_heads=KV, max_position_embeddings=2048,
                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id)
    if family == "qwen3_vl":
        text.update(head_dim=H // HEADS,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                     "mrope_section": [2, 3, 3], "mrope_interleaved": True})
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=H,
                      num_position_embeddings=64, deepstack_visual_indexes=[0, 1])
        cfg_cls, model_cls, proc_cls = tr.Qwen3VLConfig, tr.Qwen3VLForConditionalGeneration, tr.Qwen3VLProcessor
    else:
        text.update(rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                     "mrope_section": [2, 3, 3]})
        if family == "qwen2_vl":
            vision = dict(depth=2, embed_dim=32, hidden_size=H, num_heads=2, mlp_ratio=2,
                          patch_size=4, spatial_merge_size=2, temporal_patch_size=2)
            cfg_cls, model_cls, proc_cls = tr.Qwen2VLConfig, tr.Qwen2VLForConditionalGeneration, tr.Qwen2VLProcessor
        else:
            vision = dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=H,
                          num_heads=2, patch_size=4, spatial_merge_size=2, temporal_patch_size=2,
                          window_size=16, fullatt_block_indexes=[1])
            cfg_cls, model_cls, proc_cls = tr.Qwen2_5_VLConfig, tr.Qwen2_5_VLForConditionalGeneration, tr.Qwen2_5_VLProcessor
    cfg = cfg_cls(text_config=text, vision_config=vision,
                  image_token_id=ids["image_token_id"], video_token_id=ids["video_token_id"],
                  vision_start_token_id=ids["vision_start_token_id"],
                  vision_end_token_id=ids["vision_end_token_id"])
    ip = tr.Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2,
                                     size={"shortest_edge": 8 * 8, "longest_edge": 32 * 32})
    proc = build_processor(proc_cls, image_processor=ip, tokenizer=tok, chat_template=_template(family))
    return model_cls(cfg), proc


def _idefics3(family):
    import transformers as tr

    named = {"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
             "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"}
    grid = [f"<row_{r}_col_{c}>" for r in range(1, 5) for c in range(1, 5)]
    tok = build_word_tokenizer(WORDS, special_tokens=grid, named_tokens=named)
    text = _llama(tok)
    # Idefics3 and SmolVLM: the same layout under two names
    name = "Idefics3" if family == "idefics3" else "SmolVLM"
    vis = getattr(tr, f"{name}VisionConfig")(hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=2,
                                             image_size=16, patch_size=4)
    cfg = getattr(tr, f"{name}Config")(vision_config=vis, text_config=text, scale_factor=2,
                                       image_token_id=tok.image_token_id)
    ip = getattr(tr, f"{name}ImageProcessorPil")(size={"longest_edge": 32},
                                                 max_image_size={"longest_edge": 16})
    proc = build_processor(getattr(tr, f"{name}Processor"), image_processor=ip, tokenizer=tok,
                           image_seq_len=4, chat_template=_template(family))
    return getattr(tr, f"{name}ForConditionalGeneration")(cfg), proc


def _gemma3(family):
    import transformers as tr

    named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
             "image_token": "<image_soft_token>"}
    tok = build_word_tokenizer(WORDS, special_tokens=["<start_of_turn>", "<end_of_turn>"],
                               named_tokens=named, bos="<bos>", eos="<eos>")
    text = tr.Gemma3TextConfig(vocab_size=len(tok), hidden_size=H, intermediate_size=I,
                               num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                               num_key_value_heads=KV, head_dim=H // HEADS, sliding_window=512,
                               initializer_range=0.2,  # sharp attention: masks matter
                               pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id)
    cfg = tr.Gemma3Config(text_config=text, vision_config=_siglip(16, 4), mm_tokens_per_image=4,
                          image_token_id=tok.image_token_id, boi_token_id=tok.boi_token_id,
                          eoi_token_id=tok.eoi_token_id)
    ip = tr.Gemma3ImageProcessorPil(size={"height": 16, "width": 16})
    proc = build_processor(tr.Gemma3Processor, image_processor=ip, tokenizer=tok, image_seq_length=4,
                              chat_template=_template(family))
    return tr.Gemma3ForConditionalGeneration(cfg), proc


def _paligemma(family, gemma2=False):
    import transformers as tr

    tok = build_word_tokenizer(WORDS, named_tokens={"image_token": "<image>"}, bos="<bos>",
                               eos="<eos>")
    common = dict(vocab_size=len(tok), hidden_size=H, intermediate_size=I,
                  num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV,
                  head_dim=H // HEADS, pad_token_id=tok.pad_token_id,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    # PaliGemma 2's Gemma 2 caps its logits (final_logit_softcapping, 30 in the released
    # models, whose logits reach tens); the tiny model's logits stay below ~0.5, so its cap is
    # scaled down with them (0.3) to bend them as much as the real cap bends real logits
    text = (tr.Gemma2Config(**common, final_logit_softcapping=0.3) if gemma2
            else tr.GemmaConfig(**common))
    vis = _siglip(16, 4)
    vis.projection_dim = H
    cfg = tr.PaliGemmaConfig(vision_config=vis, text_config=text, image_token_id=tok.image_token_id,
                             projection_dim=H, hidden_size=H)
    ip = tr.SiglipImageProcessorPil(size={"height": 16, "width": 16})
    ip.image_seq_length = 16
    proc = build_processor(tr.PaliGemmaProcessor, image_processor=ip, tokenizer=tok)
    return tr.PaliGemmaForConditionalGeneration(cfg), proc


def _internvl(family):
    import transformers as tr

    named = {"start_image_token": "<img>", "end_image_token": "</img>",
             "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
    tok = build_word_tokenizer(WORDS, special_tokens=["<|im_start|>", "<|im_end|>"],
                               named_tokens=named)
    text = tr.Qwen2Config(vocab_size=len(tok), hidden_size=H, intermediate_size=I,
                          num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                          num_key_value_heads=KV, pad_token_id=tok.pad_token_id,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    vis = tr.InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, image_size=[16, 16], patch_size=[4, 4])
    cfg = tr.InternVLConfig(vision_config=vis, text_config=text, downsample_ratio=0.5,
                            image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
                            vision_feature_layer=-1, vision_feature_select_strategy="default")
    ip = tr.GotOcr2ImageProcessorPil(size={"height": 16, "width": 16}, crop_to_patches=True,
                                     min_patches=1, max_patches=4)
    proc = build_processor(tr.InternVLProcessor, image_processor=ip, tokenizer=tok, image_seq_length=4,
                                chat_template=_template(family))
    return tr.InternVLForConditionalGeneration(cfg), proc


FAMILIES = {
    "llava": _llava, "llava_next": _llava_next, "llava_onevision": _llava_onevision,
    "qwen2_vl": _qwen, "qwen2_5_vl": _qwen, "qwen3_vl": _qwen,
    "idefics3": _idefics3, "smolvlm": _idefics3, "gemma3": _gemma3, "paligemma": _paligemma,
    "paligemma2": lambda f: _paligemma(f, gemma2=True), "internvl": _internvl,
}
# the config.model_type of the families whose name differs from it
MODEL_TYPES = {"paligemma2": "paligemma"}
# built so that tests can check the clear error
UNSUPPORTED_FAMILIES = {}


def model_type(family):
    """``config.model_type`` of a family of :data:`FAMILIES`."""
    return MODEL_TYPES.get(family, family)


def build_tiny_vlm(family, save_dir=None, *, seed=0, tie_word_embeddings=False):
    """``(model, processor)`` of a tiny ``family`` model (a key of :data:`FAMILIES` or
    :data:`UNSUPPORTED_FAMILIES`), random weights from ``seed``; saved to ``save_dir`` when
    given. ``tie_word_embeddings`` (LLaVA only): the LM head is the input embedding."""
    builders = {**FAMILIES, **UNSUPPORTED_FAMILIES}
    if family not in builders:
        raise ValueError(f"family: expected one of {sorted(builders)}, got {family!r}")
    if tie_word_embeddings and family != "llava":
        raise ValueError("tie_word_embeddings: only the llava build ties its embeddings")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, proc = (_llava(family, tie=True) if tie_word_embeddings
                       else builders[family](family))
        # some projectors start at zero (Gemma 3's mm_input_projection_weight): the images would
        # not reach the text at all and the tests could not see how they are placed
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() >= 2 and not p.any():
                    p.normal_(0.0, 0.05)
    model = model.float().eval()
    tok = proc.tokenizer
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    if save_dir is not None:
        os.makedirs(save_dir, exist_ok=True)
        model.save_pretrained(save_dir)
        proc.save_pretrained(save_dir)
    return model, proc
