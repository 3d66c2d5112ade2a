"""DPO training of a vision-language model on preference pairs: ``train(TrainConfig(...))``.

One process or several (``torchrun --nproc_per_node N -m bpo_fast.cli train ...``): with more than
one, the decoder layers and the whole :class:`~bpo_fast.models.preference.PreferenceModel` are
sharded with FSDP2 (``fully_shard``), every rank reads its share of each global batch through a
:class:`ResumableDistributedSampler`, optimiser state is saved and loaded with
``torch.distributed.checkpoint`` (sharded), and metrics are averaged over ranks.

Checkpoints (``<output>/checkpoint-<step>/``, written to ``.tmp`` and renamed when complete):
``trainable.safetensors`` (the trained weights: LoRA adapters, or the full trainable parameters),
``optimizer/`` (DCP), ``scheduler.pt``, ``rng_<rank>.pt`` (torch/CUDA/python/numpy), and
``trainer_state.json`` (step, epoch, micro-batches consumed in that epoch, config), and
``manifest.json`` (size and sha256 of every file, written last). ``resume`` checks the manifest,
skips a damaged checkpoint (naming it) for the newest good one, and restores all of it, so the
following losses equal those of an uninterrupted run.

The final model goes to ``<output>`` with ``save_pretrained`` (plus the processor): full weights,
or the LoRA adapter (``PeftModel.from_pretrained(base, output)``); with ``merge_lora`` the merged
full weights go to ``<output>`` and the adapter to ``<output>/adapter``.
"""

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import re
import resource
import shutil
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist

from bpo_fast.errors import UserError, writing
from bpo_fast.runtime import adapt_threads, choose_num_workers, init_distributed, parse_dtype
from bpo_fast.train.config import RUN_SETTINGS, TrainConfig
from bpo_fast.train.samples import guard_pairs, note_bad_samples, train_bad_samples

logger = logging.getLogger("bpo_fast")

# loss: the optimised objective; dpo_loss: its DPO part (they differ by the RPO term); nll: the
# chosen answers' mean NLL per token (what the RPO term weighs); logratio_margin(_per_token):
# the implicit reward margin in nats, (policy - reference) log-prob of chosen minus rejected,
# summed over the answer's tokens / divided by its token count. With log_term_grads, the
# terms' gradients apart follow grad_norm (term_grads.TERM_KEYS).
METRIC_KEYS = ("step", "loss", "dpo_loss", "nll", "reward_chosen", "reward_rejected",
               "reward_margin", "reward_accuracy", "logratio_margin", "logratio_margin_per_token",
               "logps_chosen", "logps_rejected", "grad_norm", "lr", "tokens_per_s",
               "samples_per_s", "peak_mem_bytes", "epoch", "bad_samples")


class NonFiniteError(UserError):
    """A training step met a non-finite loss or gradient (``on_nonfinite="stop"``)."""


# --------------------------------------------------------------------------------------------
# data order
# --------------------------------------------------------------------------------------------

class ResumableDistributedSampler(torch.utils.data.Sampler):
    """A seeded per-epoch permutation, split over ranks like ``DistributedSampler`` (rank ``r``
    takes positions ``r, r + W, ...``, the tail dropped so every rank has the same count), that can
    start ``start`` samples into the epoch: resuming mid-epoch reads no skipped image."""

    def __init__(self, n, *, num_replicas=1, rank=0, seed=0, shuffle=True):
        self.n, self.num_replicas, self.rank = n, num_replicas, rank
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.start = 0, 0
        self.per_rank = n // num_replicas

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def indices(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        order = order[:self.per_rank * self.num_replicas]
        return order[self.rank::self.num_replicas]

    def __iter__(self):
        return iter(self.indices()[self.start:])

    def __len__(self):
        return self.per_rank - self.start


# --------------------------------------------------------------------------------------------
# distributed helpers
# --------------------------------------------------------------------------------------------

def _all_reduce(t, op="mean", world=1):
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        if op == "mean":
            t /= world
    return t


def _barrier(world):
    if world > 1:
        dist.barrier()


def _rng_state():
    s = {"torch": torch.get_rng_state(), "python": random.getstate(),
         "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def _set_rng_state(s):
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _peak_mem(device):
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    # CPU: the process's peak resident set (Linux reports KiB)
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# --------------------------------------------------------------------------------------------
# model setup
# --------------------------------------------------------------------------------------------

def _lora_config(config, model):
    from peft import LoraConfig

    from bpo_fast.models.preference import default_lora_targets

    targets = config.lora_target_modules
    if targets is None:
        targets = default_lora_targets(model)
    elif isinstance(targets, str) and re.fullmatch(r"\s*[\w.\-]+(\s*,\s*[\w.\-]+)*\s*,?\s*", targets):
        # plain module names ("q_proj" or "q_proj,v_proj"): a list, which peft matches by name
        # suffix; a lone name passed as a string would be a regex that must match the full path
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha or 2 * config.lora_r,
                      lora_dropout=config.lora_dropout, target_modules=targets, bias="none")


def build_preference_model(config, device, world):
    """Load policy (+ reference), set what trains, shard with FSDP2 when ``world > 1``."""
    from bpo_fast.models.preference import (PreferenceModel, load_vlm, prepare_policy, unwrap,
                                            _parts)

    dtype = parse_dtype(config.dtype, device)
    ref_dtype = parse_dtype(config.ref_dtype, device) if config.ref_dtype else dtype
    # Trainable weights are kept in fp32 (master copy) and compute runs under autocast. Single
    # process: frozen weights stay in the half dtype. FSDP2 wants one dtype per parameter group,
    # so sharded policies are fp32 throughout and cast to the half dtype for compute by FSDP.
    load_dtype = torch.float32 if world > 1 else dtype
    policy = load_vlm(config.model, dtype=load_dtype, attn_implementation=config.attn_implementation,
                      device=device, compute_dtype=dtype)
    lora = _lora_config(config, policy) if config.lora_r > 0 else None
    policy = prepare_policy(policy, lora=lora, freeze_vision=not config.train_vision,
                            train_projector=config.train_projector,
                            gradient_checkpointing=config.gradient_checkpointing)
    for p in policy.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    reference = None
    if config.reference == "model":
        # the same attention choice as the policy's (logged once) unless its dtype differs
        reference = load_vlm(config.ref_model or config.model, dtype=ref_dtype,
                             attn_implementation=config.attn_implementation, device=device,
                             log_attention=ref_dtype != dtype)
    pm = PreferenceModel(policy, reference, reference_mode=config.reference, beta=config.beta,
                         loss_type=config.loss_type, label_smoothing=config.label_smoothing,
                         packing=config.packing, rpo_alpha=config.rpo_alpha)
    n_train = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in unwrap(policy).parameters())
    logger.info("trainable parameters: %d of %d (%.2f%%)", n_train, n_all, 100.0 * n_train / n_all)
    if n_train == 0:
        raise ValueError("nothing to train: every parameter is frozen (set lora_r, or train the "
                         "language model with lora_r=0)")
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # an explicit mesh on the training device (FSDP's default mesh would pick CUDA whenever it
        # exists, also for a gloo run on CPU)
        mesh = init_device_mesh(device.type, (world,))
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) \
            if dtype != torch.float32 else MixedPrecisionPolicy()
        for model in (pm.policy, pm.reference):
            if model is None:
                continue
            for layer in getattr(_parts(model)[1], "layers", []):
                fully_shard(layer, mesh=mesh,
                            mp_policy=mp if model is pm.policy else MixedPrecisionPolicy())
        if pm.reference is not None:
            # used via explicit unshard()/reshard(), see PreferenceModel.reference_logps
            fully_shard(pm.reference, mesh=mesh)
        fully_shard(pm, mesh=mesh, mp_policy=mp)
    return pm, lora, dtype


