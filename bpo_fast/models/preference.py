"""Policy and reference forward together for DPO on vision-language models.

:class:`PreferenceModel` wraps a Hugging Face vision-language model of a family the model layer
knows (:mod:`bpo_fast.models.vlm`: LLaVA, LLaVA-NeXT/OneVision, Qwen2/2.5/3-VL, Idefics3/SmolVLM,
Gemma 3, PaliGemma, InternVL) and runs one DPO step's forward the cheap way:

- the batch holds ``2B`` rows ``[chosen; rejected]`` and the images of its ``B`` pairs (one per
  pair, or none or several: text-only and multi-image pairs mix freely); each image goes
  through the vision tower and projector **once** (the model's own ``get_image_features``) and the
  family's base model places the features in both rows (``mm_encoder_outputs``), with its own
  masks and position ids, so the log-probs are the HF forward's;
- the base model (not the LM-head wrapper) gives hidden states, and the
  LM head goes straight into :func:`bpo_fast.ops.linear.linear_sequence_logprobs` (the fused
  LM-head log-probs) and :func:`bpo_fast.ops.dpo.dpo_loss`: no ``[2B, T, V]`` logits tensor exists;
- the reference is (a) a separate frozen model (``"model"``, its own dtype, no autograd), (b) the
  policy with its LoRA adapters disabled (``"lora"``, no second copy of the weights), or (c) log-probs
  precomputed into a cache (``"cached"``, passed to :meth:`PreferenceModel.forward`);
- when the reference's vision tower and projector are the policy's (frozen, same weights), the
  reference reuses the policy's image features instead of encoding the images again;
- with ``flash-attn`` installed (``pip install bpo-fast[flash]``) and a fp16/bf16 CUDA model, the rows
  are packed without padding (varlen attention, sequences delimited by ``position_ids``); otherwise
  PyTorch SDPA on the padded batch. The choice is logged.
"""

import contextlib
import importlib.util
import logging
import re
from dataclasses import dataclass

import torch
from torch import nn

logger = logging.getLogger("bpo_fast")

REFERENCE_MODES = ("model", "lora", "cached")
IGNORE_INDEX = -100


@dataclass
class PreferenceOutput:
    """What one :meth:`PreferenceModel.forward` returns.

    ``loss`` is ``dpo.loss`` (the mean over pairs), plus the RPO term when ``rpo_alpha`` is set
    (:func:`bpo_fast.ops.preference.preference_loss`);
    log-probs are float32 sums over the response
    tokens, token counts are int64; ``dpo`` is the :class:`bpo_fast.ops.dpo.DPOOutput` of the
    configured loss (rewards, margins, accuracy).
    """

    loss: torch.Tensor
    dpo: object
    policy_chosen_logps: torch.Tensor
    policy_rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor
    ref_rejected_logps: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


# --------------------------------------------------------------------------------------------
# model plumbing (generic over HF vision-language models)
# --------------------------------------------------------------------------------------------

def is_peft_model(model):
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


def unwrap(model):
    """The underlying transformers model (through a peft wrapper)."""
    return model.get_base_model() if is_peft_model(model) else model


def image_token_id(model):
    from bpo_fast.models.vlm import image_token_id as _image_token_id

    return _image_token_id(model)


def check_vlm_api(model):
    """Raise a clear ``TypeError`` unless ``model`` is a vision-language model of a family the
    model layer knows (:mod:`bpo_fast.models.vlm`) with a plain LM head; returns the unwrapped
    model."""
    from bpo_fast.models.vlm import get_adapter

    base = unwrap(model)
    missing = [m for m in ("get_image_features", "get_input_embeddings", "get_decoder",
                           "get_output_embeddings") if not callable(getattr(base, m, None))]
    if missing:
        raise TypeError(f"model: {type(base).__name__} lacks {missing}; PreferenceModel supports "
                        "Hugging Face vision-language models (see bpo_fast.models.vlm)")
    head = base.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise TypeError(f"model: {type(base).__name__}.get_output_embeddings() has no weight tensor")
    if hasattr(head, "base_layer") or hasattr(head, "modules_to_save"):
        raise ValueError("model: the LM head is wrapped by peft (LoRA target or modules_to_save); "
                         "the fused LM-head loss reads lm_head.weight directly, so leave lm_head "
                         "out of the LoRA target modules")
    image_token_id(model)
    get_adapter(model)
    return base


