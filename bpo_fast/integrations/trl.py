"""TRL 1.16's ``DPOTrainer`` running bpo-fast's step: change one import, keep the rest.

    from trl import DPOConfig
    from bpo_fast.integrations.trl import DPOTrainer     # was: from trl import DPOTrainer

    trainer = DPOTrainer(model=model, args=DPOConfig(...), train_dataset=dataset,
                         processing_class=processor, peft_config=lora)   # as before
    trainer.train()

Everything but the step is TRL's own: ``DPOConfig``, the dataset formats and their
preparation, the vision collator's tokens, ``peft_config``, the reference model (a ``ref_model``,
TRL's copy of the policy, or the LoRA base with adapters disabled), callbacks, ``report_to``,
evaluation, ``accelerate launch`` (DDP), checkpoints and ``resume_from_checkpoint``. A trainer
class of your own built on TRL's takes the step with :func:`bpo_fast_trainer`
(``MyTrainer = bpo_fast_trainer(MyDPOTrainer)``).

The step (:meth:`BPOFastMixin._compute_loss`, run inside the model's forward so that DDP's
hooks see it) is :class:`bpo_fast.models.preference.PreferenceModel`'s: each pair's images go
through the vision tower once (TRL's collator is handed a processor that processes each pair's
images once and repeats the text rows: the tokens are TRL's), the family's base model gives the
hidden states, and :func:`bpo_fast.ops.preference.preference_loss` computes the log-probs of the
scored tokens only and the loss with 3 LM-head GEMMs per scored token, no logits. TRL's
``loss_type`` / ``loss_weights`` map onto the loss registry (:mod:`bpo_fast.ops.losses`): one
preference type, plus ``"sft"`` as ``rpo_alpha`` (weight ratio), the whole scaled by the
preference type's weight; ``ipo`` / ``sigmoid_norm`` count tokens as TRL does
(``length_count="completion"``). Rows are packed where the family and the attention allow it
(``PreferenceModel(packing="auto")``).

Refused when the trainer is built, naming the setting (bpo-fast would compute something else):
two preference loss types at once (MPO-style mixes), ``aot`` / ``aot_unpaired``,
``f_divergence_type`` other than ``reverse_kl``, ``ld_alpha``, ``use_weighting``, a MoE
auxiliary loss, a ``PeftModel`` with its own adapter and no ``ref_model`` (TRL's reference is then
a copy of that adapter), a custom ``data_collator`` on a vision dataset, PaliGemma (TRL 1.16's
vision collator cannot build its batches) and models outside :mod:`bpo_fast.models.vlm`. TRL's
per-token statistics (``entropy``, ``logits/*``, ``mean_token_accuracy``) are not computed (they
cost TRL a pass over every logit tile); the other metrics are TRL's, under TRL's names.

``precompute_ref_log_probs=True`` works for vision datasets too (TRL 1.16 refuses it there): the
reference log-probs of every pair are computed once, through the same model layer and TRL's
collator, into bpo-fast's reference cache (:class:`bpo_fast.train.ref_cache.RefLogpsCache`, the
``bpo-fast ref-logps`` file format) at ``<output_dir>/ref_logps.<split>.<key>.safetensors``. The
pairs are keyed by content (a hash of each record's values, images as their stored bytes) and the
key binds the reference's weights (TRL's ``hash_module``), the tokenisation and ``max_length``: a
rerun or ``resume_from_checkpoint`` reads the file back (checksum and settings checked), another
data set, model or setting gets its own file. Then no reference model is held or run during
training.
"""

import contextlib
import functools
import hashlib
import inspect
import json
import logging
import os
import warnings

import torch

from bpo_fast.ops.losses import (REGISTRY, TRL_NOT_SUPPORTED, TRL_VERSION, check_rpo_alpha,
                                 loss_config)

logger = logging.getLogger("bpo_fast")

__all__ = ["DPOTrainer", "DPOConfig", "BPOFastMixin", "bpo_fast_trainer", "step_settings",
           "TRL_SERIES"]