def _optimizer(pm, config, device):
    decay, no_decay = [], []
    for _, p in pm.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    kwargs = dict(lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                  eps=config.adam_eps)
    if device.type in ("cuda", "cpu"):
        kwargs["fused"] = True  # one kernel over all parameters instead of ~10 ops each
    return torch.optim.AdamW(groups, **kwargs)


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet_single_process(world):
    """DCP warns that it assumes a single process when no process group exists; that is the
    intent here, so the warning is noise."""
    with warnings.catch_warnings():
        if world == 1:
            warnings.filterwarnings("ignore", message=".*single process.*")
        yield


def _checkpoints(output):
    if not os.path.isdir(output):
        return []
    out = []
    for name in os.listdir(output):
        if name.startswith("checkpoint-") and not name.endswith(".tmp"):
            try:
                out.append((int(name.split("-", 1)[1]), os.path.join(output, name)))
            except ValueError:
                continue
    return [p for _, p in sorted(out)]


def _unshared(sd):
    """Contiguous tensors, each with its own storage: tied weights (``tie_word_embeddings``: the
    LM head is the input embedding) are one tensor under two names, which safetensors refuses."""
    seen, out = set(), {}
    for k, v in sd.items():
        v = v.contiguous()
        key = (v.untyped_storage().data_ptr(), v.device.type) if v.numel() else None
        if key is not None and key in seen:
            v = v.clone()
        seen.add(key)
        out[k] = v
    return out


def save_checkpoint(path, pm, optimizer, scheduler, state, world, rank):
    """Write one checkpoint (collective when ``world > 1``); complete or absent, never torn."""
    tmp = path + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier(world)
    # a failed write (full disk, Ctrl-C) leaves the newest complete checkpoint and no .tmp
    with writing(tmp, cleanup=lambda: rank == 0 and shutil.rmtree(tmp, ignore_errors=True)):
        _write_checkpoint(tmp, path, pm, optimizer, scheduler, state, world, rank)