def _parts(model):
    base = unwrap(model)
    return base.get_input_embeddings(), base.get_decoder(), base.get_output_embeddings()


def image_path_parameters(model):
    """(name, parameter) of the image path: everything but the decoder, embeddings and LM head."""
    base = unwrap(model)
    embed, decoder, head = _parts(model)
    text_ids = {id(p) for m in (embed, decoder, head) for p in m.parameters()}
    return [(n, p) for n, p in base.named_parameters() if id(p) not in text_ids]


def _image_path_frozen(model):
    """True when no image-path parameter trains and peft did not wrap any image-path module."""
    for n, p in image_path_parameters(model):
        if p.requires_grad or "lora_" in n or "modules_to_save" in n:
            return False
    return True


def _same_image_path(policy, reference):
    a, b = image_path_parameters(policy), image_path_parameters(reference)
    if len(a) != len(b):
        return False
    for (na, pa), (nb, pb) in zip(a, b):
        if (pa.shape != pb.shape or pa.dtype != pb.dtype or pa.device != pb.device
                or not torch.equal(pa.detach(), pb.detach())):
            return False
    return True


@contextlib.contextmanager
def _gathered(module):
    """Unshard an FSDP2-sharded module around code that uses its parameters without calling its
    own forward (we call its embeddings, decoder and LM-head weight directly)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        FSDPModule = ()
    if isinstance(module, FSDPModule):
        module.unshard()
        try:
            yield
        finally:
            module.reshard()
    else:
        yield


def flash_attn_available():
    return importlib.util.find_spec("flash_attn") is not None


def choose_attention(requested=None, device=None, dtype=None, log=True):
    """The attention implementation to load a model with, and log the choice (``log``).

    ``requested`` wins when given. Otherwise ``flash_attention_2`` when ``flash-attn`` is installed,
    the device is CUDA and the dtype is fp16/bf16 (flash-attn supports nothing else), else ``sdpa``.
    """
    if requested:
        impl, why = requested, "requested"
    elif (flash_attn_available() and device is not None and torch.device(device).type == "cuda"
          and dtype in (torch.float16, torch.bfloat16)):
        impl, why = "flash_attention_2", "flash-attn installed, CUDA, half precision"
    else:
        reasons = []
        if not flash_attn_available():
            reasons.append("flash-attn not installed (pip install bpo-fast[flash])")
        if device is None or torch.device(device).type != "cuda":
            reasons.append("not on CUDA")
        if dtype not in (torch.float16, torch.bfloat16):
            reasons.append(f"dtype {dtype} is not fp16/bf16")
        impl, why = "sdpa", "; ".join(reasons) or "default"
    if log:
        logger.info("attention: %s (%s)", impl, why)
    return impl


def _per_submodel_attention(config, impl, log=True):
    """``impl``, or a per-sub-config dict when the text model cannot run it: Gemma 2 (PaliGemma
    2's text model) has no SDPA path in transformers (``_supports_sdpa = False``: its attention
    soft-caps the scores, which SDPA cannot), so loading the whole model with the default
    ``sdpa`` fails; its text model gets ``eager`` (what HF recommends for training Gemma 2) and
    the vision tower keeps ``impl``."""
    if impl != "sdpa" or not hasattr(config, "get_text_config"):
        return impl
    text = config.get_text_config()
    if text is config:
        return impl
    try:
        from transformers.models.auto.modeling_auto import MODEL_MAPPING

        text_cls = MODEL_MAPPING[type(text)]
    except (ImportError, KeyError):
        return impl
    if getattr(text_cls, "_supports_sdpa", True):
        return impl
    key = next((k for k in getattr(config, "sub_configs", {}) if getattr(config, k) is text),
               "text_config")
    if log:
        logger.info("attention: eager for the text model %s (no SDPA support), %s elsewhere",
                    text_cls.__name__, impl)
    return {"": impl, key: "eager", **{k: impl for k in getattr(config, "sub_configs", {})
                                         if k != key}}


def load_vlm(path, *, dtype=torch.float32, attn_implementation=None, device=None,
             compute_dtype=None, log_attention=True):
    """Load a vision-language model from a local path (no downloads) with a chosen attention.

    ``compute_dtype``: the dtype the model will run in when it differs from the stored ``dtype``
    (fp32 master weights under bf16 autocast / FSDP mixed precision); it decides whether
    flash-attention can be used. ``log_attention``: log the attention chosen (off for a second
    model whose choice was just logged)."""
    import os

    from transformers import AutoConfig

    if not os.path.isdir(path):
        raise FileNotFoundError(f"model: {path!r} is not a directory (a local save_pretrained "
                                "folder; nothing is downloaded)")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    from bpo_fast.models.vlm import get_adapter, logit_softcap

    # clear errors for unsupported families, versions and heads, before loading
    get_adapter(config.model_type).check_config(config, f"model {path!r}")
    logit_softcap(config, f"model {path!r}")  # rejects what the fused head cannot compute
    impl = choose_attention(attn_implementation, device, compute_dtype or dtype,
                            log=log_attention)
    if attn_implementation is None:
        impl = _per_submodel_attention(config, impl, log=log_attention)
    kwargs = dict(dtype=dtype, attn_implementation=impl, local_files_only=True)
    if config.model_type == "llava":
        from transformers import LlavaForConditionalGeneration as cls
    else:
        try:
            from transformers import AutoModelForImageTextToText as cls
        except ImportError as exc:  # very old transformers
            raise TypeError(f"model {path!r}: model_type {config.model_type!r} is not llava and "
                            "this transformers has no AutoModelForImageTextToText") from exc
    try:
        model = cls.from_pretrained(path, **kwargs)
    except ValueError as exc:
        raise TypeError(f"model {path!r}: cannot load model_type {config.model_type!r} as a "
                        f"vision-language model ({exc})") from exc
    if device is not None:
        model = model.to(device)
    check_vlm_api(model)
    return model


# --------------------------------------------------------------------------------------------
# the wrapper
# --------------------------------------------------------------------------------------------

class PreferenceModel(nn.Module):
    """Policy (+ reference) forward on a ``[chosen; rejected]`` batch, each pair's images once.

    Args:
        policy: the trained HF vision-language model (a peft ``PeftModel`` for ``"lora"``).
        reference: the frozen reference model for ``reference_mode="model"``.
        reference_mode: ``"model"``, ``"lora"`` or ``"cached"``; ``None`` picks ``"model"`` when a
            reference is given, ``"lora"`` for a peft policy, else ``"cached"``.
        beta, loss_type, label_smoothing: the DPO loss (:func:`bpo_fast.ops.dpo.dpo_loss`).
        rpo_alpha: when set, adds ``rpo_alpha`` times the chosen answers' negative log-likelihood
            per token (RPO, as TRL's ``rpo_alpha``): keeps DPO from lowering the chosen answers'
            likelihood along with the rejected ones (shorter, emptier answers).
        temperature: logits are divided by it before the log-softmax (after the family's logit
            soft-cap, e.g. PaliGemma 2's ``final_logit_softcapping``, which the fused head
            applies as the HF forward does).
        packing: ``"auto"`` (pack when the decoder runs flash-attention), ``True`` or ``False``.
        share_image_features: ``"auto"`` reuses the policy's image features for the reference
            when both use the same frozen vision tower and projector; ``False`` never does.
        discopop_tau, length_count: as :func:`bpo_fast.ops.preference.preference_loss` (DiscoPOP's
            temperature; how ``ipo`` / ``sigmoid_norm`` count tokens: ``"scored"`` or TRL's
            ``"completion"``).
    """

    def __init__(self, policy, reference=None, *, reference_mode=None, beta=0.1,
                 loss_type="sigmoid", label_smoothing=0.0, temperature=1.0, packing="auto",
                 share_image_features="auto", rpo_alpha=None, discopop_tau=0.05,
                 length_count="scored"):
        super().__init__()
        check_vlm_api(policy)
        if reference_mode is None:
            reference_mode = ("model" if reference is not None
                              else "lora" if is_peft_model(policy) else "cached")
        if reference_mode not in REFERENCE_MODES:
            raise ValueError(f"reference_mode: expected one of {list(REFERENCE_MODES)}, "
                             f"got {reference_mode!r}")
        if reference_mode == "model":
            if reference is None:
                raise ValueError("reference: reference_mode='model' needs a reference model")
            check_vlm_api(reference)
            if image_token_id(reference) != image_token_id(policy):
                raise ValueError("reference: its image_token_id differs from the policy's")
            reference.requires_grad_(False)
            reference.eval()
        elif reference is not None:
            raise ValueError(f"reference: must be None for reference_mode={reference_mode!r}")
        if reference_mode == "lora" and not is_peft_model(policy):
            raise ValueError("policy: reference_mode='lora' needs a peft model (get_peft_model) "
                             "whose disabled adapters give the reference")
        if packing not in ("auto", True, False):
            raise ValueError(f"packing: expected 'auto', True or False, got {packing!r}")
        if share_image_features not in ("auto", False):
            raise ValueError("share_image_features: expected 'auto' or False")
        from bpo_fast.ops.losses import check_length_count, check_rpo_alpha, loss_config

        # the loss settings are checked once, here (the registry: ranges, what each type reads)
        self.loss_config = loss_config(loss_type, beta, label_smoothing, discopop_tau)
        self.length_count = check_length_count(length_count)
        self.policy = policy
        self.reference = reference
        self.reference_mode = reference_mode
        self.beta = self.loss_config.beta
        self.loss_type = loss_type
        self.label_smoothing = self.loss_config.label_smoothing
        self.rpo_alpha = None if rpo_alpha is None else check_rpo_alpha(rpo_alpha)
        self.temperature = float(temperature)
        self.packing = packing
        self.image_token_id = image_token_id(policy)
        from bpo_fast.models.vlm import get_adapter

        self.adapter = get_adapter(policy)
        if reference_mode == "model" and get_adapter(reference) is not self.adapter:
            raise ValueError("reference: its model_type differs from the policy's")
        if packing is True and not self.adapter.packable:
            raise ValueError(f"packing: {self.adapter.name} models cannot pack rows (their "
                             "positions or masks depend on the row: M-RoPE / token_type_ids); "
                             "use packing='auto' or False")
        # Decided once, before any sharding: comparing weights later would gather them.
        self.share_image_features = False
        if share_image_features == "auto" and reference_mode != "cached":
            if reference_mode == "lora":
                self.share_image_features = _image_path_frozen(policy)
            else:
                self.share_image_features = (_image_path_frozen(policy)
                                             and _same_image_path(policy, reference))
        logger.info("PreferenceModel: reference=%s, reference reuses policy image features: %s, "
                    "packing=%s", reference_mode, self.share_image_features, packing)

    def train(self, mode=True):
        """Train mode for the policy only: the reference stays in eval mode (no dropout)."""
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()
        return self

    # ---- pieces --------------------------------------------------------------------------

    def _use_packing(self, model):
        if not self.adapter.packable:
            return False
        if self.packing != "auto":
            return bool(self.packing)
        impl = getattr(unwrap(model).config, "_attn_implementation", None)
        return impl is not None and "flash" in str(impl)

    def _check_batch(self, input_ids, attention_mask, labels, pixel_values, image_kwargs=None):
        for name, t in (("input_ids", input_ids), ("attention_mask", attention_mask),
                        ("labels", labels)):
            if not isinstance(t, torch.Tensor) or t.dim() != 2:
                raise ValueError(f"{name}: expected a [2B, T] tensor, got "
                                 f"{getattr(t, 'shape', type(t).__name__)}")
        if input_ids.shape[0] % 2 or input_ids.shape[0] == 0:
            raise ValueError(f"input_ids: expected an even, non-zero number of rows [chosen; "
                             f"rejected], got {input_ids.shape[0]}")
        if attention_mask.shape != input_ids.shape or labels.shape != input_ids.shape:
            raise ValueError(f"attention_mask/labels: expected shape {tuple(input_ids.shape)}, got "
                             f"{tuple(attention_mask.shape)} / {tuple(labels.shape)}")
        if pixel_values is None:  # a text-only batch
            return
        if not isinstance(pixel_values, torch.Tensor):
            raise ValueError(f"pixel_values: expected a tensor or None, got "
                             f"{type(pixel_values).__name__}")
        # pairs may hold any number of images (several, or none); that the images fill the
        # rows' image tokens exactly is checked in hidden_states

    def encode(self, model, pixel_values, **image_kwargs):
        """The image encoder output of the batch's ``B`` images (no autograd when the image path
        is frozen), as the family's base model takes it (``mm_encoder_outputs["image"]``); None
        for a text-only batch (``pixel_values`` None)."""
        if pixel_values is None:
            return None
        params = self._image_params(model)
        frozen = not any(p.requires_grad for _, p in params)
        ctx = torch.no_grad() if frozen or not torch.is_grad_enabled() else contextlib.nullcontext()
        with ctx:
            return self.adapter.encode(model, {"pixel_values": pixel_values, **image_kwargs})

    def _image_params(self, model):
        # the parameter list is fixed per model; looking it up every step would walk all modules
        cache = self.__dict__.setdefault("_image_params_cache", {})
        key = id(model)
        if key not in cache:
            cache[key] = image_path_parameters(model)
        return cache[key]

    def hidden_states(self, model, input_ids, attention_mask, features, labels=None,
                      **image_kwargs):
        """Last hidden states ``[2B, T, H]`` of the family's base model with ``features`` (the
        pairs' images, from :meth:`encode`; None for a text-only batch) placed in both the chosen and the rejected row of
        each pair. ``labels`` and the image inputs feed the family's row inputs (PaliGemma's
        prefix mask, Qwen's M-RoPE grids)."""
        n_slots = int((input_ids == self.image_token_id).sum())
        n_feat = self.adapter.num_feature_tokens(features) if features is not None else 0
        if n_slots != 2 * n_feat:
            raise ValueError(f"pixel_values: the images give {n_feat} features per row set but "
                             f"input_ids hold {n_slots} image tokens in the "
                             f"{input_ids.shape[0]} rows (expected {2 * n_feat}: each pair's "
                             "images once in its chosen and once in its rejected row)")
        if labels is None:
            labels = torch.full_like(input_ids, IGNORE_INDEX)
        return self.adapter.hidden_states(model, input_ids, attention_mask, labels, image_kwargs,
                                          features, packed=self._use_packing(model))

    def _head(self, model, hidden):
        """``(hidden, weight, bias, logit_softcap)`` for the fused head, in the compute dtype."""
        from bpo_fast.models.vlm import lm_head_parts

        weight, bias, cap = lm_head_parts(model)
        # Under autocast the LM head runs in the autocast dtype (the decoder's residual stream may
        # come out fp32 when the weights are fp32 master copies); the weight cast is tracked by
        # autograd so the gradient still reaches the fp32 weight.
        if torch.is_autocast_enabled(hidden.device.type):
            hidden = hidden.to(torch.get_autocast_dtype(hidden.device.type))
        w = weight.to(hidden.dtype)
        b = bias.to(hidden.dtype) if bias is not None else None
        return hidden, w, b, cap

    def sequence_logps(self, model, input_ids, attention_mask, labels, pixel_values,
                       features=None, **image_kwargs):
        """Summed response log-probs ``[2B]`` (fp32) and token counts of ``model`` on the batch."""
        from bpo_fast.ops.linear import linear_sequence_logprobs

        if features is None:
            features = self.encode(model, pixel_values, **image_kwargs)
        hidden = self.hidden_states(model, input_ids, attention_mask, features, labels,
                                    pixel_values=pixel_values, **image_kwargs)
        hidden, w, b, cap = self._head(model, hidden)
        return linear_sequence_logprobs(hidden, w, labels, bias=b, ignore_index=IGNORE_INDEX,
                                        temperature=self.temperature, logit_softcap=cap)

    @torch.no_grad()
    def reference_logps(self, input_ids, attention_mask, labels, pixel_values, features=None,
                        **image_kwargs):
        """Reference (chosen, rejected) log-probs, no autograd. ``features``: the policy's image
        features, used only when the reference shares the policy's frozen image path."""
        feats = features if self.share_image_features else None
        if self.reference_mode == "model":
            ref = self.reference
            with _gathered(ref):
                lp, _ = self.sequence_logps(ref, input_ids, attention_mask, labels, pixel_values,
                                            features=feats, **image_kwargs)
        elif self.reference_mode == "lora":
            with self.policy.disable_adapter():
                lp, _ = self.sequence_logps(self.policy, input_ids, attention_mask, labels,
                                            pixel_values, features=feats, **image_kwargs)
        else:
            raise ValueError("ref_chosen_logps/ref_rejected_logps: reference_mode='cached' needs "
                             "the cached reference log-probs passed to forward()")
        b = input_ids.shape[0] // 2
        return lp[:b].float().clone(), lp[b:].float().clone()

    # ---- the step ------------------------------------------------------------------------

    def forward(self, input_ids, attention_mask, labels, pixel_values=None, ref_chosen_logps=None,
                ref_rejected_logps=None, **image_kwargs):
        """DPO forward on ``[chosen; rejected]`` rows; returns a :class:`PreferenceOutput`.

        ``ref_chosen_logps``/``ref_rejected_logps`` (``[B]``) are required for the cached reference
        and, when given, used instead of running the reference in the other modes too.
        """
        from bpo_fast.ops.preference import preference_loss

        self._check_batch(input_ids, attention_mask, labels, pixel_values, image_kwargs)
        b = input_ids.shape[0] // 2
        features = self.encode(self.policy, pixel_values, **image_kwargs)
        if ref_chosen_logps is None or ref_rejected_logps is None:
            if ref_chosen_logps is not None or ref_rejected_logps is not None:
                raise ValueError("ref_chosen_logps/ref_rejected_logps: pass both or neither")
            ref_c, ref_r = self.reference_logps(input_ids, attention_mask, labels, pixel_values,
                                                features=(self.adapter.detach(features)
                                                          if features is not None else None),
                                                **image_kwargs)
        else:
            ref_c, ref_r = (torch.as_tensor(t, device=input_ids.device).float().reshape(-1)
                            for t in (ref_chosen_logps, ref_rejected_logps))
            if ref_c.shape[0] != b or ref_r.shape[0] != b:
                raise ValueError(f"ref_chosen_logps/ref_rejected_logps: expected [{b}] each, got "
                                 f"{tuple(ref_c.shape)} / {tuple(ref_r.shape)}")
        hidden = self.hidden_states(self.policy, input_ids, attention_mask, features, labels,
                                    pixel_values=pixel_values, **image_kwargs)
        hidden, w, bias, cap = self._head(self.policy, hidden)
        # the loss block: one op (fused LM head, preference loss, RPO term; 3 LM-head GEMMs per
        # scored token when a gradient is needed)
        res = preference_loss(hidden, w, labels, ref_c, ref_r, loss=self.loss_config,
                              rpo_alpha=self.rpo_alpha, bias=bias, ignore_index=IGNORE_INDEX,
                              temperature=self.temperature, logit_softcap=cap,
                              length_count=self.length_count)
        out, loss = res.dpo, res.loss
        # [B]-sized copies rather than views: FSDP2 hooks the outputs of the root module, and
        # views of them would be unsafe to modify in place
        out.policy_chosen_logps = res.policy_chosen_logps.clone()
        out.policy_rejected_logps = res.policy_rejected_logps.clone()
        n_c, n_r = res.chosen_tokens.clone(), res.rejected_tokens.clone()
        return PreferenceOutput(loss=loss, dpo=out, policy_chosen_logps=out.policy_chosen_logps,
                                policy_rejected_logps=out.policy_rejected_logps,
                                ref_chosen_logps=ref_c, ref_rejected_logps=ref_r,
                                chosen_tokens=n_c, rejected_tokens=n_r)

    # ---- construction from a path ----------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, *, reference="model", reference_path=None, dtype=torch.float32,
                        reference_dtype=None, device=None, lora=None, attn_implementation=None,
                        freeze_vision=True, train_projector=False, gradient_checkpointing=False,
                        **kwargs):
        """Load the policy (and the reference) from local paths and wrap them.

        ``lora``: a ``peft.LoraConfig`` (or None for full fine-tuning of the language model);
        ``reference``: ``"model"`` (loads ``reference_path`` or ``path`` again in
        ``reference_dtype``), ``"lora"`` (needs ``lora``) or ``"cached"``.
        """
        if reference not in REFERENCE_MODES:
            raise ValueError(f"reference: expected one of {list(REFERENCE_MODES)}, got {reference!r}")
        if reference == "lora" and lora is None:
            raise ValueError("lora: reference='lora' needs a LoRA config")
        policy = load_vlm(path, dtype=dtype, attn_implementation=attn_implementation, device=device)
        policy = prepare_policy(policy, lora=lora, freeze_vision=freeze_vision,
                                train_projector=train_projector,
                                gradient_checkpointing=gradient_checkpointing)
        ref = None
        if reference == "model":
            ref = load_vlm(reference_path or path, dtype=reference_dtype or dtype,
                           attn_implementation=attn_implementation, device=device)
        return cls(policy, ref, reference_mode=reference, **kwargs)