TRL_SERIES = TRL_VERSION.rsplit(".", 1)[0]  # the TRL minor series whose internals this follows
REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")
# batch keys that are not model inputs (TRL 1.16's _compute_loss: the same set)
_NOT_MODEL_INPUTS = ("completion_mask",) + REF_KEYS
# keyword arguments peft / TRL may add to a forward call that our step does not read
_FORWARD_NOISE = ("use_cache", "return_dict", "output_attentions", "output_hidden_states",
                  "num_items_in_batch", "inputs_embeds")
CACHE_TOKENS = f"trl {TRL_SERIES} DPOTrainer collator"  # what tokenised the cached pairs


def _require_trl():
    try:
        import trl
    except ImportError as exc:
        raise ImportError(f"bpo_fast.integrations.trl needs trl {TRL_SERIES}.x (pip install "
                          f"trl=={TRL_VERSION})") from exc
    if not trl.__version__.startswith(TRL_SERIES + "."):
        raise ImportError(f"bpo_fast.integrations.trl needs trl {TRL_SERIES}.x (it replaces "
                          "DPOTrainer._compute_loss, whose contract changes between releases); "
                          f"installed: trl {trl.__version__}")
    return trl


_trl = _require_trl()
DPOConfig = _trl.DPOConfig


# ----------------------------------------------------------------------------------------------
# settings: TRL's DPOConfig -> the loss registry, or an error naming the setting
# ----------------------------------------------------------------------------------------------

def step_settings(args):
    """``(PreferenceModel loss kwargs, scale)`` for a ``DPOConfig``: the step's loss is ``scale *
    (preference loss + rpo_alpha * nll)``, which is TRL 1.16's ``sum(w_i * loss_i)`` for one
    preference type plus ``"sft"``. Raises ``ValueError`` naming the setting bpo-fast cannot
    compute exactly."""
    types = list(args.loss_type)
    weights = [float(w) for w in (args.loss_weights or [1.0] * len(types))]
    by_trl = {s.trl: s for s in REGISTRY.values() if s.trl}
    pref = [(t, w) for t, w in zip(types, weights) if t != "sft"]
    for t, _ in pref:
        if t in TRL_NOT_SUPPORTED:
            raise ValueError(f"loss_type: {t!r} is not supported by bpo-fast's step "
                             f"({TRL_NOT_SUPPORTED[t]})")
        if t not in by_trl:
            raise ValueError(f"loss_type: {t!r} is not a TRL {TRL_SERIES} loss type bpo-fast "
                             f"computes (supported: {sorted(by_trl)} and 'sft')")
    if len(pref) != 1:
        raise ValueError(f"loss_type: bpo-fast's step takes one preference loss type, optionally "
                         f"with 'sft' (the RPO term); got {types}")
    t, w = pref[0]
    if not w > 0:
        raise ValueError(f"loss_weights: the weight of {t!r} must be > 0 (the 'sft' weight is "
                         f"taken relative to it), got {w}")
    rpo = sum(x for name, x in zip(types, weights) if name == "sft") / w
    for name, value, default in (("f_divergence_type", args.f_divergence_type, "reverse_kl"),
                                 ("ld_alpha", args.ld_alpha, None),
                                 ("use_weighting", args.use_weighting, False)):
        if value != default:
            raise ValueError(f"{name}: bpo-fast's step supports only {name}={default!r} (the "
                             f"loss registry has no such term), got {value!r}")
    if args.sync_ref_model and args.precompute_ref_log_probs:
        raise ValueError("sync_ref_model: cannot be combined with precompute_ref_log_probs=True "
                         "(the precomputed reference would go stale)")
    spec = by_trl[t]
    kw = {"loss_type": spec.name, "beta": args.beta, "rpo_alpha": rpo or None,
          "length_count": "completion"}
    if "label_smoothing" in spec.params:
        kw["label_smoothing"] = args.label_smoothing
    elif args.label_smoothing:
        logger.warning("label_smoothing=%s is not read by loss_type %r (TRL %s ignores it too)",
                       args.label_smoothing, t, TRL_SERIES)
    if "discopop_tau" in spec.params:
        kw["discopop_tau"] = args.discopop_tau
    # the registry's ranges, checked now (before any model is loaded)
    loss_config(spec.name, args.beta, kw.get("label_smoothing", 0.0), kw.get("discopop_tau", 0.05))
    check_rpo_alpha(rpo)
    return kw, w