def _write_checkpoint(tmp, path, pm, optimizer, scheduler, state, world, rank):
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    msd = get_model_state_dict(pm, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
    if rank == 0:
        save_file(_unshared(msd), os.path.join(tmp, "trainable.safetensors"))
    osd = get_optimizer_state_dict(pm, optimizer)
    with _quiet_single_process(world):
        dcp.save({"optim": osd}, checkpoint_id=os.path.join(tmp, "optimizer"))
    torch.save(_rng_state(), os.path.join(tmp, f"rng_{rank}.pt"))
    if rank == 0:
        torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump(state, f, indent=1)
    _barrier(world)
    if rank == 0:
        write_manifest(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(os.path.abspath(path)))
    _barrier(world)


MANIFEST = "manifest.json"


def _sha256(path, block=1 << 22):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _checkpoint_files(path):
    out = []
    for dirpath, _, names in os.walk(path):
        for n in names:
            rel = os.path.relpath(os.path.join(dirpath, n), path)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def write_manifest(path):
    """``manifest.json`` in a checkpoint folder: every file's size and sha256 (each file
    fsynced first, so the manifest never describes bytes still in the page cache only)."""
    files = {}
    for rel in _checkpoint_files(path):
        full = os.path.join(path, rel)
        with open(full, "rb") as f:
            os.fsync(f.fileno())
        files[rel] = {"size": os.path.getsize(full), "sha256": _sha256(full)}
    from bpo_fast.data.jsonl import atomic_write_json

    atomic_write_json(os.path.join(path, MANIFEST), {"format": "bpo_fast.checkpoint.v1",
                                                     "files": files})


def verify_checkpoint(path):
    """``None`` when ``path`` is a complete checkpoint matching its manifest, else the reason."""
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        return f"no {MANIFEST} (incomplete, or written by an older bpo-fast)"
    try:
        with open(mpath) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{MANIFEST} is unreadable ({exc})"
    for rel, want in files.items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            return f"{rel} is missing"
        size = os.path.getsize(full)
        if size != want["size"]:
            return f"{rel} has {size} bytes, the manifest says {want['size']}"
        if _sha256(full) != want["sha256"]:
            return f"{rel} does not match its sha256"
    for need in ("trainer_state.json", "trainable.safetensors", "scheduler.pt"):
        if need not in files:
            return f"{need} is not in the manifest"
    return None


def load_checkpoint(path, pm, optimizer, scheduler, world, rank):
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_model_state_dict,
                                                         set_optimizer_state_dict)

    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    if state["world_size"] != world:
        raise ValueError(f"resume: {path} was written by {state['world_size']} process(es), this run "
                         f"has {world}; resume with the same number of processes")
    sd = load_file(os.path.join(path, "trainable.safetensors"))
    try:
        set_model_state_dict(pm, sd, options=StateDictOptions(full_state_dict=True, strict=False))
    except RuntimeError as exc:  # torch's load_state_dict: "size mismatch for NAME: ..."
        first = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), None)
        if first is None:
            raise
        raise UserError(f"resume: {path!r} holds weights of other shapes than this run's model "
                        f"({first.rstrip('.')}); it was written for another model or LoRA "
                        "rank") from None
    osd = get_optimizer_state_dict(pm, optimizer)
    holder = {"optim": osd}
    with _quiet_single_process(world):
        dcp.load(holder, checkpoint_id=os.path.join(path, "optimizer"))
    set_optimizer_state_dict(pm, optimizer, holder["optim"])
    scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), weights_only=False))
    _set_rng_state(torch.load(os.path.join(path, f"rng_{rank}.pt"), weights_only=False))
    return state


def _resolve_resume(config):
    """The checkpoint to resume from: the one named, or the newest that passes
    :func:`verify_checkpoint` (a damaged newer one is named and skipped)."""
    if config.resume in (None, False, ""):
        return None
    if config.resume is True or config.resume == "latest":
        found = _checkpoints(config.output)
        if not found:
            logger.warning("resume: no checkpoint under %s, starting from scratch", config.output)
            return None
        bad = []
        for path in reversed(found):
            reason = verify_checkpoint(path)
            if reason is None:
                if bad:
                    logger.warning("resume: falling back to %s (the newest good checkpoint)", path)
                return path
            logger.warning("resume: skipping damaged checkpoint %s: %s", path, reason)
            bad.append(f"{os.path.basename(path)} ({reason})")
        raise UserError(f"resume: no usable checkpoint under {config.output!r}: "
                        + "; ".join(bad) + " (--overwrite starts over)")
    if not os.path.isfile(os.path.join(config.resume, "trainer_state.json")) \
            and not os.path.isfile(os.path.join(config.resume, MANIFEST)):
        raise UserError(f"resume: {config.resume!r} is not a checkpoint directory")
    reason = verify_checkpoint(config.resume)
    if reason is not None:
        raise UserError(f"resume: checkpoint {config.resume!r} is damaged: {reason}")
    return config.resume


def save_final(pm, config, lora, dtype, world, rank):
    """The trained model under ``config.output``, loadable with ``from_pretrained``."""
    with writing(config.output):
        _save_final(pm, config, lora, dtype, world, rank)


def _save_final(pm, config, lora, dtype, world, rank):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from bpo_fast.models.preference import load_vlm, unwrap
    from bpo_fast.models.vlm import load_processor

    out = config.output
    adapter_dir = os.path.join(out, "adapter") if lora is not None and config.merge_lora else out
    if world > 1:
        # gather the full policy on rank 0, put it into a fresh CPU copy and save that
        sd = get_model_state_dict(pm, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))
        if rank == 0:
            sd = {k[len("policy."):]: v for k, v in sd.items() if k.startswith("policy.")}
            model = load_vlm(config.model, dtype=torch.float32, device="cpu")
            if lora is not None:
                from peft import get_peft_model

                model = get_peft_model(model, lora)
            missing, unexpected = model.load_state_dict(sd, strict=False)
            if unexpected:
                raise RuntimeError(f"final save: unexpected keys {unexpected[:5]}")
            policy = model
    else:
        policy = pm.policy
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        if lora is not None:
            policy.save_pretrained(adapter_dir)
        else:
            base = unwrap(policy)
            state = {k: (v.to(dtype) if v.is_floating_point() else v)
                     for k, v in base.state_dict().items()}
            base.save_pretrained(out, state_dict=state)
        if lora is not None and config.merge_lora:
            from peft import PeftModel

            base = load_vlm(config.model, dtype=dtype, device="cpu")
            merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
            merged.save_pretrained(out)
        load_processor(config.model).save_pretrained(out)
    _barrier(world)


# --------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------

def train(config):
    """Run DPO training as configured; returns ``{"output", "steps", "metrics_path", "history",
    "final_checkpoint", "skipped", "skipped_steps"}`` (``history``: the metric dicts written to
    ``metrics.jsonl``; ``skipped``: bad records; ``skipped_steps``: non-finite steps skipped).

    The pieces, in order: :func:`_check_run` (files only, before anything loads), :class:`_Run`
    (data, model, optimiser, schedule), :meth:`_Run.resume`, then :meth:`_Run.loop` over
    :meth:`_Run.micro_step`, :meth:`_Run.optimizer_step`, :meth:`_Run.log`,
    :meth:`_Run.evaluate_and_save`, and :meth:`_Run.finish` (the final model)."""
    if isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config: expected a TrainConfig, got {type(config).__name__}")
    ckpt, stale = _check_run(config)
    run = None
    with _guard(config, ckpt) as guard:
        _check_output_is_a_run(config.output)  # after the guard's overlap check names an input
        guard.status = lambda: _stopped_at(config, run)
        run = _Run(config, ckpt)
        run.resume(stale)
        run.loop()
        return run.finish()