def prepare_policy(model, *, lora=None, freeze_vision=True, train_projector=False,
                   gradient_checkpointing=False):
    """Set what trains: the image path frozen by default (the projector with ``train_projector``),
    LoRA adapters on the language model when ``lora`` (a ``peft.LoraConfig``) is given."""
    check_vlm_api(model)
    base = unwrap(model)
    img = image_path_parameters(model)
    projector = _projector_module(base)
    proj_ids = {id(p) for p in projector.parameters()} if projector is not None else set()
    if train_projector and projector is None:
        raise ValueError("train_projector: the model has no recognisable projector module "
                         "(multi_modal_projector / mm_projector)")
    if lora is not None:
        from peft import get_peft_model

        if not freeze_vision:
            raise ValueError("freeze_vision: training the vision tower is not supported with LoRA "
                             "(its adapters target the language model); use full fine-tuning")
        base.requires_grad_(False)
        if train_projector:
            lora.modules_to_save = list(lora.modules_to_save or []) + [_projector_name(base)]
        model = get_peft_model(base, lora)
    else:
        for _, p in img:
            p.requires_grad_(not freeze_vision or (train_projector and id(p) in proj_ids))
    if gradient_checkpointing:
        unwrap(model).gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
        unwrap(model).config.use_cache = False
    return model


_PROJECTOR_NAMES = ("multi_modal_projector", "mm_projector", "projector", "connector", "merger")


def _projector_name(base):
    for name, _ in base.named_modules():
        if name.split(".")[-1] in _PROJECTOR_NAMES:
            return name
    return None


def _projector_module(base):
    name = _projector_name(base)
    return base.get_submodule(name) if name else None


def default_lora_targets(model):
    """Regex for LoRA on the language model's attention and MLP projections only (not the vision
    tower, not the LM head)."""
    base = unwrap(model)
    _, decoder, _ = _parts(model)
    prefix = next(n for n, m in base.named_modules() if m is decoder)
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    escaped = re.escape(prefix)
    return escaped + r"\..*\.(" + "|".join(names) + ")"
