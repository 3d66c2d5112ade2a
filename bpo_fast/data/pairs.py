"""Preference pairs, BPO style: the public names of the pair builder in one place.

The work lives in three modules, one job each:

- :mod:`bpo_fast.data.pair_builder`: the builder (config, orchestration, resume, summary),
- :mod:`bpo_fast.data.generation`: the generation engine (model loading, noised pixels,
  batched generation with per-row random streams, prompt building),
- :mod:`bpo_fast.data.pair_merge`: merging shards and pair files.

This module re-exports their public names (``from bpo_fast.data.pairs import build_pairs`` keeps
working).
"""

from bpo_fast.data.generation import (Generator, _count_generated, derive_seed,  # noqa: F401
                                      load_model, pixels_for_levels, render_prompt)
from bpo_fast.data.jsonl import JsonlWriter  # noqa: F401  (bench/pairs.py times its writes)
from bpo_fast.data.pair_builder import (BuildSummary, PairBuilderConfig, build_pairs,
                                        errors_path, parse_noise_steps, shard_path)
from bpo_fast.data.pair_merge import MergeSummary, find_shards, merge_pairs
from bpo_fast.runtime import dist_env

__all__ = ["PairBuilderConfig", "BuildSummary", "build_pairs", "merge_pairs", "MergeSummary",
           "find_shards", "shard_path", "errors_path",
           "load_model", "parse_noise_steps", "dist_env", "pixels_for_levels"]