def _guard(config, ckpt):
    """The command guard of a run (:class:`bpo_fast.errors.CommandGuard`): every path it reads
    against its output folder, which rank 0 locks."""
    from bpo_fast.errors import DIR, FILE, OWNED, ROOT, CommandGuard, lies_inside
    from bpo_fast.options import config_file_of
    from bpo_fast.runtime import dist_env
    from bpo_fast.train.eval import parse_eval_sets

    inputs = [("model", config.model, DIR), ("ref_model", config.ref_model, DIR),
              ("data", config.data, None), ("image_root", config.image_root, ROOT),
              ("eval_image_root", config.eval_image_root, ROOT),
              ("eval_chair_synonyms", config.eval_chair_synonyms, FILE),
              ("--config", config_file_of(config), FILE)]
    inputs += [("eval_data", path, None) for _, path in parse_eval_sets(config.eval_data)]
    if config.reference == "cached":
        inputs.append(("ref_cache", config.ref_cache, FILE))
    if config.chat_template and os.path.isfile(config.chat_template):
        inputs.append(("chat_template", config.chat_template, FILE))
    if ckpt is not None:  # a checkpoint of this output is its own; another run's is read only
        inputs.append(("resume", ckpt, OWNED if lies_inside(ckpt, config.output) else DIR))
    return CommandGuard("train", inputs=inputs, outputs=[("output", config.output, DIR)],
                        lock=dist_env()[0] == 0)


def _stopped_at(config, run):
    """Where an interrupted or failed run stopped, what it kept, how to resume (the one line of
    the guard)."""
    where = "before training started" if run is None or not hasattr(run, "metrics_path") \
        else f"after step {run.step} of {run.total}"
    found = _checkpoints(config.output)
    if found:
        return (where, f"the newest checkpoint, {os.path.basename(found[-1])}, is kept in "
                       f"{config.output!r}", "rerun with --resume to continue from it")
    return (where, "no checkpoint was written yet (--save-every N writes them)",
            "rerun the same command to start over")


def _check_output_is_a_run(output):
    """An existing ``output`` folder that holds files must be one a training run wrote (its
    ``train_config.json``, a checkpoint, or the run's errors file): a run writes its model,
    ``config.json`` and ``metrics.jsonl`` there, over whatever has those names, so a folder of
    someone else's files (another model, notes) is refused, ``--overwrite`` or not."""
    from bpo_fast.data.bad_samples import is_own_side_file

    if not os.path.isdir(output):
        return
    names = [n for n in os.listdir(output) if not n.startswith((".bpo-fast", ".bpo_fast"))]
    if not names or "train_config.json" in names or _checkpoints(output) \
            or is_own_side_file(os.path.join(output, "errors.jsonl")):
        return
    shown = ", ".join(sorted(names)[:4]) + (", ..." if len(names) > 4 else "")
    raise UserError(f"output: {output!r} holds files no training run wrote ({shown}); a run "
                    f"would write over them: choose a new or empty folder")


def _check_run(config):
    """What can be checked from the files alone, before the slow model load: the paths, an
    earlier run's checkpoints in the output, the checkpoint to resume from, the tracker.
    Returns ``(checkpoint to resume from or None, stale checkpoints of an earlier run)``."""
    config.check_paths()
    stale = _checkpoints(config.output) if config.resume in (None, False, "") else []
    if stale and not config.overwrite:
        raise ValueError(
            f"output: {config.output!r} holds checkpoints of an earlier run "
            f"({os.path.basename(stale[-1])}); pass resume (--resume) to continue it or "
            f"overwrite (--overwrite) to start over")
    ckpt = _resolve_resume(config)  # reads and verifies files only: before the slow model load
    from bpo_fast.train.tracking import check_tracker

    check_tracker(config.report_to)  # an optional library missing: say so before the model loads
    return ckpt, stale


