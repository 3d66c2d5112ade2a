"""Evaluation of vision-language models' outputs: CHAIR object hallucination (:mod:`.chair`)."""

from bpo_fast.eval.chair import (ChairResult, InputError, SynonymTable, compute_chair,
                                 load_captions, load_ground_truth, load_synonyms)

__all__ = ["ChairResult", "InputError", "SynonymTable", "compute_chair", "load_captions",
           "load_ground_truth", "load_synonyms"]
