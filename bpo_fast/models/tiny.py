"""Tiny LLaVA-architecture models built offline: for tests, benchmarks and ``bpo-fast demo``.

Nothing is downloaded. :func:`build_tiny_llava` makes a ``LlavaForConditionalGeneration`` (CLIP
vision tower + projector + Llama) from a config with random weights, a word-level tokenizer
built from a vocabulary list, and a ``LlavaProcessor`` (CLIP image processor + the tokenizer + a
LLaVA-1.5-style chat template). Saved with ``save_pretrained`` they load back with
``LlavaForConditionalGeneration.from_pretrained`` / ``AutoProcessor.from_pretrained`` like any
model, so every code path a user runs on LLaVA-1.5 runs on them too.

The tokenizer is word level: it lower-cases, splits on whitespace and punctuation, and maps
words outside the vocabulary to ``<unk>``. Special tokens: ``<pad>`` (0), ``<unk>``, ``<s>``,
``</s>``, ``<image>``.
"""

import os
from dataclasses import dataclass, field

import torch

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
IMAGE_TOKEN = "<image>"

# LLaVA-1.5's conversation format ("USER: <image>\n... ASSISTANT: ...</s>"), written for HF's
# message lists (content: a string, or a list of {"type": "image"} / {"type": "text", "text": ...}).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] if message['content'] is string "
    "else message['content'][0]['text'] }} "
    "{% elif message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %} "
    "{% else %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% endif %}</s>"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# Enough words for tests and the error-injection lexicon; the demo passes its world's vocabulary.
DEFAULT_WORDS = (
    "user assistant : . , ? ! ' - ( ) a an the is are there in on of and with to at it this that "
    "what which how many where describe image picture photo shows show see can you i color colour "
    "shape object objects left right top bottom middle center above below next near behind front "
    "one two three four five six seven eight nine ten zero no yes not some several "
    "red green blue yellow orange purple pink white black gray grey brown "
    "circle circles square squares triangle triangles star stars cross crosses ring rings "
    "ball balls box boxes cat cats dog dogs car cars tree trees person people man woman table "
    "chair cup book bird horse sky grass road water building small large big tall short "
    "please answer question detail sitting standing holding wearing background foreground"
).split()


def default_vocabulary():
    """The default word list (special tokens excluded)."""
    return list(DEFAULT_WORDS)


def build_word_tokenizer(words, *, model_max_length=2048, special_tokens=(), named_tokens=None,
                         bos="<s>", eos="</s>"):
    """A ``PreTrainedTokenizerFast`` over ``words`` (+ the special tokens), built offline.

    ``special_tokens``: more special tokens (a family's image / turn markers); ``named_tokens``:
    ``{attribute: token}`` the processors read from the tokenizer (``image_token``,
    ``boi_token``, ...), added as special tokens too."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if isinstance(words, str) or not all(isinstance(w, str) and w for w in words):
        raise TypeError("words: expected a list of non-empty strings")
    named_tokens = dict(named_tokens or {})
    extra = [t for t in list(special_tokens) + list(named_tokens.values())
             if t not in SPECIAL_TOKENS]
    extra = list(dict.fromkeys(extra))
    vocab = {}
    for w in list(SPECIAL_TOKENS) + extra + [w.lower() for w in words]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(Regex(r"[^\w\s<>/]"), behavior="isolated"),
    ])
    # No decoder: tokenizers joins word-level tokens with single spaces, which is what we want.
    if named_tokens:
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token=bos,
            eos_token=eos, model_max_length=model_max_length, padding_side="right",
            clean_up_tokenization_spaces=True,
            extra_special_tokens={**{t: t for t in [IMAGE_TOKEN] + extra
                                     if t not in named_tokens.values()}, **named_tokens})
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>", pad_token="<pad>", bos_token=bos, eos_token=eos,
        additional_special_tokens=[IMAGE_TOKEN] + extra,
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=True,
    )
    return fast


@dataclass
class TinyLlavaConfig:
    """Sizes of a tiny LLaVA. Defaults: a model that trains in seconds on a CPU."""

    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 1024
    tie_word_embeddings: bool = False
    # The image processor's normalisation; None: CLIP's. A world with a flat background trains
    # much faster when the background maps to 0 (mean = background / 255): the conv patch
    # embedding then sees only the shapes, not a large constant shared by every patch.
    image_mean: tuple = None
    image_std: tuple = None
    words: list = field(default_factory=default_vocabulary)

    @property
    def num_image_tokens(self):
        return (self.image_size // self.patch_size) ** 2


def build_image_processor(image_size, image_mean=None, image_std=None):
    """CLIP-style processor (resize shortest edge, centre crop, normalise; CLIP's mean/std unless
    given) at ``image_size``."""
    try:  # transformers >= 5 without torchvision: the PIL backend, same arithmetic
        from transformers import CLIPImageProcessorPil as _Proc
    except ImportError:  # older transformers
        from transformers import CLIPImageProcessor as _Proc
    norm = {}
    if image_mean is not None:
        norm["image_mean"] = [float(m) for m in image_mean]
    if image_std is not None:
        norm["image_std"] = [float(m) for m in image_std]
    return _Proc(
        **norm,
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_resize=True, do_center_crop=True, do_rescale=True, do_normalize=True,
        do_convert_rgb=True,
    )


def build_tiny_llava(save_dir=None, config=None, *, seed=0, dtype=torch.float32):
    """Build a tiny ``LlavaForConditionalGeneration`` and its ``LlavaProcessor``.

    Returns ``(model, processor)``; with ``save_dir`` both are also saved there (safetensors),
    loadable with ``from_pretrained``. Weights are random, drawn from ``torch.Generator`` seeded
    with ``seed`` so the same call gives the same model.
    """
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    cfg = config or TinyLlavaConfig()
    if cfg.image_size % cfg.patch_size:
        raise ValueError(f"config.image_size ({cfg.image_size}) must be a multiple of "
                         f"config.patch_size ({cfg.patch_size})")
    tokenizer = build_word_tokenizer(cfg.words, model_max_length=cfg.max_position_embeddings)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden, intermediate_size=2 * cfg.vision_hidden,
        num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size, patch_size=cfg.patch_size, projection_dim=cfg.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=cfg.tie_word_embeddings,
    )
    llava_cfg = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=image_token_id,
        vision_feature_select_strategy="default", vision_feature_layer=-1,
        projector_hidden_act="gelu", tie_word_embeddings=cfg.tie_word_embeddings,
    )
    llava_cfg.pad_token_id = tokenizer.pad_token_id

    devnull = torch.random.fork_rng(devices=[])
    with devnull:
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(llava_cfg)
    model = model.to(dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id

    processor = LlavaProcessor(
        image_processor=build_image_processor(cfg.image_size, cfg.image_mean, cfg.image_std), tokenizer=tokenizer,
        patch_size=cfg.patch_size, vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE, image_token=IMAGE_TOKEN, num_additional_image_tokens=1,
    )
    if save_dir is not None:
        os.makedirs(save_dir, exist_ok=True)
        model.save_pretrained(save_dir)
        processor.save_pretrained(save_dir)
    return model, processor