class _Run:
    """One training run: the data, model, optimiser and schedule (built by ``__init__``), the
    loop's position (``step``, ``epoch``, ``micro_in_epoch``) and the pieces of the loop."""

    def __init__(self, config, ckpt=None):
        from transformers import get_cosine_schedule_with_warmup

        from bpo_fast.data.preference import PreferenceCollator
        from bpo_fast.models.preference import unwrap
        from bpo_fast.models.vlm import load_processor

        self.config, self.ckpt = config, ckpt
        world, rank, device = init_distributed(config.device)
        self.world, self.rank, self.device = world, rank, device
        self.num_workers = choose_num_workers(config.num_workers)
        random.seed(config.seed)
        np.random.seed(config.seed)
        torch.manual_seed(config.seed)  # same on every rank: LoRA init must agree across ranks

        from bpo_fast.data.hf_pairs import StreamingPairs, open_pairs

        if config.streaming:
            ds = StreamingPairs(config.data, config.image_root, seed=config.seed, rank=rank,
                                world=world)
        else:
            ds = open_pairs(config.data, config.image_root, strict=config.strict,
                            data_format=config.data_format)
        self.ds = ds
        steps_per_epoch, self.total, warmup = _schedule(config, ds, world)
        self.identity = _run_identity(config, ds, self.total, warmup)
        if ckpt is not None:  # before the slow model load
            _check_resume_settings(config, ckpt, self.identity)
        self.cache = None
        if config.reference == "cached":
            from bpo_fast.train.ref_cache import RefLogpsCache, check_compatible

            self.cache = RefLogpsCache.load(config.ref_cache)
            check_compatible(self.cache, path=config.ref_cache, max_length=config.max_length,
                             reference_model=config.ref_model or config.model, ids=ds.ids,
                             data=config.data, records=ds.records,
                             processor_kwargs=config.processor_kwargs)
        self.bad = bad = train_bad_samples(config, ds, resume=ckpt is not None, world=world,
                                           rank=rank)

        pm, self.lora, dtype = build_preference_model(config, device, world)
        self.pm, self.dtype = pm, dtype
        pm.train()  # the reference stays in eval mode (PreferenceModel.train)
        self.optimizer = _optimizer(pm, config, device)

        processor = load_processor(config.model)
        self.collate = collate = PreferenceCollator(
            processor, max_length=config.max_length,
            model_type=unwrap(pm.policy).config.model_type, chat_template=config.chat_template,
            processor_kwargs=config.processor_kwargs)
        collate.check_dataset(ds)  # pairs the family cannot take (PaliGemma: one image each)
        # the bad-sample policy, in the workers too
        self.guarded = guard_pairs(ds, collate, config.data)
        self.evaluator = self.best = None
        if config.eval_data:
            from bpo_fast.train.eval import BestTracker, Evaluator

            self.evaluator = Evaluator(
                config, collate=collate, processor=processor, model_type=collate.model_type,
                cache=self.cache, world=world, rank=rank, bad=bad, device=device,
                autocast=(torch.autocast(device.type, dtype=dtype)
                          if dtype != torch.float32 else None))
            if config.save_best:
                self.best = BestTracker(config.save_best, config.save_best_mode, config.output)
        if config.streaming:  # length unknown: an epoch ends when the stream does
            self.sampler = ds
        else:
            self.sampler = ResumableDistributedSampler(len(ds), num_replicas=world, rank=rank,
                                                       seed=config.seed)
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, warmup, self.total)
        self.use_micro = steps_per_epoch * config.grad_accum if steps_per_epoch else math.inf
        self.step, self.epoch, self.micro_in_epoch = 0, 0, 0

    # -- resume --------------------------------------------------------------------------------
    def resume(self, stale):
        """Restore the checkpoint (``self.ckpt``; None: a fresh run), prepare the output folder
        (a fresh run drops ``stale`` checkpoints), open the tracker and the progress bar."""
        from bpo_fast.train.tracking import make_tracker

        config, rank, ckpt = self.config, self.rank, self.ckpt
        st = None
        if ckpt is not None:
            st = load_checkpoint(ckpt, self.pm, self.optimizer, self.scheduler, self.world, rank)
            self.step, self.epoch, self.micro_in_epoch = (st["step"], st["epoch"],
                                                          st["micro_in_epoch"])
            logger.info("resumed from %s at step %d (epoch %d, micro-batch %d)", ckpt, self.step,
                        self.epoch, self.micro_in_epoch)

        self.metrics_path = _prepare_output(config, ckpt, stale, self.step, rank)
        if self.best is not None:
            # rank 0 also drops the best-N folders the restored state does not know
            self.best.load((st or {}).get("best"), remove_unknown=rank == 0)
        self.tracker = make_tracker(config, rank=rank,
                                    resumed_step=self.step if ckpt is not None else None)
        self.pairs_per_step = config.batch_size * config.grad_accum * self.world
        self.autocast = (torch.autocast(self.device.type, dtype=self.dtype)
                         if self.dtype != torch.float32 else contextlib.nullcontext())
        self.bar = None
        if config.progress and rank == 0:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=self.step, desc="dpo", unit="step",
                            dynamic_ncols=True)
        self.history, self.last_ckpt = [], None
        # keeps DataLoader off the global RNG
        self.loader_gen = torch.Generator().manual_seed(config.seed)
        self.acc = _Accumulator(self.device)
        self.step_ids, self.skipped_steps = [], 0
        self.skipped_in_row, self.skipped_ids = 0, []   # non-finite steps skipped in a row
        self.trainable = [p for p in self.pm.parameters() if p.requires_grad]
        self.terms = None
        if config.log_term_grads:
            if self.world > 1:
                raise UserError("--log-term-grads: runs in one process only (FSDP2 reduces "
                                "gradients in the backward hooks a second backward would rerun)")
            from bpo_fast.train.term_grads import TermGradients

            self.terms = TermGradients(self.trainable, rpo=bool(config.rpo_alpha))
        self.max_norm = config.max_grad_norm if config.max_grad_norm and config.max_grad_norm > 0 \
            else float("inf")   # inf: the norm is measured (and logged), nothing is clipped

    # -- the loop ------------------------------------------------------------------------------
    def loop(self):
        """Optimiser steps until ``total``: epochs of micro-batches, each step logged, evaluated
        and saved as configured."""
        config = self.config
        self.t0 = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        while self.step < self.total:
            if self.micro_in_epoch >= self.use_micro:
                self.epoch, self.micro_in_epoch = self.epoch + 1, 0
            self.sampler.set_epoch(self.epoch, start=self.micro_in_epoch * config.batch_size)
            loader = torch.utils.data.DataLoader(
                self.guarded, batch_size=config.batch_size,
                sampler=None if config.streaming else self.sampler,
                collate_fn=self.collate.batch, num_workers=self.num_workers, drop_last=True,
                generator=self.loader_gen,
                pin_memory=self.device.type == "cuda")
            micro_before = self.micro_in_epoch
            for batch in loader:
                if self.micro_in_epoch >= self.use_micro or self.step >= self.total:
                    break
                if not self.micro_step(batch):
                    continue
                rec = self.optimizer_step()
                if rec is None:  # non-finite: skipped
                    continue
                self.log(rec)
                self.evaluate_and_save()
                self.t0 = time.perf_counter()  # eval and checkpoint time is not the next step's
                if self.step >= self.total:
                    break
            if config.streaming and self.step < self.total:  # the stream ended: the next epoch
                if self.micro_in_epoch == micro_before == 0:
                    raise ValueError(f"data: the stream {config.data!r} gave no full batch of "
                                     f"{config.batch_size} pairs")
                self.epoch, self.micro_in_epoch = self.epoch + 1, 0

    # -- step ----------------------------------------------------------------------------------
    def micro_step(self, batch):
        """Forward and backward of one micro-batch; True when it completes an optimiser step."""
        config = self.config
        adapt_threads()  # follows the free CPUs when the caller chose threads that way
        note_bad_samples(self.bad, batch, config.data)
        self.micro_in_epoch += 1
        last_micro = self.micro_in_epoch % config.grad_accum == 0
        if self.world > 1:
            self.pm.set_requires_gradient_sync(last_micro)
        inputs = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()
                  if isinstance(v, torch.Tensor) and k != "index"}
        if self.cache is not None:
            inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = self.cache.lookup(
                batch["ids"], self.device, digests=batch["digests"])
        with self.autocast:
            out = self.pm(**inputs)
        if self.terms is not None:
            self.terms.add(out, 1.0 / config.grad_accum)
        (out.loss / config.grad_accum).backward()
        self.acc.add(out, inputs["attention_mask"])
        self.step_ids.extend(batch["ids"])
        return last_micro

    def optimizer_step(self):
        """Clip, check for non-finite values, step the optimiser and the schedule; returns the
        step's metrics record, or None when the step was skipped (``on_nonfinite="skip"``)."""
        config, world, device = self.config, self.world, self.device
        n_bad = self.bad.check(world)  # too many bad samples: exit 2, before this step's update
        # before clipping
        term_norms = self.terms.norms() if self.terms is not None else {}
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.max_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        if _nonfinite(self.acc, grad_norm, self.step_ids, self.step, config.on_nonfinite, world,
                      self.rank):
            self.optimizer.zero_grad(set_to_none=True)
            self.acc.reset()
            self.skipped_ids.extend(self.step_ids)
            self.step_ids = []
            self.skipped_steps += 1
            self.skipped_in_row += 1
            if self.skipped_in_row >= config.nonfinite_skip_limit:
                # every later step would be skipped too (the weights hold NaN): never a hang
                raise NonFiniteError(
                    f"{self.skipped_in_row} steps in a row after step {self.step} had a "
                    f"non-finite loss or gradient, record ids {_show_ids(self.skipped_ids)}; "
                    f"stopped (nonfinite_skip_limit {config.nonfinite_skip_limit}): the weights "
                    "or these records are broken; resume from a checkpoint with a lower "
                    "--learning-rate, or fix the records")
            self.t0 = time.perf_counter()
            return None
        self.step_ids = []
        self.skipped_in_row, self.skipped_ids = 0, []
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        elapsed = time.perf_counter() - self.t0
        m = self.acc.result(world)
        rec = {"step": self.step, **{k: m[k] for k in _Accumulator._KEYS},
               "grad_norm": float(grad_norm), **term_norms, "lr": lr,
               "tokens_per_s": m["tokens"] / max(elapsed, 1e-9),
               "samples_per_s": self.pairs_per_step / max(elapsed, 1e-9),
               "peak_mem_bytes": _peak_mem(device),
               "epoch": self.epoch + self.micro_in_epoch / self.use_micro, "bad_samples": n_bad}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        return rec

    def log(self, rec):
        """The step's metrics: ``metrics.jsonl`` (every ``log_every`` steps and the last), the
        tracker, the progress bar."""
        config, step = self.config, self.step
        if self.rank == 0 and (step % config.log_every == 0 or step == self.total):
            self.history.append(rec)
            with writing(self.metrics_path), open(self.metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            self.tracker.log({f"train/{k}": v for k, v in rec.items() if k != "step"}, step)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{rec['loss']:.4f}", acc=f"{rec['reward_accuracy']:.2f}",
                                 margin=f"{rec['reward_margin']:.3f}")

    # -- evaluate, save ------------------------------------------------------------------------
    def evaluate_and_save(self):
        """Evaluate and write a checkpoint when this step is due for either."""
        config, step = self.config, self.step
        do_eval = self.evaluator is not None and (
            (config.eval_every and step % config.eval_every == 0) or step == self.total)
        do_save = (config.save_every and step % config.save_every == 0) or step == self.total
        if do_eval or do_save:  # the checkpoint's state: built only when one may be written
            state = {"step": step, "epoch": self.epoch, "micro_in_epoch": self.micro_in_epoch,
                     "world_size": self.world, "total_steps": self.total,
                     "config": config.to_dict(), "run": self.identity}
            if self.best is not None:
                state["best"] = self.best.state()
        if do_eval:
            from bpo_fast.train.tracking import samples_markdown

            _evaluate(self.evaluator, self.best, self.pm, step, state, self.optimizer,
                      self.scheduler, config, self.metrics_path, self.history, self.tracker,
                      samples_markdown, self.world, self.rank, self.bar)
        if do_save:
            self.save(state)

    def save(self, state):
        """``checkpoint-<step>/`` (all ranks), then the ones past ``keep_checkpoints`` go."""
        config = self.config
        self.last_ckpt = os.path.join(config.output, f"checkpoint-{self.step}")
        save_checkpoint(self.last_ckpt, self.pm, self.optimizer, self.scheduler, state,
                        self.world, self.rank)
        if self.rank == 0 and config.keep_checkpoints:
            for old in _checkpoints(config.output)[:-config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)

    def finish(self):
        """Close the bar and tracker, write the final model; returns :func:`train`'s result."""
        if self.bar is not None:
            self.bar.close()
        self.tracker.close()
        self.bad.close()
        save_final(self.pm, self.config, self.lora, self.dtype, self.world, self.rank)
        best, bad = self.best, self.bad
        return {"output": self.config.output, "steps": self.step,
                "metrics_path": self.metrics_path, "history": self.history,
                "final_checkpoint": self.last_ckpt, "skipped": bad.count(),
                "bad_samples": bad.summary(), "errors_path": bad.path if bad.count() else None,
                "skipped_steps": self.skipped_steps,
                "best": best.state() if best is not None else None}


