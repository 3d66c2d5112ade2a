"""Where ``train`` meets the bad-sample policy (:mod:`bpo_fast.data.bad_samples`): the run's errors
file, the guarded data set its DataLoader reads, and the notes each batch brings back.

The errors file is ``<output>/errors.jsonl`` (``errors.rank{r}.jsonl`` per rank under torchrun);
``--eval-data`` sets report to the same file, each under its own path. A resumed run appends to
it and keeps counting where the interrupted run stopped.
"""

import os

import torch

from bpo_fast.data.bad_samples import (BadSamples, GuardedPairs, GuardedStream,
                                       TooManyBadSamples)

__all__ = ["errors_path", "train_bad_samples", "guard_pairs", "note_bad_samples"]


def errors_path(output, world=1, rank=0):
    return os.path.join(output, "errors.jsonl" if world == 1 else f"errors.rank{rank}.jsonl")


def train_bad_samples(config, ds, *, resume, world=1, rank=0):
    """The policy of a run (its errors file claimed: an earlier run's is replaced, a resumed
    run's appended to), with ``ds``'s records skipped up front counted (on rank 0: every rank
    reads the whole file); too many of them stop the run here, before any model loads."""
    bad = BadSamples(errors_path(config.output, world, rank), "train",
                     max_fraction=config.max_bad_fraction, resume=resume, arg="output", rank=rank)
    if getattr(ds, "records", None) is not None:
        if rank == 0:
            bad.add_skipped(config.data, ds)
        else:
            bad.total(config.data, len(ds) + len(ds.skipped))
    bad.check(world)
    return bad


def guard_pairs(ds, collate, file, *, substitute=True):
    """``ds`` loaded and encoded (``collate.encode``) under the policy: a bad sample's place goes
    to the next good one (a stream goes on to its next sample)."""
    if isinstance(ds, torch.utils.data.IterableDataset):
        return GuardedStream(ds, collate.encode, file=file)
    return GuardedPairs(ds, collate.encode, file=file, substitute=substitute)


def note_bad_samples(bad, batch, file):
    """A batch's bad-sample notes into the errors file and the counts; a batch where no sample
    was usable (every sample of the data set bad) stops the run."""
    bad.note(batch.get("bad"))
    if batch.get("seen"):
        bad.seen(file, batch["seen"])
    if not batch["ids"]:
        raise TooManyBadSamples(f"train: no usable sample in {file}: every one is bad "
                                f"({bad.reasons(file)}); each is named in {bad.path}")
