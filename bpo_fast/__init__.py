"""bpo-fast: fast, memory-frugal Bootstrapped Preference Optimization for vision-language models.

Public API (imported lazily, so ``import bpo_fast`` stays cheap and does not pull in Triton or
transformers until an op that needs them is used):

- diffusion noising: :func:`diffusion_noise`, :class:`NoiseSchedule`, ``CLIP_MEAN``, ``CLIP_STD``
- log-probs and DPO from logits: :func:`token_logprobs`, :func:`sequence_logprobs`,
  :func:`dpo_loss`, :func:`fused_dpo_loss`, :class:`DPOOutput`, :class:`DPOLoss`
- fused LM head: :func:`linear_token_logprobs`, :func:`linear_sequence_logprobs`,
  :func:`preference_loss`, :class:`PreferenceLoss` (the loss training runs: any loss type of
  ``LOSS_TYPES`` + RPO), :func:`fused_linear_dpo_loss`, :class:`LinearDPOLoss`
- models: :class:`PreferenceModel`
- build: :func:`extension_info`
"""

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "extension_info": "bpo_fast._ext",
    "diffusion_noise": "bpo_fast.ops.noise",
    "diffusion_noise_reference": "bpo_fast.ops.noise",
    "NoiseSchedule": "bpo_fast.ops.noise",
    "CLIP_MEAN": "bpo_fast.ops.noise",
    "CLIP_STD": "bpo_fast.ops.noise",
    "token_logprobs": "bpo_fast.ops.logprobs",
    "sequence_logprobs": "bpo_fast.ops.logprobs",
    "dpo_loss": "bpo_fast.ops.dpo",
    "fused_dpo_loss": "bpo_fast.ops.dpo",
    "DPOOutput": "bpo_fast.ops.dpo",
    "DPOLoss": "bpo_fast.ops.dpo",
    "LOSS_TYPES": "bpo_fast.ops.losses",
    "preference_loss": "bpo_fast.ops.preference",
    "PreferenceLoss": "bpo_fast.ops.preference",
    "PreferenceLossOutput": "bpo_fast.ops.preference",
    "linear_token_logprobs": "bpo_fast.ops.linear",
    "linear_sequence_logprobs": "bpo_fast.ops.linear",
    "fused_linear_dpo_loss": "bpo_fast.ops.linear",
    "LinearDPOLoss": "bpo_fast.ops.linear",
    "PreferenceModel": "bpo_fast.models.preference",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bpo_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