def _evaluate(evaluator, best, pm, step, state, optimizer, scheduler, config, metrics_path,
              history, tracker, samples_markdown, world, rank, bar):
    """One evaluation at ``step``: metrics line + tracker, samples, best checkpoint."""
    from bpo_fast.train.eval import append_samples

    metrics, samples = evaluator.run(pm, step)
    rec = {"step": step, **metrics}
    if rank == 0:
        history.append(rec)
        with writing(metrics_path), open(metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        tracker.log(metrics, step)
        if samples:
            append_samples(config.output, samples)
            for name in dict.fromkeys(x["set"] for x in samples):
                tracker.log_text(f"eval_{name}/samples",
                                 samples_markdown([x for x in samples if x["set"] == name]), step)
        shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                         if k.endswith(("/loss", "/reward_accuracy", "/chair_i")))
        (bar.write if bar is not None else logger.info)(f"step {step} eval: {shown}")
    if best is not None and best.improved(metrics):
        path = best.update(metrics, step)
        state["best"] = best.state()
        save_checkpoint(path, pm, optimizer, scheduler, state, world, rank)
        if rank == 0:
            for old in best.existing():
                if old != path:
                    shutil.rmtree(old, ignore_errors=True)


def _prepare_output(config, ckpt, stale, step, rank):
    """The output folder of a fresh or resumed run; returns the metrics.jsonl path."""
    os.makedirs(config.output, exist_ok=True)
    metrics_path = os.path.join(config.output, "metrics.jsonl")
    if rank == 0:
        if ckpt is None:
            # a fresh run (overwrite): an old checkpoint left here would be what --resume finds
            for path in stale:
                shutil.rmtree(path, ignore_errors=True)
            open(metrics_path, "w").close()
            _clear_eval_outputs(config.output)
        else:  # drop lines past the checkpoint (written by the interrupted run after it)
            _truncate_metrics(metrics_path, step)
            from bpo_fast.train.eval import SAMPLES_FILE

            samples = os.path.join(config.output, SAMPLES_FILE)
            if os.path.isfile(samples):  # the same rule for the eval samples (step <= N kept)
                _truncate_metrics(samples, step)
        with open(os.path.join(config.output, "train_config.json"), "w") as f:
            json.dump(config.to_dict(), f, indent=1, default=str)
    return metrics_path


