"""DPO training of vision-language models: ``train(TrainConfig(...))`` and ``bpo-fast train``.

    from bpo_fast.train import TrainConfig, train
    result = train(TrainConfig(model="path/to/llava", data="pairs.jsonl", image_root="images",
                               output="runs/bpo", lora_r=64, beta=0.1, max_steps=1000))

Per-step metrics go to ``<output>/metrics.jsonl`` (keys: ``METRIC_KEYS``).
"""

import importlib

_EXPORTS = {
    "TrainConfig": "bpo_fast.train.config",
    "parse_dtype": "bpo_fast.train.config",
    "train": "bpo_fast.train.trainer",
    "METRIC_KEYS": "bpo_fast.train.trainer",
    "ResumableDistributedSampler": "bpo_fast.train.trainer",
    "RefLogpsCache": "bpo_fast.train.ref_cache",
    "compute_reference_logps": "bpo_fast.train.ref_cache",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bpo_fast.train' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
