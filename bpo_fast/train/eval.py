"""Evaluation during training: named eval sets, DPO metrics without gradients, greedy samples,
CHAIR on the samples, and the best checkpoint by an eval metric.

``--eval-data val=val.jsonl,hard=hard.jsonl --eval-every 50`` evaluates every 50 optimiser steps
(and after the last one). For each set it runs the policy and the reference (or reads the
``--ref-cache``, which must then hold the eval pairs too) under ``torch.no_grad`` in eval mode and
logs, as one ``metrics.jsonl`` line ``{"step": N, "eval_<set>/<metric>": ...}`` and to the
tracker, the pair-weighted means of :data:`EVAL_METRICS`: ``loss`` (the optimised objective, RPO
term included), ``dpo_loss``, ``reward_chosen``/``reward_rejected`` (``beta`` times the
policy-reference log-ratio), ``reward_margin``, ``reward_accuracy`` (share of pairs whose chosen
reward is the larger) and the policy's summed ``logps_chosen``/``logps_rejected``.

``--eval-generate N`` also writes greedy answers on the first ``N`` pairs of every set (their
prompt and image; the chosen answer alongside for reference) to ``<output>/eval_samples.jsonl``
(one line per answer with ``step``, ``set``, ``id``) and to the tracker (a text table).
``--eval-chair`` scores those answers with :func:`bpo_fast.eval.chair.compute_chair` against the
records' ``"objects"`` lists (sets without them are skipped, with a warning) and logs
``eval_<set>/chair_i``, ``chair_s`` and ``chair_recall``.

``--save-best eval_<set>/<metric>`` keeps one more checkpoint, ``<output>/best-<step>/`` (the
same contents as ``checkpoint-<step>/``), whenever the metric improves; the best value, its step
and path are in every later checkpoint's ``trainer_state.json`` (``"best"``), so a resumed run
continues the comparison where the checkpoint left it (best checkpoints written after it by the
interrupted run are removed).
"""

import json
import logging
import os
import re
import warnings

import torch

logger = logging.getLogger("bpo_fast")

EVAL_METRICS = ("loss", "dpo_loss", "reward_chosen", "reward_rejected", "reward_margin",
                "reward_accuracy", "logps_chosen", "logps_rejected")
CHAIR_METRICS = ("chair_i", "chair_s", "chair_recall")
# larger is better for these (save_best_mode auto); smaller for every other metric
HIGHER_IS_BETTER = ("reward_chosen", "reward_margin", "reward_accuracy", "logps_chosen",
                    "chair_recall")
SAMPLES_FILE = "eval_samples.jsonl"
_NAME = re.compile(r"[A-Za-z0-9_.\-]+")

__all__ = ["EVAL_METRICS", "CHAIR_METRICS", "parse_eval_sets", "resolve_best_metric",
           "Evaluator", "BestTracker", "SAMPLES_FILE"]