def _clear_eval_outputs(output):
    """A fresh run: the samples file and best checkpoints of an earlier run go."""
    from bpo_fast.train.eval import SAMPLES_FILE

    if os.path.isfile(os.path.join(output, SAMPLES_FILE)):
        os.remove(os.path.join(output, SAMPLES_FILE))
    for name in os.listdir(output):
        if re.fullmatch(r"best-\d+", name):
            shutil.rmtree(os.path.join(output, name), ignore_errors=True)


def _nonfinite(acc, grad_norm, step_ids, step, mode, world, rank):
    """Whether this step met a non-finite loss or gradient (on any rank): ``mode="stop"``
    raises :class:`NonFiniteError` naming the batch's record ids, ``"skip"`` says so and returns
    True. The flags travel in the step's one reduction of the metrics
    (:meth:`_Accumulator.reduce`): one collective per step."""
    local = torch.stack([acc.nonfinite, (~torch.isfinite(grad_norm)).to(acc.nonfinite)])
    bad = acc.reduce(local, world)
    if not bool(bad.any()):
        return False
    what = " and ".join(n for n, b in zip(("loss", "gradient"), bad.tolist()) if b)
    where = (f"the batch of record id(s) {_show_ids(step_ids)}"
             if world == 1 or local[0] or not bad[0]
             else "another rank's batch")
    msg = f"step {step + 1}: non-finite {what} in {where}" + (f" (rank {rank})" if world > 1
                                                               else "")
    if mode == "stop":
        raise NonFiniteError(msg + "; stopped (--on-nonfinite skip skips such steps; a lower "
                             "--learning-rate or --max-grad-norm may help)")
    logger.warning("%s; step skipped (on_nonfinite=skip)", msg)
    return True


def _show_ids(ids, k=16):
    return f"{ids[:k]}" + (f" (+{len(ids) - k} more)" if len(ids) > k else "")


def _schedule(config, ds, world):
    """``(optimiser steps per epoch or None for a stream, total steps, warmup steps)``."""
    if config.streaming:  # length unknown: an epoch ends when the stream does
        steps_per_epoch = None
    else:  # each rank reads len(ds) // world pairs (ResumableDistributedSampler)
        steps_per_epoch = len(ds) // world // config.batch_size // config.grad_accum
        if steps_per_epoch == 0:
            raise ValueError(f"data: {len(ds)} usable pairs are fewer than one global batch "
                             f"(batch_size {config.batch_size} x grad_accum {config.grad_accum} "
                             f"x {world} process(es))")
    total = config.max_steps or config.epochs * steps_per_epoch
    warmup = config.warmup_steps if config.warmup_steps is not None \
        else int(math.ceil(config.warmup_ratio * total))
    return steps_per_epoch, total, warmup