# ----------------------------------------------------------------------------------------------
# data: TRL's collator, each pair's images processed once; reference log-probs carried along
# ----------------------------------------------------------------------------------------------

class ImagesOncePerPair:
    """A processor as TRL's ``DataCollatorForVisionPreference`` sees it. That collator asks for
    the prompts of the ``[chosen; rejected]`` rows, i.e. each pair's prompt and images twice;
    this processes each pair's images once and repeats the text rows, so the tokens are exactly
    TRL's and the batch holds each pair's image inputs once (what
    :class:`~bpo_fast.models.preference.PreferenceModel` takes). Any other call goes to the
    processor unchanged."""

    def __init__(self, processor):
        self.processor = processor

    def __getattr__(self, name):
        if name == "processor":  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.processor, name)

    def __call__(self, *args, images=None, text=None, **kwargs):
        from bpo_fast.models.vlm import TEXT_KEYS

        n = len(text) // 2 if isinstance(text, list) else 0
        twice = (not args and images is not None and n and len(text) == 2 * n
                 and len(images) == 2 * n and text[:n] == text[n:]
                 and all(a is b for a, b in zip(images[:n], images[n:])))
        if not twice:
            return self.processor(*args, images=images, text=text, **kwargs)
        out = self.processor(images=images[:n], text=text[:n], **kwargs)
        for key in TEXT_KEYS:
            if key in out:
                out[key] = torch.cat([out[key], out[key]])
        return out


