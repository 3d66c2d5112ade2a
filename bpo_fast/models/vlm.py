"""The model layer that knows the vision-language families: one small adapter per ``model_type``.

Every family is run through **its own Hugging Face base model** (``model.model``: vision tower,
projector, placement of the image features, masks, position ids, decoder; no LM head), so our
log-probs equal ``log_softmax(model(**processor_inputs).logits)`` by construction, and the LM head
goes into the fused log-prob op instead of building ``[N, T, V]`` logits. The image path runs
**once per pair**: :meth:`VLMAdapter.encode` calls the model's own ``get_image_features`` on the
``B`` images of the batch, :meth:`VLMAdapter.for_rows` repeats the result for the ``[chosen;
rejected]`` rows, and the base model takes it through its ``mm_encoder_outputs`` argument (the
transformers 5.x hook for precomputed encoder outputs). So the family's own
``get_placeholder_mask`` / ``masked_scatter``, ``get_rope_index`` (Qwen M-RoPE), deepstack
injection (Qwen3-VL), ``token_type_ids`` masks (Gemma 3 bidirectional image attention, PaliGemma
prefix-LM) and tiling (LLaVA-NeXT anyres, Idefics3/SmolVLM splitting, InternVL tiles) are what run.

What an adapter adds on top (all small):

- ``collate_images``: one pair's processor image outputs -> the batch's, carried as the processor
  returns them: flattened patches + grids (Qwen, InternVL) are concatenated along their first
  dim; per-image patch stacks of different counts (LLaVA-NeXT/OneVision anyres, Idefics3/SmolVLM
  tiles) are zero-padded to the largest, exactly as the processors pad a batch (the models drop
  the padding: ``image_sizes`` / all-zero tiles + ``pixel_attention_mask``); anything else that
  differs in shape is an error, never a blind ``torch.cat``;
- ``row_kwargs``: what the base forward needs per row besides ``input_ids``/``attention_mask``
  (Qwen: ``image_grid_thw`` repeated for both row sets and ``mm_token_type_ids``; Gemma 3:
  ``token_type_ids`` marking image tokens; PaliGemma: ``token_type_ids`` 0 on the prefix, 1 on
  the answer);
- the chat-template rule (:func:`resolve_chat_template`) and the LM head
  (:func:`lm_head_parts`): weight, bias and the logit soft-cap the family's forward applies
  (PaliGemma 2's Gemma 2 ``final_logit_softcapping``, honoured inside the fused head); other
  logit transforms are rejected.

Pairs may hold no image or several, mixed in one batch: the collator passes each pair's images to
the processor as one sample's list (as ``apply_chat_template`` does: LLaVA-OneVision then sets
``batch_num_images`` and skips anyres for multi-image samples), text-only pairs contribute no
image inputs, and Qwen's text-only rows (or a text-only batch, no ``image_grid_thw``) get the
positions HF gives them. Families that take one image per prompt say so
(``text_only_pairs``/``multi_image_pairs``; :meth:`VLMAdapter.check_pair_images`): PaliGemma.

Cost: the generic base forward is what HF's own forward runs minus the LM head, so no family pays
more than HF for exactness. Only the LLaVA-style families (1-D positions, plain causal mask) can
pack rows without padding (flash-attention varlen); the others always run the padded batch.

Unsupported, with a clear error: Mllama (cross-attention images), logit scales, a
``final_logit_softcapping`` in a family whose forward is not known to apply it, and any
``model_type`` not in :data:`ADAPTERS`.
"""

import contextlib
import functools

import torch

from bpo_fast.models.preference import unwrap as _unwrap  # the one peft-unwrapping rule
from bpo_fast.versions import PALIGEMMA2_TRANSFORMERS, require

__all__ = ["VLMAdapter", "ADAPTERS", "get_adapter", "supported_model_types", "lm_head_parts",
           "logit_softcap", "load_processor", "image_token_id", "images_used",
           "ImagesDroppedError",
           "resolve_chat_template", "processor_prompt", "UnsupportedModelError", "DEFAULT_CHAT_TEMPLATES"]

IGNORE_INDEX = -100
# processor outputs that describe the text rows, not the images: the collator builds its own
TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids", "labels")


class UnsupportedModelError(ValueError):
    """A model (type or configuration) that :class:`bpo_fast.PreferenceModel` cannot run exactly."""