def _run_identity(config, ds, total, warmup):
    """What the run reads and its schedule, as a resumed run must find them again: the model and
    reference paths (resolved), the data by content (pair count and a sha256 of every pair's id,
    prompt and answers: a moved file is the same data, an edited one is not; a stream: its
    path), the total and warmup steps (however they were given: --epochs, --max-steps, ...)."""
    def real(p):
        return os.path.realpath(p) if p else None

    data = {"path": real(config.data)}
    records = getattr(ds, "records", None)
    if records is not None:
        h = hashlib.sha256()
        for r in records:
            h.update(json.dumps([r["id"], r.get("prompt"), r.get("chosen"), r.get("rejected")],
                                default=str, sort_keys=True).encode())
        data = {"pairs": len(records), "sha256": h.hexdigest()}
    return {"model": real(config.model), "ref_model": real(config.ref_model),
            "ref_cache": real(config.ref_cache) if config.reference == "cached" else None,
            "data": data, "schedule": {"total_steps": total, "warmup_steps": warmup}}


def _check_resume_settings(config, ckpt, identity):
    """Refuse to resume ``ckpt`` with settings that change the run (:data:`RUN_SETTINGS`, the
    model and the data: :func:`_run_identity`), naming each difference, unless
    ``resume_with_changes`` (then each is logged)."""
    with open(os.path.join(ckpt, "trainer_state.json")) as f:
        state = json.load(f)
    saved = state.get("config") or {}
    now = json.loads(json.dumps(config.to_dict(), default=str))
    changes = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in RUN_SETTINGS
               if k in saved and saved[k] != now.get(k)]
    before = state.get("run")
    if before is None:  # a checkpoint of an older bpo-fast: the paths as given
        before = {k: (os.path.realpath(saved[k]) if k == "model" else
                      {"path": os.path.realpath(saved[k])})
                  for k in ("model", "data") if saved.get(k)}
    for k in ("model", "ref_model", "ref_cache"):
        if k in before and before[k] != identity[k]:
            changes.append(f"{k} {before[k]!r} -> {identity[k]!r}")
    was, now_s = before.get("schedule"), identity["schedule"]
    if was is None and "total_steps" in state:
        was = {"total_steps": state["total_steps"], "warmup_steps": now_s["warmup_steps"]}
    if was is not None and was != now_s:
        changes.append("schedule {total_steps} steps (warmup {warmup_steps})".format(**was)
                       + " -> {total_steps} steps (warmup {warmup_steps})".format(**now_s))
    a, b = before.get("data"), identity["data"]
    if a is None:
        changed = False
    elif "pairs" in a and "pairs" in b:
        changed = a != b
    else:  # a stream, or a checkpoint of an older bpo-fast: the data's path
        changed = a.get("path") != os.path.realpath(config.data)
    if changed:
        def show(d):
            return (f"{d['pairs']} pairs (sha256 {d['sha256'][:12]})" if "pairs" in d
                    else repr(d.get("path")))
        changes.append(f"data {show(a)} -> {show(b)}")
    if not changes:
        return
    if config.resume_with_changes:
        logger.warning("resume: continuing %s with changed settings (resume_with_changes): %s",
                       ckpt, "; ".join(changes))
        return
    raise UserError(f"resume: {ckpt!r} was written with other settings: {'; '.join(changes)}; "
                    "resume with the checkpoint's settings, or pass resume_with_changes "
                    "(--resume-with-changes) to continue with these")


def _truncate_metrics(path, step):
    if not os.path.isfile(path):
        open(path, "w").close()
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (json.JSONDecodeError, KeyError):
                break
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


class _Accumulator:
    """Per-step means over micro-batches (and ranks) of the logged quantities."""

    _KEYS = ("loss", "dpo_loss", "nll", "reward_chosen", "reward_rejected", "reward_margin",
             "reward_accuracy", "logratio_margin", "logratio_margin_per_token", "logps_chosen",
             "logps_rejected")

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self):
        self._reduced = None
        self.sums = torch.zeros(len(self._KEYS), dtype=torch.float64, device=self.device)
        self.nonfinite = torch.zeros((), dtype=torch.float64, device=self.device)
        self.n = 0
        self.tokens = torch.zeros((), dtype=torch.float64, device=self.device)

    def add(self, out, attention_mask):
        d = out.dpo
        pc, pr = out.policy_chosen_logps.detach().float(), out.policy_rejected_logps.detach().float()
        c, r = pc - out.ref_chosen_logps.float(), pr - out.ref_rejected_logps.float()
        n_c, n_r = out.chosen_tokens.float(), out.rejected_tokens.float()
        vals = torch.stack([out.loss.detach().float(), d.loss.detach().float(),
                            -pc.sum() / n_c.sum().clamp(min=1),    # as the RPO term's nll
                            d.chosen_rewards.detach().float().mean(),
                            d.rejected_rewards.detach().float().mean(),
                            d.reward_margins.detach().float().mean(),
                            torch.as_tensor(d.reward_accuracy).detach().float().mean(),
                            (c - r).mean(), (c / n_c.clamp(min=1) - r / n_r.clamp(min=1)).mean(),
                            pc.mean(), pr.mean()])
        self.nonfinite += (~torch.isfinite(vals[0])).to(self.nonfinite)
        self.sums += vals.to(self.sums)
        self.tokens += attention_mask.sum()
        self.n += 1

    def reduce(self, flags, world):
        """One all-reduce (sum) of the step's metric means, token count and ``flags`` (the
        non-finite loss / gradient flags) over ranks; returns the summed flags and keeps the
        rest for :meth:`result`."""
        local = torch.cat([self.sums / max(self.n, 1), self.tokens.view(1), flags.to(self.sums)])
        self._reduced = _all_reduce(local, "sum", world)
        return self._reduced[len(self._KEYS) + 1:]

    def result(self, world):
        """The step's metrics (means over micro-batches and ranks, tokens summed), from the
        reduction :meth:`reduce` did this step."""
        k = len(self._KEYS)
        vals = self._reduced.tolist()  # one copy to the host
        out = {name: v / world for name, v in zip(self._KEYS, vals[:k])}
        out["tokens"] = vals[k]
        self.reset()
        return out