class RefColumnsCollator:
    """``collator`` with the dataset's ``ref_chosen_logps`` / ``ref_rejected_logps`` columns
    (the precomputed reference) taken off the records and added to the batch as float32
    ``[B]`` tensors (TRL's vision collator drops extra keys)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples):
        refs = None
        if examples and REF_KEYS[0] in examples[0]:
            refs = {k: torch.tensor([float(e.pop(k)) for e in examples], dtype=torch.float32)
                    for k in REF_KEYS}
        batch = self.collator(examples)
        if refs is not None:
            batch.update(refs)
        return batch


def _hash_value(h, v):
    """Feed ``v`` (a record value as Arrow gives it: str, bytes, numbers, lists, dicts) to
    ``h`` unambiguously (type and length prefixed)."""
    if isinstance(v, bytes):
        h.update(b"b%d:" % len(v))
        h.update(v)
    elif isinstance(v, str):
        e = v.encode()
        h.update(b"s%d:" % len(e))
        h.update(e)
    elif isinstance(v, dict):
        h.update(b"{%d" % len(v))
        for k in sorted(v):
            _hash_value(h, k)
            _hash_value(h, v[k])
    elif isinstance(v, (list, tuple)):
        h.update(b"[%d" % len(v))
        for x in v:
            _hash_value(h, x)
    else:  # None, bool, int, float
        h.update(b"v" + repr(v).encode() + b";")


def content_ids(dataset, columns, chunk=256):
    """One id per row of a ``datasets.Dataset``: ``row<i>-<sha256 of the row's values in
    columns>`` (images as their stored bytes, read from Arrow without decoding; an image stored
    as a path only is its path). A cache keyed by these ids answers only for the same records
    in the same order."""
    table = dataset.with_format("arrow")
    cols = [c for c in columns if c in dataset.column_names]
    ids = []
    for start in range(0, len(dataset), chunk):
        for rec in table[start:start + chunk].select(cols).to_pylist():
            h = hashlib.sha256()
            _hash_value(h, rec)
            ids.append(f"row{len(ids)}-{h.hexdigest()[:24]}")
    return ids


# ----------------------------------------------------------------------------------------------
# the trainer
# ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _skip_reference_load(trainer):
    """TRL loads a second copy of the policy as the reference when there is no ``ref_model``
    and precomputation is off. With precomputation on (which TRL's own check refuses for vision
    data, so it is switched off while TRL's ``__init__`` runs) the reference is the policy
    before training: the load is skipped. The policy's own load (``model`` given as a path)
    happens before ``Trainer.__init__`` has set ``accelerator`` and goes through."""
    import trl.trainer.dpo_trainer as mod

    load = mod.create_model_from_path

    @functools.wraps(load)
    def create_model_from_path(*args, **kwargs):
        if "accelerator" in vars(trainer):
            return None
        return load(*args, **kwargs)

    mod.create_model_from_path = create_model_from_path
    try:
        yield
    finally:
        mod.create_model_from_path = load


def _argument(bound, name):
    return bound.arguments.get(name, bound.signature.parameters[name].default)


class BPOFastMixin:
    """Put before a TRL 1.16 ``DPOTrainer`` (sub)class: its step becomes bpo-fast's (see the
    module doc). Construction takes TRL's arguments unchanged."""

    def __init__(self, *args, **kwargs):
        from trl import DPOTrainer as _TRLDPOTrainer

        bound = inspect.signature(_TRLDPOTrainer.__init__).bind(self, *args, **kwargs)
        config = _argument(bound, "args")
        ref_model = _argument(bound, "ref_model")
        # the settings checked before any model is loaded (TRL's default args: after)
        settings = step_settings(config) if config is not None else None
        precompute = bool(config is not None and config.precompute_ref_log_probs)
        if precompute:  # ours: TRL's own refuses vision datasets
            config.precompute_ref_log_probs = False
        try:
            ctx = _skip_reference_load(self) if precompute and ref_model is None \
                else contextlib.nullcontext()
            with ctx:
                super().__init__(*args, **kwargs)
        finally:
            if precompute:
                config.precompute_ref_log_probs = True
        self._bpo_setup(bound, precompute, settings or step_settings(self.args))

    # ---- construction -----------------------------------------------------------------------

    def _bpo_setup(self, bound, precompute, settings):
        from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

        from bpo_fast.models.preference import PreferenceModel, check_vlm_api, is_peft_model
        from bpo_fast.models.vlm import get_adapter

        kw, self._bpo_scale = settings
        try:
            check_vlm_api(self.model)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"model: bpo_fast.integrations.trl runs vision-language models of "
                             f"the families bpo_fast.models.vlm supports ({exc}); use "
                             "trl.DPOTrainer for this model") from exc
        if get_adapter(self.model).name == "paligemma" and self._is_vision_dataset:
            raise ValueError(f"model: PaliGemma is not supported: TRL {TRL_SERIES}'s vision "
                             "collator cannot build its batches (its processor wants images with "
                             "every text); train it with `bpo-fast train`")
        if self.aux_loss_enabled:
            raise ValueError("router_aux_loss_coef: bpo-fast's step has no MoE auxiliary loss; "
                             "set router_aux_loss_coef=0.0")
        if is_peft_model(self.model) and self.ref_model is None and "ref" in self.model.peft_config:
            raise ValueError("model: a PeftModel with its own adapter: TRL's reference is then a "
                             "copy of that adapter ('ref'), which bpo-fast's step does not run; "
                             "pass the base model with peft_config (the reference is the base "
                             "model) or a ref_model")
        if _argument(bound, "data_collator") is not None:
            if self._is_vision_dataset:
                raise ValueError("data_collator: bpo-fast's step takes each pair's images once, "
                                 "from TRL's own vision collator; leave data_collator unset")
        else:
            if self._is_vision_dataset:
                self.data_collator = DataCollatorForVisionPreference(
                    processor=ImagesOncePerPair(self.processing_class),
                    max_length=self.args.max_length,
                    pad_to_multiple_of=self.args.pad_to_multiple_of)
            self.data_collator = RefColumnsCollator(self.data_collator)
        if precompute:
            mode = "cached"
        else:
            mode = "model" if self.ref_model is not None else "lora"
        self._bpo_model = PreferenceModel(
            self.model, self.ref_model if mode == "model" else None, reference_mode=mode, **kw)
        self._bpo_install_step()
        self.precompute_ref_logps = precompute
        if precompute:
            from trl.trainer.utils import hash_module

            # TRL's fingerprint of the reference for its own cache, taken before any step
            self._precompute_model_hash = hash_module(self.ref_model or self.model)
            bs = self.args.precompute_ref_batch_size
            self.train_dataset = self._precompute_ref_logps(
                self.train_dataset, "train", bs or self.args.per_device_train_batch_size)
            if self.eval_dataset is not None:
                bs = bs or self.args.per_device_eval_batch_size
                if isinstance(self.eval_dataset, dict):
                    self.eval_dataset = {n: self._precompute_ref_logps(d, n, bs)
                                         for n, d in self.eval_dataset.items()}
                else:
                    self.eval_dataset = self._precompute_ref_logps(self.eval_dataset, "eval", bs)

    def _bpo_install_step(self):
        """Route ``model(..., bpo_fast_step=True)`` to the step, inside the model's own forward
        (as TRL's fused LM head is): whatever wraps the model (DDP, peft) sees a forward."""
        from bpo_fast.models.preference import unwrap

        hf = unwrap(self.model)
        inner = hf.forward
        step = self._bpo_forward

        @functools.wraps(inner)
        def forward(*args, bpo_fast_step=False, **kwargs):
            if not bpo_fast_step:
                return inner(*args, **kwargs)
            return step(*args, **kwargs)

        hf.forward = forward

    def _bpo_forward(self, input_ids, attention_mask, labels, pixel_values=None,
                     ref_chosen_logps=None, ref_rejected_logps=None, **kwargs):
        pm = self._bpo_model
        kwargs = {k: v for k, v in kwargs.items() if v is not None and k not in _FORWARD_NOISE}
        rows = {k: kwargs.pop(k) for k in ("token_type_ids", "mm_token_type_ids") if k in kwargs}
        if rows:  # the family's adapter builds these from input_ids: they must be the batch's
            ours = pm.adapter.row_kwargs(pm.policy, input_ids, attention_mask, labels, kwargs)
            for key, given in rows.items():
                if key not in ours or not torch.equal(ours[key].to(given.dtype), given):
                    raise ValueError(f"{key}: the batch's differ from what bpo-fast's "
                                     f"{pm.adapter.name} adapter builds from input_ids; the "
                                     "step would not compute TRL's forward")
        out = pm(input_ids, attention_mask, labels, pixel_values, ref_chosen_logps=ref_chosen_logps,
                 ref_rejected_logps=ref_rejected_logps, **kwargs)
        return {"loss": out.loss, "chosen_logps": out.policy_chosen_logps.detach(),
                "rejected_logps": out.policy_rejected_logps.detach(),
                "ref_chosen_logps": out.ref_chosen_logps, "ref_rejected_logps": out.ref_rejected_logps}

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(self._signature_columns) + [
            k for k in REF_KEYS if k not in self._signature_columns]

    # ---- the step ---------------------------------------------------------------------------

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NOT_MODEL_INPUTS}
        ref = {}
        if self.precompute_ref_logps:
            if REF_KEYS[0] not in inputs:
                raise ValueError("precompute_ref_log_probs: this batch has no precomputed "
                                 "reference log-probs (a dataset that did not go through the "
                                 "trainer's precomputation)")
            ref = {k: inputs[k] for k in REF_KEYS}
        out = model(**model_kwargs, labels=labels, bpo_fast_step=True, **ref)
        loss = out["loss"] if self._bpo_scale == 1.0 else out["loss"] * self._bpo_scale
        self._bpo_metrics(mode, inputs, out)
        if return_outputs:
            warnings.warn("`return_outputs=True` (compute_metrics) recomputes the logits with an "
                          "extra forward pass, as TRL does", FutureWarning, stacklevel=2)
            with torch.no_grad():
                return loss, model(**model_kwargs, use_cache=False)
        return loss

    def _bpo_metrics(self, mode, inputs, out):
        """TRL 1.16's metrics that the step computes, under TRL's names, gathered as TRL does."""
        acc, m = self.accelerator, self._metrics[mode]
        if mode == "train":
            n = acc.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += n // self._tp_size
        m["num_tokens"] = [self._total_train_tokens]
        chosen = self.beta * (out["chosen_logps"] - out["ref_chosen_logps"])
        rejected = self.beta * (out["rejected_logps"] - out["ref_rejected_logps"])
        m["rewards/chosen"].append(acc.gather(chosen).mean().item())
        m["rewards/rejected"].append(acc.gather(rejected).mean().item())
        m["rewards/accuracies"].append(acc.gather((chosen > rejected).float()).mean().item())
        m["rewards/margins"].append(acc.gather(chosen - rejected).mean().item())
        m["logps/chosen"].append(acc.gather(out["chosen_logps"]).mean().item())
        m["logps/rejected"].append(acc.gather(out["rejected_logps"]).mean().item())

    # ---- the reference cache ----------------------------------------------------------------

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        # TRL precomputes a dataset passed here for text data only; vision data too here
        if (self.precompute_ref_logps and self._is_vision_dataset and eval_dataset is not None
                and not isinstance(eval_dataset, str)):
            bs = self.args.precompute_ref_batch_size or self.args.per_device_eval_batch_size
            if isinstance(eval_dataset, dict):
                eval_dataset = {n: self._precompute_ref_logps(d, n, bs)
                                for n, d in eval_dataset.items()}
            else:
                eval_dataset = self._precompute_ref_logps(eval_dataset, "eval", bs)
        return super().evaluate(eval_dataset=eval_dataset, ignore_keys=ignore_keys,
                                metric_key_prefix=metric_key_prefix)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        """``dataset`` with ``ref_chosen_logps`` / ``ref_rejected_logps`` columns from the
        reference cache file of its pairs (computed first when there is none). TRL calls this
        for every split it precomputes, this class for vision data too."""
        from datasets import IterableDataset

        from bpo_fast.models.preference import is_peft_model
        from bpo_fast.train.ref_cache import RefLogpsCache

        if isinstance(dataset, IterableDataset):
            raise ValueError(f"precompute_ref_log_probs: not supported for the IterableDataset "
                             f"{name!r} (its pairs cannot be enumerated up front); use a "
                             "map-style Dataset or precompute_ref_log_probs=False")
        if self.ref_model is None and not is_peft_model(self.model) and self.state.global_step:
            raise ValueError(f"precompute_ref_log_probs: cannot compute the reference of "
                             f"{name!r} after training started (full fine-tuning without a "
                             "ref_model: the reference was the policy before the first step); "
                             "pass it as eval_dataset when building the trainer, or a ref_model")
        dataset = dataset.remove_columns([k for k in REF_KEYS if k in dataset.column_names])
        self._set_signature_columns_if_needed()
        ids = content_ids(dataset, [c for c in self._signature_columns if c not in REF_KEYS])
        unwrapped = self.ref_model or self.model
        meta = {"tokens": CACHE_TOKENS, "vision": self._is_vision_dataset,
                "model_fingerprint": self._precompute_model_hash, "max_length": self.args.max_length,
                "temperature": 1.0, "model": getattr(unwrapped.config, "_name_or_path", "") or "",
                "data": name}
        key = hashlib.sha256(json.dumps([meta, ids]).encode()).hexdigest()
        path = os.path.join(self.args.output_dir, f"ref_logps.{name}.{key[:16]}.safetensors")
        if not os.path.isfile(path):
            chosen, rejected = self._reference_logps_over(dataset, name, batch_size)
            if self.accelerator.is_main_process:
                RefLogpsCache(ids, chosen, rejected, metadata={**meta, "key": key}).save(path)
            self.accelerator.wait_for_everyone()
        cache = RefLogpsCache.load(path)
        if cache.metadata.get("key") != key:
            raise ValueError(f"ref_cache: {path!r} was written for other pairs or settings "
                             "(its key differs); delete it to recompute")
        # the key binds the reference (TRL's model hash), tokens, max_length and every pair's
        # content: a file that matches it was computed for exactly this split and reference
        chosen, rejected = cache.lookup(ids)
        fp = hashlib.sha256(f"{dataset._fingerprint}{key}".encode()).hexdigest()[:32]
        dataset = dataset.add_column(REF_KEYS[0], chosen.tolist(), new_fingerprint=fp + "c")
        return dataset.add_column(REF_KEYS[1], rejected.tolist(), new_fingerprint=fp + "r")

    def _reference_logps_over(self, dataset, name, batch_size):
        """The reference's (chosen, rejected) log-probs ``[N]`` of every pair of ``dataset``, in
        order, through the step's model layer and collator; the ranks share the pairs."""
        from torch.utils.data import DataLoader

        from bpo_fast.models.preference import PreferenceModel, is_peft_model

        if self.ref_model is not None:
            pm = PreferenceModel(self.model, self.ref_model, reference_mode="model")
        elif is_peft_model(self.model):
            pm = PreferenceModel(self.model, reference_mode="lora")
        else:  # the policy before its first step
            pm = PreferenceModel(self.model, reference_mode="cached")
        loader = self.accelerator.prepare(DataLoader(
            dataset, batch_size=batch_size, collate_fn=self.data_collator, shuffle=False,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory))
        chosen, rejected = [], []
        was_training = self.model.training
        self.model.eval()
        try:
            from tqdm.auto import tqdm

            with torch.no_grad():
                for batch in tqdm(loader, desc=f"bpo-fast: reference log-probs of {name}",
                                  disable=not self.accelerator.is_local_main_process):
                    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
                    images = {k: v for k, v in batch.items() if k not in (
                        "input_ids", "attention_mask", "completion_mask", "pixel_values",
                        "token_type_ids", "mm_token_type_ids", *REF_KEYS)}
                    args = (batch["input_ids"], batch["attention_mask"], labels,
                            batch.get("pixel_values"))
                    if pm.reference_mode == "cached":
                        lp, _ = pm.sequence_logps(self.model, *args, **images)
                        b = lp.shape[0] // 2
                        c, r = lp[:b].float(), lp[b:].float()
                    else:
                        c, r = pm.reference_logps(*args, **images)
                    c, r = self.accelerator.gather_for_metrics((c, r))
                    chosen.append(c.cpu())
                    rejected.append(r.cpu())
        finally:
            self.model.train(was_training)
        chosen, rejected = torch.cat(chosen), torch.cat(rejected)
        bad = ~(torch.isfinite(chosen) & torch.isfinite(rejected))
        if bad.any():
            raise ValueError(f"precompute_ref_log_probs: the reference log-probs of {name!r} are "
                             f"not finite for row(s) {bad.nonzero().flatten()[:5].tolist()}")
        return chosen, rejected


def bpo_fast_trainer(trainer_cls):
    """``trainer_cls`` (TRL 1.16's ``DPOTrainer`` or a subclass of it) with bpo-fast's step:
    ``MyTrainer = bpo_fast_trainer(MyDPOTrainer)``."""
    if not (isinstance(trainer_cls, type) and issubclass(trainer_cls, _trl.DPOTrainer)):
        raise TypeError(f"trainer_cls: expected trl.DPOTrainer or a subclass, got {trainer_cls!r}")
    if issubclass(trainer_cls, BPOFastMixin):
        return trainer_cls
    return type(trainer_cls.__name__, (BPOFastMixin, trainer_cls),
                {"__module__": trainer_cls.__module__, "__doc__": trainer_cls.__doc__})


class DPOTrainer(BPOFastMixin, _trl.DPOTrainer):
    """TRL 1.16's ``DPOTrainer`` with bpo-fast's step (see :mod:`bpo_fast.integrations.trl`);
    the same arguments."""