def _map_features(fn, x):
    """Apply ``fn`` to the per-image level of an encoder output field: a tensor (images along
    dim 0) or a list of per-image tensors; lists of such lists (Qwen3-VL deepstack: one per layer)
    are mapped element-wise."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, (list, tuple)) and x and isinstance(x[0], (list, tuple)):
        return [_map_features(fn, e) for e in x]
    if isinstance(x, (list, tuple)):
        return fn(list(x))
    raise TypeError(f"get_image_features: unexpected output field of type {type(x).__name__}")


def _twice(x):
    return torch.cat([x, x]) if isinstance(x, torch.Tensor) else x + x


def _join(parts):
    """Concatenate per-chunk encoder output fields (images in order)."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, (list, tuple)) and first and isinstance(first[0], (list, tuple)):
        return [_join([p[i] for p in parts]) for i in range(len(first))]
    return [t for p in parts for t in p]


# --------------------------------------------------------------------------------------------
# chat templates: the processor's, else a documented per-family default, else an error
# --------------------------------------------------------------------------------------------

def _template(user, assistant, end, image, system=None, tail=""):
    """A Jinja chat template over HF message lists: ``user``/``assistant`` open a turn, ``end``
    closes it, ``image`` is the processor's placeholder for a ``{"type": "image"}`` item."""
    sys_block = ("{% if message['role'] == 'system' %}" + (system or user) + "{{ message['content']"
                 " if message['content'] is string else message['content'][0]['text'] }}" + end
                 + "{% elif message['role'] == 'user' %}")
    return (
        "{% for message in messages %}" + sys_block + user +
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for item in message['content'] %}{% if item['type'] == 'image' %}" + image +
        "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
        + end + "{% else %}" + assistant +
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}"
        "{% endif %}{% endfor %}{% endif %}" + end + "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}" + assistant.rstrip() + tail + "{% endif %}"
    )


def _llava15():
    from bpo_fast.models.tiny import CHAT_TEMPLATE

    return CHAT_TEMPLATE


_CHATML = dict(user="<|im_start|>user\n", assistant="<|im_start|>assistant\n", end="<|im_end|>\n",
               system="<|im_start|>system\n")
# The formats the released checkpoints of each family use (their processors normally ship them;
# these apply only when a saved processor has none). PaliGemma has no chat format: its processor
# builds "<image>...<bos>prompt\n" + answer itself.
DEFAULT_CHAT_TEMPLATES = {
    "llava": _llava15,
    "llava_next": _llava15,
    "qwen2_vl": lambda: _template(image="<|vision_start|><|image_pad|><|vision_end|>",
                                  tail="\n", **_CHATML),
    "qwen2_5_vl": lambda: _template(image="<|vision_start|><|image_pad|><|vision_end|>",
                                    tail="\n", **_CHATML),
    "qwen3_vl": lambda: _template(image="<|vision_start|><|image_pad|><|vision_end|>",
                                  tail="\n", **_CHATML),
    "llava_onevision": lambda: _template(image="<image>\n", tail="\n", **_CHATML),
    "internvl": lambda: _template(image="<IMG_CONTEXT>\n", tail="\n", **_CHATML),
    "idefics3": lambda: _template(user="User:", assistant="Assistant: ", end="<end_of_utterance>\n",
                                  image="<image>"),
    "smolvlm": lambda: _template(user="User:", assistant="Assistant: ", end="<end_of_utterance>\n",
                                 image="<image>"),
    "gemma3": lambda: _template(user="<start_of_turn>user\n", assistant="<start_of_turn>model\n",
                                end="<end_of_turn>\n", image="<start_of_image>", tail="\n"),
}


def resolve_chat_template(processor, model_type=None, override=None):
    """The one chat-template rule every command uses: ``override`` (``--chat-template``: a Jinja
    string or a file holding one), else the processor's own template, else the documented default
    of the family (:data:`DEFAULT_CHAT_TEMPLATES`), else a ``ValueError`` naming
    ``--chat-template``. Returns the template string, or None for families that build their
    prompt in the processor (PaliGemma)."""
    import os

    if override:
        if os.path.isfile(override):
            with open(override, encoding="utf-8") as f:
                return f.read()
        if "{%" not in override and "{{" not in override:
            raise ValueError(f"--chat-template: {override!r} is neither a file nor a Jinja template")
        return override
    own = getattr(processor, "chat_template", None)
    if own:
        return own
    adapter = ADAPTERS.get(model_type)
    if adapter is not None and not adapter.uses_chat_template:
        return None
    if model_type in DEFAULT_CHAT_TEMPLATES:
        return DEFAULT_CHAT_TEMPLATES[model_type]()
    raise ValueError(f"processor: has no chat template and model_type {model_type!r} has no "
                     "default one; pass --chat-template (a Jinja template or a file holding one)")