def parse_eval_sets(values):
    """``--eval-data`` values -> ``[(name, path), ...]``. Each value is ``NAME=FILE`` or ``FILE``
    (named by its file stem), several per value when comma-separated."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"eval_data: expected NAME=FILE strings, got {type(values).__name__}")
    out, seen = [], {}
    for v in values:
        if not isinstance(v, str):
            raise ValueError(f"eval_data: expected NAME=FILE strings, got {v!r}")
        for item in (x.strip() for x in v.split(",")):
            if not item:
                continue
            left, sep, right = item.partition("=")
            if sep and _NAME.fullmatch(left):
                name, path = left, right
            else:
                path = item
                name = os.path.splitext(os.path.basename(path))[0]
                name = re.sub(r"[^A-Za-z0-9_.\-]", "_", name) or "eval"
            if not path:
                raise ValueError(f"eval_data: {item!r} names no file (expected NAME=FILE)")
            if name in seen:
                raise ValueError(f"eval_data: set name {name!r} given twice ({seen[name]!r} and "
                                 f"{path!r}); name them apart with NAME=FILE")
            seen[name] = path
            out.append((name, path))
    return out


def resolve_best_metric(metric, sets, mode="auto", *, chair=False):
    """``--save-best`` -> (``eval_<set>/<metric>``, ``"min"`` or ``"max"``)."""
    names = [n for n, _ in sets]
    known = EVAL_METRICS + (CHAIR_METRICS if chair else ())
    m = re.fullmatch(r"eval_(.+)/([a-z_]+)", metric)
    if m:
        set_name, key = m.group(1), m.group(2)
    elif metric in known and len(names) == 1:
        set_name, key = names[0], metric
    elif metric in known:
        raise ValueError(f"save_best: {metric!r} is ambiguous with {len(names)} eval sets; "
                         f"write eval_<set>/{metric} with <set> one of {names}")
    else:
        raise ValueError(f"save_best: expected eval_<set>/<metric> with a metric of "
                         f"{list(known)}, got {metric!r}")
    if set_name not in names:
        raise ValueError(f"save_best: no eval set {set_name!r} (eval sets: {names})")
    if key not in known:
        hint = " (CHAIR metrics need --eval-chair)" if key in CHAIR_METRICS else ""
        raise ValueError(f"save_best: unknown metric {key!r}; expected one of {list(known)}"
                         f"{hint}")
    if mode not in ("auto", "min", "max"):
        raise ValueError(f"save_best_mode: expected auto, min or max, got {mode!r}")
    if mode == "auto":
        mode = "max" if key in HIGHER_IS_BETTER else "min"
    return f"eval_{set_name}/{key}", mode


def _objects_by_id(path):
    """``{pair id: [object names]}`` of the records of ``path`` that carry ``"objects"``."""
    from bpo_fast.data.bpo_format import iter_pair_records

    out = {}
    for _, rec in iter_pair_records(path):
        if isinstance(rec, dict) and isinstance(rec.get("objects"), list) and "id" in rec:
            objs = rec["objects"]
            if all(isinstance(o, str) for o in objs):
                out[rec["id"]] = objs
    return out


class _EvalSet:
    def __init__(self, name, path, image_root, strict, data_format="auto"):
        from bpo_fast.data.hf_pairs import open_pairs

        self.name, self.path = name, path
        try:
            self.ds = open_pairs(path, image_root, strict=strict, data_format=data_format)
        except ValueError as exc:
            from bpo_fast.errors import UserError

            raise UserError(f"eval_data: set {name!r}: {exc}") from None
        self.objects = self.ds.objects() if hasattr(self.ds, "objects") else _objects_by_id(path)


class Evaluator:
    """Runs the eval sets of a :class:`~bpo_fast.train.TrainConfig` on a
    :class:`~bpo_fast.models.preference.PreferenceModel` (collective when ``world > 1``: every
    rank evaluates its share, padded to equal batch counts, and the sums are all-reduced)."""

    def __init__(self, config, *, collate, processor, model_type, cache=None, world=1, rank=0,
                 device=None, autocast=None, bad=None):
        import contextlib

        self.config = config
        self.sets = [_EvalSet(n, p, config.eval_image_root or config.image_root, config.strict,
                              config.data_format) for n, p in parse_eval_sets(config.eval_data)]
        self.collate, self.processor, self.model_type = collate, processor, model_type
        # the bad-sample policy (bpo_fast.data.bad_samples): each set under its own path in the
        # run's errors file; a bad pair's place in a batch goes to a stand-in of weight 0
        self.bad = bad
        from bpo_fast.data.bad_samples import GuardedPairs

        for s in self.sets:
            s.guarded = GuardedPairs(s.ds, collate.encode, file=s.path, substitute=True)
            if bad is not None:
                if rank == 0:
                    bad.add_skipped(s.path, s.ds)
                else:
                    bad.total(s.path, len(s.ds) + len(s.ds.skipped))
        self.cache, self.world, self.rank = cache, world, rank
        self.device = device or torch.device("cpu")
        self.autocast = autocast or contextlib.nullcontext()
        self.batch_size = config.eval_batch_size or config.batch_size
        if cache is not None:
            from bpo_fast.train.ref_cache import check_compatible

            for s in self.sets:
                check_compatible(cache, path=config.ref_cache, max_length=config.max_length,
                                 reference_model=config.ref_model or config.model, ids=s.ds.ids,
                                 data=s.path, records=s.ds.records,
                                 processor_kwargs=config.processor_kwargs)
        if config.eval_chair:
            with_objects = [s.name for s in self.sets
                            if any(i in s.objects for i in s.ds.ids[:config.eval_generate])]
            if not with_objects:
                from bpo_fast.errors import UserError

                raise UserError("eval_chair: no eval set has \"objects\" on its first "
                                f"{config.eval_generate} pairs (the generated ones), so there "
                                "is nothing to score")
            for s in self.sets:
                if s.name not in with_objects:
                    warnings.warn(f"eval_chair: set {s.name!r} has no \"objects\" lists; its "
                                  "answers are not scored", stacklevel=2)

    # ---- DPO metrics -----------------------------------------------------------------------

    def _rank_batches(self, n):
        """This rank's batches of dataset indices with a weight (0 for padding)."""
        per = -(-n // self.world)
        per = -(-per // self.batch_size) * self.batch_size if self.world > 1 else per
        idx = list(range(self.rank, n, self.world))
        w = [1.0] * len(idx)
        while len(idx) < per:        # pad with a real pair, weight 0: every rank runs alike
            idx.append(idx[-1] if idx else 0)
            w.append(0.0)
        for i in range(0, len(idx), self.batch_size):
            yield idx[i:i + self.batch_size], w[i:i + self.batch_size]

    @torch.no_grad()
    def metrics(self, pm, s):
        sums = torch.zeros(len(EVAL_METRICS) + 1, dtype=torch.float64, device=self.device)
        for idx, w in self._rank_batches(len(s.ds)):
            items = [s.guarded[i] for i in idx]
            self._note([n for it in items for n in it["bad"]])
            kept = [(it, 0.0 if it["stand_in"] else wi) for it, wi in zip(items, w)
                    if not it.get("skip")]
            if not kept:
                from bpo_fast.data.bad_samples import TooManyBadSamples

                where = f"; each is named in {self.bad.path}" if self.bad is not None else ""
                raise TooManyBadSamples(f"eval_data: no usable sample in {s.path}: every one is "
                                        f"bad{where}")
            w = [wi for _, wi in kept]
            batch = self.collate.batch([it for it, _ in kept])
            inputs = {k: v.to(self.device) for k, v in batch.items()
                      if isinstance(v, torch.Tensor) and k != "index"}
            if self.cache is not None:
                inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = self.cache.lookup(
                    batch["ids"], self.device, digests=batch["digests"])
            with self.autocast:
                out = pm(**inputs)
            d = out.dpo
            b = len(w)
            wt = torch.tensor(w, dtype=torch.float64, device=self.device)
            per_pair = [out.loss.detach().double().expand(b), d.losses, d.chosen_rewards,
                        d.rejected_rewards, d.reward_margins,
                        (d.chosen_rewards > d.rejected_rewards),
                        out.policy_chosen_logps, out.policy_rejected_logps]
            for j, v in enumerate(per_pair):
                sums[j] += (v.detach().double().reshape(-1) * wt).sum()
            sums[-1] += wt.sum()
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(sums)
        if self.bad is not None:
            self.bad.check(self.world)
        n = max(float(sums[-1]), 1.0)
        return {f"eval_{s.name}/{k}": float(v) / n for k, v in zip(EVAL_METRICS, sums[:-1])}

    # ---- generation ----------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, pm, s):
        """Greedy answers on the first ``eval_generate`` pairs: ``[{"id", "prompt", "answer",
        "chosen"}]``, through bpo-fast's one generation path
        (:class:`bpo_fast.data.vlm_generation.Answerer`, as ``bpo-fast generate``), batched by
        ``eval_batch_size``."""
        from bpo_fast.data.bad_samples import SAMPLE_ERRORS, BadSamples, sample_kind
        from bpo_fast.data.generation import Sampling
        from bpo_fast.data.questions import item_images
        from bpo_fast.data.vlm_generation import Answerer

        n = min(self.config.eval_generate, len(s.ds))
        answer = Answerer(pm.policy, self.processor, Sampling(
            max_new_tokens=self.config.eval_max_new_tokens,
            chat_template=self.config.chat_template), device=self.device,
            processor_kwargs=self.config.processor_kwargs)
        out = []
        for b in range(0, n, self.batch_size):
            items = []
            for j in range(b, min(n, b + self.batch_size)):
                try:  # a bad sample is noted (metrics() met it first) and has no answer
                    it = s.ds[j]
                    answer.check(it["prompt"], item_images(it))
                except SAMPLE_ERRORS as exc:
                    rec = s.ds.records[j]
                    self._note([BadSamples.entry(s.path, rec.get("id"), rec.get("line",
                                                                                rec.get("row")),
                                                 f"{type(exc).__name__}: {exc}", sample_kind(exc))])
                    continue
                items.append(it)
            if not items:
                continue
            with self.autocast:
                answers, _ = answer([(it["prompt"], item_images(it)) for it in items])
            out += [{"id": it["id"], "prompt": answer.prompt(it["prompt"]), "answer": a,
                     "chosen": it["chosen"]} for it, a in zip(items, answers)]
        return out

    def _note(self, notes):
        if self.bad is not None:
            self.bad.note(notes)

    def _generate_unsharded(self, pm, s):
        """FSDP2: ``generate`` calls the policy directly, past the root module's hooks that
        gather its own parameters (embeddings, vision path, LM head): gather them for the call
        (the decoder layers gather themselves)."""
        sharded = self.world > 1 and callable(getattr(pm, "unshard", None))
        if sharded:
            pm.unshard()
        try:
            return self.generate(pm, s)
        finally:
            if sharded:
                pm.reshard()

    def chair(self, s, samples):
        from bpo_fast.eval.chair import compute_chair

        scored = {x["id"]: x["answer"] for x in samples if x["id"] in s.objects}
        if not scored:
            return {}
        res = compute_chair(scored, {i: s.objects[i] for i in scored},
                            self.config.eval_chair_synonyms)
        vals = {"chair_i": res.chair_i, "chair_s": res.chair_s, "chair_recall": res.recall}
        return {f"eval_{s.name}/{k}": v for k, v in vals.items() if v is not None}

    # ---- one evaluation ------------------------------------------------------------------

    def run(self, pm, step):
        """Evaluate every set at ``step``: ``(metrics dict, samples list)`` (samples carry
        ``step`` and ``set``). The model is left in train mode."""
        was_training = pm.training
        pm.eval()
        metrics, samples = {}, []
        try:
            for s in self.sets:
                metrics.update(self.metrics(pm, s))
                if self.config.eval_generate:
                    gen = self._generate_unsharded(pm, s)
                    samples.extend({"step": step, "set": s.name, **x} for x in gen)
                    if self.config.eval_chair:
                        metrics.update(self.chair(s, gen))
        finally:
            pm.train(was_training)
        return metrics, samples


def append_samples(output, samples):
    path = os.path.join(output, SAMPLES_FILE)
    with open(path, "a") as f:
        for x in samples:
            f.write(json.dumps(x) + "\n")
    return path


class BestTracker:
    """The best value of ``--save-best`` so far, and its checkpoint ``<output>/best-<step>``."""

    def __init__(self, metric, mode, output):
        self.metric, self.mode, self.output = metric, mode, output
        self.value, self.step, self.path = None, None, None

    def state(self):
        # the folder name: an output folder moved or copied elsewhere stays resumable
        return {"metric": self.metric, "mode": self.mode, "value": self.value,
                "step": self.step, "path": os.path.basename(self.path) if self.path else None}

    def load(self, st, *, remove_unknown=True):
        """Restore from a checkpoint's ``trainer_state["best"]`` (a resumed run), and remove the
        best checkpoints that state does not know (written after it, or by another run)."""
        if st and st.get("metric") == self.metric and st.get("mode") == self.mode:
            self.value, self.step = st["value"], st["step"]
            self.path = os.path.join(self.output, os.path.basename(st["path"])) \
                if st.get("path") else None
        for d in self.existing() if remove_unknown else ():
            if d != self.path:
                import shutil

                shutil.rmtree(d, ignore_errors=True)

    def existing(self):
        if not os.path.isdir(self.output):
            return []
        return [os.path.join(self.output, n) for n in sorted(os.listdir(self.output))
                if re.fullmatch(r"best-\d+", n)]

    def improved(self, metrics):
        v = metrics.get(self.metric)
        if v is None:
            raise KeyError(f"save_best: the evaluation gave no {self.metric!r} (got "
                           f"{sorted(metrics)})")
        if self.value is None:
            return True
        return v > self.value if self.mode == "max" else v < self.value

    def update(self, metrics, step):
        self.value, self.step = metrics[self.metric], step
        self.path = os.path.join(self.output, f"best-{step}")
        return self.path