def processor_prompt(processor, messages):
    """The prompt text of ``messages`` for a family whose processor builds the prompt itself (no
    chat template, :func:`resolve_chat_template` gave None: PaliGemma): its image token, then
    the user's text; the processor adds ``<bos>`` and the separator."""
    question = "\n".join(c["text"] for m in messages for c in m["content"]
                         if c.get("type") == "text" and m["role"] == "user").strip()
    return getattr(processor, "image_token", "<image>") + question


# --------------------------------------------------------------------------------------------
# the LM head
# --------------------------------------------------------------------------------------------

def logit_softcap(config, what="model"):
    """The logit soft-cap that ``config``'s family forward applies and the fused head then applies
    too (``logit_softcap`` of :func:`bpo_fast.ops.linear.linear_sequence_logprobs`), or None.
    PaliGemma's forward caps with its text config's ``final_logit_softcapping`` (Gemma 2 text:
    PaliGemma 2). Raises :class:`UnsupportedModelError` for a transform the fused head does not
    compute (the numbers would silently differ from HF's): a cap in a family whose forward is
    not known to apply it, logit scales."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for c in (config, text):
        v = getattr(c, "final_logit_softcapping", None)
        if v and not ADAPTERS.get(config.model_type, VLMAdapter).caps_logits:
            raise UnsupportedModelError(
                f"{what}: {config.model_type} (text model {getattr(text, 'model_type', '?')}) "
                f"sets final_logit_softcapping={v}, and bpo-fast does not know whether this "
                "family's forward applies it; not supported")
        for name in ("logit_scale", "logits_scaling"):
            v = getattr(c, name, None)
            if v not in (None, 1, 1.0):
                raise UnsupportedModelError(f"{what}: {config.model_type} config.{name}={v} "
                                            "scales the logits; not supported by the fused head")
    # what the capping families' forward reads (PaliGemma: the text config's value only)
    cap = getattr(text, "final_logit_softcapping", None)
    return float(cap) if cap else None


def lm_head_parts(model):
    """``(weight, bias, logit_softcap)`` of the LM head (the cap: :func:`logit_softcap`, None
    without one); raises :class:`UnsupportedModelError` for a logit transform the fused head
    does not compute."""
    base = _unwrap(model)
    cap = logit_softcap(base.config, f"model {type(base).__name__}")
    head = base.get_output_embeddings()
    return head.weight, getattr(head, "bias", None), cap


# --------------------------------------------------------------------------------------------
# images can never be dropped silently
# --------------------------------------------------------------------------------------------

class ImagesDroppedError(UnsupportedModelError):
    """A family's forward did not hand the image features it was given to its decoder (e.g.
    transformers < 5.18, whose base forwards swallow ``mm_encoder_outputs`` through ``**kwargs``:
    the log-probs are then those of the prompt without its images)."""


def _feature_rows(x):
    """``[n, H]`` rows of a ``pooler_output`` (a tensor, or a list of per-image tensors), in the
    order the family places them (row-major over the image tokens)."""
    if isinstance(x, torch.Tensor):
        return x.reshape(-1, x.shape[-1])
    return torch.cat([t.reshape(-1, t.shape[-1]) for t in x])


class _ImageUseCheck:
    """Hooks on a model's base model and its decoder that verify, on every base forward that is
    given images, that the decoder's ``inputs_embeds`` hold exactly those image features at the
    image-token positions (and that Qwen3-VL's deepstack features reach the decoder).

    Why at the decoder's input: it is where every family hands over its merged sequence
    (``language_model`` / ``text_model``, called with ``inputs_embeds``), whatever its merge
    step (``masked_scatter``, Idefics3's ``inputs_merger``, tiling, anyres packing) and whatever
    the transformers version; the features arrive either through ``mm_encoder_outputs`` (our
    steps, and ``generate`` from 5.18 on) or from the model's own ``get_image_features`` on
    ``pixel_values`` (captured by a wrapper on the instance). The merge copies the features (cast
    to the embedding dtype), so the comparison is exact. Cost: one gather and compare of the
    image rows (``n_image_tokens x hidden`` elements) per forward that has images, and nothing on
    the decode steps of ``generate`` (they carry no images)."""

    def __init__(self, model):
        root = _unwrap(model)
        self.base = root.model
        self.decoder = root.get_decoder()
        self.token = image_token_id(root)
        self.family = root.config.model_type
        self.pending = None  # what the base forward in flight was given

    def _error(self, what):
        import transformers

        return ImagesDroppedError(
            f"model: the {self.family} forward of transformers {transformers.__version__} "
            f"dropped the images it was given ({what}); its log-probs would be those of the "
            "prompt without images (bpo-fast needs a transformers whose base forward takes "
            "mm_encoder_outputs: >= 5.18)")

    def base_pre(self, module, args, kwargs):
        mm = kwargs.get("mm_encoder_outputs")
        given = mm.get("image") if isinstance(mm, dict) else None
        if given is None and kwargs.get("pixel_values") is None:
            self.pending = None  # no images (text-only batch, a decode step of generate)
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.pending = {"ids": ids, "features": given, "checked": False}

    def image_features(self, fn):
        @functools.wraps(fn)  # same signature: generate() inspects it to pick the arguments
        def wrapper(*args, **kwargs):
            out = fn(*args, **kwargs)
            if self.pending is not None and self.pending["features"] is None:
                self.pending["features"] = out
            return out
        return wrapper

    def decoder_pre(self, module, args, kwargs):
        p = self.pending
        if p is None or p["checked"]:
            return
        p["checked"] = True
        feats, ids = p["features"], p["ids"]
        if feats is None:
            raise self._error("pixel_values were given but get_image_features never ran")
        embeds = kwargs.get("inputs_embeds")
        if embeds is None or ids is None or ids.shape != embeds.shape[:-1]:
            raise self._error("the decoder got no inputs_embeds aligned with input_ids")
        rows = _feature_rows(getattr(feats, "pooler_output", feats)).to(embeds.dtype)
        placed = embeds[ids == self.token]
        if placed.shape != rows.shape or not torch.equal(placed, rows.to(placed.device)):
            n = placed.shape[0]
            differ = (int((placed != rows.to(placed.device)).any(-1).sum())
                      if placed.shape == rows.shape else n)
            raise self._error(f"{differ} of {n} image-token inputs of the decoder are not the "
                              f"{rows.shape[0]} image features")
        if getattr(feats, "deepstack_features", None) is not None and \
                kwargs.get("deepstack_visual_embeds") is None:
            raise self._error("the deepstack features did not reach the decoder")

    def base_post(self, module, args, kwargs, output):
        p, self.pending = self.pending, None
        if p is not None and not p["checked"]:
            raise self._error("its decoder never ran with them")


@contextlib.contextmanager
def images_used(model):
    """Within the block, every forward of ``model``'s base model that is given images (features
    through ``mm_encoder_outputs``, or ``pixel_values`` it encodes itself, as in ``generate``)
    must hand exactly those features to its decoder at the image tokens; otherwise it raises
    :class:`ImagesDroppedError` naming the family and the transformers version (one line; a
    user error of the CLI). Every path that runs a VLM on images goes through it: the
    preference forward (:meth:`VLMAdapter.hidden_states`: ``train``, ``ref-logps``, the demo)
    and generation (:meth:`bpo_fast.data.generation.Generator.generate_inputs`: ``build-pairs``,
    ``generate``, evaluation during training, the demo's answers). Re-entrant: an inner block on
    the same model adds nothing."""
    root = _unwrap(model)
    if not callable(getattr(root, "get_image_features", None)) or \
            getattr(getattr(root, "model", None), "_bpo_images_used", False):
        yield  # a text-only model (the LLM error injector's), or already checked
        return
    check = _ImageUseCheck(root)
    base = check.base
    handles = [base.register_forward_pre_hook(check.base_pre, with_kwargs=True),
               base.register_forward_hook(check.base_post, with_kwargs=True),
               check.decoder.register_forward_pre_hook(check.decoder_pre, with_kwargs=True)]
    base.get_image_features = check.image_features(base.get_image_features)
    base._bpo_images_used = True
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        del base.get_image_features  # the class's method again
        del base._bpo_images_used


# --------------------------------------------------------------------------------------------
# adapters
# --------------------------------------------------------------------------------------------

class VLMAdapter:
    """How one family encodes, batches and places its images. Subclass per family (or reuse with
    other flags); :data:`ADAPTERS` maps ``config.model_type`` to an instance."""

    name = "llava"
    # per-image tensors whose shapes differ between images may be zero-padded to the largest
    # (the processor pads a batch the same way and the model drops the padding)
    pad_images = False
    # rows may be packed without padding (1-D positions restarting per row, plain causal mask)
    packable = True
    # the prompt comes from a chat template (False: the processor builds it, PaliGemma)
    uses_chat_template = True
    # dim 0 of pixel_values counts images (False: InternVL's flattened tiles)
    images_along_dim0 = True
    # the family's forward caps the logits with final_logit_softcapping (see logit_softcap)
    caps_logits = False
    # pairs without an image / with several images (the processor and the model take them);
    # where not, why (said in the error)
    text_only_pairs = True
    multi_image_pairs = True
    one_image_reason = "the family takes exactly one image per prompt"

    def check_pair_images(self, n, where="pair"):
        """Raise a ``ValueError`` naming ``where`` when the family cannot take a pair with ``n``
        images (text-only or multi-image pairs where the family has one image per prompt)."""
        if n == 0 and not self.text_only_pairs:
            raise ValueError(f"{where}: a text-only pair (no image), but {self.name} models need "
                             f"one image per prompt ({self.one_image_reason})")
        if n > 1 and not self.multi_image_pairs:
            raise ValueError(f"{where}: {n} images, but {self.name} models take one image per "
                             f"prompt ({self.one_image_reason})")

    def check_config(self, config, what="model"):
        """Raise (one line naming ``what``) when this transformers cannot run ``config``'s
        variant of the family exactly; nothing by default."""

    def base_model(self, model):
        base = _unwrap(model)
        inner = getattr(base, "model", None)
        if inner is None or not callable(getattr(inner, "get_image_features", None)):
            raise UnsupportedModelError(f"model: {type(base).__name__} has no base model with "
                                        "get_image_features (model.model)")
        return inner

    # ---- images -------------------------------------------------------------------------

    def image_inputs(self, processor_out):
        """The image part of one processor call (everything but the text rows)."""
        return {k: v for k, v in processor_out.items() if k not in TEXT_KEYS}

    def collate_images(self, per_pair):
        """Per-pair image inputs (dicts of what the processor returned for one image) -> one
        batch dict, images in pair order (text-only pairs contribute nothing)."""
        out = {}
        per_pair = [p for p in per_pair if p]
        if not per_pair:
            return out
        for key in per_pair[0]:
            vals = [p[key] for p in per_pair]
            if not isinstance(vals[0], torch.Tensor):
                if isinstance(vals[0], (list, tuple)):
                    out[key] = [x for v in vals for x in v]
                elif all(v == vals[0] for v in vals):
                    out[key] = vals[0]
                else:
                    raise ValueError(f"{key}: differs between the images of the batch ({vals})")
                continue
            shapes = {tuple(v.shape[1:]) for v in vals}
            if len(shapes) == 1:
                out[key] = torch.cat(vals)
            elif self.pad_images and len({v.dim() for v in vals}) == 1:
                dims = [max(v.shape[d] for v in vals) for d in range(1, vals[0].dim())]
                padded = []
                for v in vals:
                    p = v.new_zeros((v.shape[0], *dims))
                    p[(slice(None),) + tuple(slice(0, s) for s in v.shape[1:])] = v
                    padded.append(p)
                out[key] = torch.cat(padded)
            else:
                raise ValueError(f"{key}: per-image shapes {sorted(shapes)} differ and "
                                 f"{self.name} images cannot be padded to one batch")
        return out

    def num_images(self, images):
        """How many images ``images`` holds (None when the layout does not say: InternVL tiles)."""
        if "image_grid_thw" in images:
            return int(images["image_grid_thw"].shape[0])
        pv = images.get("pixel_values")
        return int(pv.shape[0]) if isinstance(pv, torch.Tensor) and self.images_along_dim0 else None

    def encode(self, model, images):
        """The model's own ``get_image_features`` on the batch's images (each pair's once), as the
        base forward's ``mm_encoder_outputs["image"]``."""
        base = self.base_model(model)
        images = dict(images)
        pv = images.get("pixel_values")
        if isinstance(pv, torch.Tensor) and pv.is_floating_point():
            dtype = _vision_dtype(base)
            if dtype is not None:
                images["pixel_values"] = pv.to(dtype)
        accepted = _parameters(type(base).get_image_features)
        if accepted is not None:
            images = {k: v for k, v in images.items() if k in accepted}
        return base.get_image_features(**images, return_dict=True)

    @staticmethod
    def num_feature_tokens(enc):
        """Rows of the pooled image features (one per image placeholder token)."""
        po = enc.pooler_output
        if isinstance(po, torch.Tensor):
            return po.numel() // po.shape[-1]
        return sum(t.numel() // t.shape[-1] for t in po)

    @staticmethod
    def _fields(enc):
        return [k for k in ("pooler_output", "deepstack_features") if getattr(enc, k, None) is not None]

    def for_rows(self, enc):
        """Encoder output for the ``[chosen; rejected]`` rows: the pairs' features twice, in row
        order (HF places features in row-major order of the placeholder tokens)."""
        return type(enc)(**{k: _map_features(_twice, getattr(enc, k)) for k in self._fields(enc)})

    def detach(self, enc):
        return type(enc)(**{k: _map_features(
            lambda x: x.detach() if isinstance(x, torch.Tensor) else [t.detach() for t in x],
            getattr(enc, k)) for k in self._fields(enc)})

    # ---- rows ---------------------------------------------------------------------------

    def row_kwargs(self, model, input_ids, attention_mask, labels, images):
        """Extra keyword arguments of the base forward for the ``[chosen; rejected]`` rows."""
        return {}

    def hidden_states(self, model, input_ids, attention_mask, labels, images, enc, packed=False):
        """Last hidden states ``[2B, T, H]`` of the base model with ``enc`` placed in both rows."""
        base = self.base_model(model)
        kwargs = self.row_kwargs(model, input_ids, attention_mask, labels, images)
        if enc is not None:  # None: a text-only batch
            kwargs["mm_encoder_outputs"] = {"image": self.for_rows(enc)}
        with images_used(model):
            if packed:
                return self._packed(base, input_ids, attention_mask, kwargs)
            out = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                       return_dict=True, **kwargs)
        return out.last_hidden_state

    def _packed(self, base, input_ids, attention_mask, kwargs):
        """Rows packed into one padding-free sequence; ``position_ids`` restart at each row (how
        transformers delimits sequences for flash-attention varlen). Image features keep their
        order: packing keeps the row-major order of the placeholder tokens."""
        n, t = input_ids.shape
        keep = attention_mask.reshape(-1).bool()
        idx = keep.nonzero().squeeze(1)
        ids = input_ids.reshape(-1).index_select(0, idx).unsqueeze(0)
        pos = (torch.cumsum(attention_mask.long(), dim=1) - 1).reshape(-1).index_select(0, idx)
        out = base(input_ids=ids, position_ids=pos.unsqueeze(0), attention_mask=None,
                   use_cache=False, return_dict=True, **kwargs)
        h = out.last_hidden_state[0]
        full = h.new_zeros(n * t, h.shape[-1]).index_copy(0, idx, h)
        return full.view(n, t, -1)

    # ---- prompts (pair collation) ------------------------------------------------------

    def encode_pair(self, processor, chat_template, messages, prompt_text, answers, image,
                    tokenizer, processor_kwargs=None):
        """(prompt ids with image tokens expanded, [answer ids...], image inputs) of one pair.

        The answer tokens are what follows the common prefix of the prompt and prompt+answer
        tokenised without the image expansion (robust to tokenisers that merge across the
        boundary). ``image``: one image, or the pair's list of images (empty: text only).
        ``processor_kwargs``: extra arguments of the processor call (``--processor-kwargs``)."""
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        # the pair's images as one sample's list (``[[img, ...]]``), as HF's apply_chat_template
        # passes them: LLaVA-OneVision then knows a multi-image sample (``batch_num_images``: no
        # anyres for its images); a flat list would read as one single-image sample per image
        enc = processor(images=[images] if images else None, text=[prompt_text],
                        return_tensors="pt", **(processor_kwargs or {}))
        prompt_ids = enc["input_ids"][0].tolist()
        plain_prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        fulls = []
        for a in answers:
            full = processor.apply_chat_template(
                messages + [{"role": "assistant", "content": [{"type": "text", "text": a}]}],
                tokenize=False, add_generation_prompt=False, chat_template=chat_template)
            fulls.append(tokenizer(full, add_special_tokens=False)["input_ids"])
        k = min(_common_prefix(plain_prompt, f) for f in fulls)
        if k < len(plain_prompt):
            # the prompt's last tokens merged with an answer: they go to the response side, for
            # both rows, so that chosen and rejected share one prompt
            prompt_ids = prompt_ids[:len(prompt_ids) - (len(plain_prompt) - k)]
        return prompt_ids, [f[k:] for f in fulls], self.image_inputs(enc)


def _common_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@functools.lru_cache(maxsize=None)
def _parameters(fn):
    """Named parameters of ``fn`` (looked up once per function)."""
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None
    names = {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return names


def _vision_dtype(base):
    for name in ("vision_tower", "visual", "vision_model"):
        m = getattr(base, name, None)
        if m is not None:
            for p in m.parameters():
                return p.dtype
    return None


def image_token_id(model):
    """The placeholder token id the model's image features replace."""
    cfg = _unwrap(model).config
    for name in ("image_token_id", "image_token_index"):
        v = getattr(cfg, name, None)
        if v is not None:
            return int(v)
    raise UnsupportedModelError(
        f"model: {type(_unwrap(model)).__name__}.config has no image_token_id / "
        "image_token_index; PreferenceModel needs a vision-language model that marks image "
        "positions with a placeholder token (e.g. LlavaForConditionalGeneration)")


class PaddedTilesAdapter(VLMAdapter):
    """LLaVA-NeXT / OneVision (anyres patches + ``image_sizes``), Idefics3 / SmolVLM (split tiles +
    ``pixel_attention_mask``): per-image stacks of different sizes, zero-padded like the
    processor pads a batch."""

    pad_images = True


class FlatTilesAdapter(VLMAdapter):
    """InternVL: each image cropped to tiles (+ a thumbnail), all tiles of the batch flattened
    along dim 0; the tile count of each image is in its placeholder tokens."""

    images_along_dim0 = False


class QwenVLAdapter(VLMAdapter):
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL: flattened patches + ``image_grid_thw``; the base forward
    builds the M-RoPE ``position_ids`` with the model's own ``get_rope_index`` (from
    ``mm_token_type_ids`` and the grids of the rows' images) and injects Qwen3-VL's deepstack
    features."""

    packable = False

    def row_kwargs(self, model, input_ids, attention_mask, labels, images):
        # rows without images (text-only pairs) are all-text groups for get_rope_index: 1-D
        # positions on the 3 axes; a text-only batch has no grid, and the base forward then
        # leaves the positions to the text model, as HF does for the processor's text-only rows
        kwargs = {"mm_token_type_ids": (input_ids == image_token_id(model)).to(torch.int32)}
        grid = images.get("image_grid_thw")
        if grid is not None:
            kwargs["image_grid_thw"] = torch.cat([grid, grid])
        return kwargs


class Gemma3Adapter(VLMAdapter):
    """Gemma 3: ``token_type_ids`` = 1 on image tokens, from which the base forward builds the
    bidirectional attention within each image (as the processor's ``token_type_ids`` do)."""

    packable = False

    def row_kwargs(self, model, input_ids, attention_mask, labels, images):
        return {"token_type_ids": (input_ids == image_token_id(model)).long()}


class PaliGemmaAdapter(VLMAdapter):
    """PaliGemma: the processor builds ``<image>*N <bos> prompt \\n`` + answer ``<eos>`` (no chat
    template) and ``token_type_ids`` 0 on the prefix, 1 on the answer: the base forward attends
    bidirectionally over the prefix (prefix-LM), as in training with the processor's ``suffix``."""

    packable = False
    uses_chat_template = False
    caps_logits = True  # PaliGemma 2 (Gemma 2 text): final_logit_softcapping
    text_only_pairs = multi_image_pairs = False
    one_image_reason = "its processor builds the prompt around exactly one image"

    def check_config(self, config, what="model"):
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        if getattr(text, "model_type", None) == "gemma2":
            require("transformers", PALIGEMMA2_TRANSFORMERS,
                    f"{what}: PaliGemma 2 (Gemma 2 text model, eager attention)")

    def row_kwargs(self, model, input_ids, attention_mask, labels, images):
        scored = labels != IGNORE_INDEX
        # answer = from the first scored token on; padding is masked anyway
        first = torch.where(scored.any(1), scored.float().argmax(1),
                            torch.full_like(scored[:, 0], scored.shape[1], dtype=torch.long))
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        return {"token_type_ids": (pos[None, :] >= first[:, None]).long()}

    def encode_pair(self, processor, chat_template, messages, prompt_text, answers, image,
                    tokenizer, processor_kwargs=None):
        prompt_ids, outs, image_out = None, [], None
        for a in answers:
            enc = processor(images=[image], text=[prompt_text], suffix=[a], return_tensors="pt",
                            **(processor_kwargs or {}))
            ids = enc["input_ids"][0].tolist()
            tt = enc["token_type_ids"][0].tolist()
            k = tt.index(1) if 1 in tt else len(ids)
            if prompt_ids is None:
                prompt_ids, image_out = ids[:k], self.image_inputs(enc)
            elif ids[:k] != prompt_ids:
                raise ValueError("processor: PaliGemma prompt differs between the answers")
            outs.append(ids[k:])
        return prompt_ids, outs, image_out


ADAPTERS = {
    "llava": VLMAdapter(),
    "llava_next": PaddedTilesAdapter(),
    "llava_onevision": PaddedTilesAdapter(),
    "idefics3": PaddedTilesAdapter(),
    "smolvlm": PaddedTilesAdapter(),
    "internvl": FlatTilesAdapter(),
    "qwen2_vl": QwenVLAdapter(),
    "qwen2_5_vl": QwenVLAdapter(),
    "qwen3_vl": QwenVLAdapter(),
    "gemma3": Gemma3Adapter(),
    "paligemma": PaliGemmaAdapter(),
}
for _name, _a in ADAPTERS.items():
    _a.name = _name
UNSUPPORTED = {
    "mllama": "model: Mllama (Llama 3.2 Vision) attends to images through cross-attention "
              "layers, not image tokens in the sequence; bpo-fast does not support it",
}


def supported_model_types():
    return sorted(ADAPTERS)


def get_adapter(model_or_type):
    """The adapter of a model (or a ``model_type`` string); :class:`UnsupportedModelError` with
    the list of supported types otherwise."""
    mt = model_or_type if isinstance(model_or_type, str) else _unwrap(model_or_type).config.model_type
    if mt in UNSUPPORTED:
        raise UnsupportedModelError(UNSUPPORTED[mt])
    if mt not in ADAPTERS:
        raise UnsupportedModelError(f"model: model_type {mt!r} is not supported (supported: "
                                    f"{', '.join(supported_model_types())})")
    a = ADAPTERS[mt]
    if not isinstance(model_or_type, str):
        a.check_config(_unwrap(model_or_type).config)
        lm_head_parts(model_or_type)  # rejects logit transforms up front
    return a


# --------------------------------------------------------------------------------------------
# processors without torchvision
# --------------------------------------------------------------------------------------------

def _video_processor_placeholder():
    """A plain ``BaseVideoProcessor`` (no torchvision needed) for processors that insist on one
    although we never pass videos."""
    from transformers.video_processing_utils import BaseVideoProcessor

    return BaseVideoProcessor()


class _allow_video_placeholder:
    """Lets a processor accept :func:`_video_processor_placeholder` where transformers, without
    torchvision, only knows a dummy ``BaseVideoProcessor`` class and rejects every video
    processor. Scoped to one ``with`` block; only the ``video_processor`` argument is affected."""

    def __enter__(self):
        from transformers import processing_utils as pu
        from transformers.video_processing_utils import BaseVideoProcessor

        self._orig = orig = pu.ProcessorMixin.check_argument_for_proper_class

        def check(proc, name, arg):
            if "video" in name and isinstance(arg, BaseVideoProcessor):
                return type(arg)
            return orig(proc, name, arg)

        pu.ProcessorMixin.check_argument_for_proper_class = check
        return self

    def __exit__(self, *exc):
        from transformers import processing_utils as pu

        pu.ProcessorMixin.check_argument_for_proper_class = self._orig
        return False


def build_processor(cls, **parts):
    """``cls(**parts)``, with a placeholder video processor when ``cls`` wants one and none is
    given (torchvision-free CPU installs)."""
    import inspect

    if "video_processor" in inspect.signature(cls.__init__).parameters and \
            parts.get("video_processor") is None:
        parts["video_processor"] = _video_processor_placeholder()
        with _allow_video_placeholder():
            return cls(**parts)
    return cls(**parts)


def load_processor(path):
    """``AutoProcessor.from_pretrained(path)`` (local only); where that fails because the
    processor needs torchvision for its video part (CPU installs whose torch has no matching
    torchvision), the processor is assembled from its parts: the PIL image processor, the
    tokenizer, the saved processor settings and chat template, and a placeholder video
    processor. Images are processed exactly as by the full processor."""
    import json
    import os

    import transformers
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        return AutoProcessor.from_pretrained(path, local_files_only=True)
    except (ImportError, AttributeError, TypeError, ValueError) as exc:
        cfg_file = os.path.join(path, "processor_config.json")
        if not os.path.isfile(cfg_file):
            raise
        first = exc
    with open(cfg_file, encoding="utf-8") as f:
        cfg = json.load(f)
    cls = getattr(transformers, cfg.get("processor_class", ""), None)
    if cls is None:
        raise first
    kwargs = {k: v for k, v in cfg.items()
              if k not in ("processor_class", "image_processor", "video_processor",
                           "tokenizer", "feature_extractor", "auto_map")}
    if isinstance(cfg.get("image_processor"), dict):
        ip_cfg = dict(cfg["image_processor"])
        ip_name = ip_cfg.pop("image_processor_type", "")
        ip_cls = getattr(transformers, ip_name.removesuffix("Fast") + "Pil", None) or \
            getattr(transformers, ip_name, None)
        ip = ip_cls(**{k: v for k, v in ip_cfg.items() if k != "processor_class"})
    else:
        ip = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    template = os.path.join(path, "chat_template.jinja")
    if "chat_template" not in kwargs and os.path.isfile(template):
        with open(template, encoding="utf-8") as f:
            kwargs["chat_template"] = f.read()
    return build_processor(cls, image_processor=ip, tokenizer=tok, **kwargs)
