"""``bpo-fast demo``: BPO end to end on the shapes world, through the code paths a user runs.

Stages (each one's output lands in ``out``; a finished stage is reused when the demo is run
again with the same settings, so an interrupted demo resumes):

1. **world**: :func:`bpo_fast.demo.world.make_world` draws the shapes world with the paper's
   imbalance: a large text-only corpus (descriptions and QA) with a strong co-occurrence prior,
   a smaller image-caption alignment split with a weaker one, and validation / held-out images
   where the prior is right half of the time (LLaVA-format data, images, ground truth, synonyms,
   rule-injector lexicon).
2. **pretrain**: a tiny LLaVA (:func:`bpo_fast.models.tiny.build_tiny_llava`, word-level
   tokenizer over the world's vocabulary); its vision tower learns on its own to name each
   patch's shape (:func:`bpo_fast.demo.pretrain.pretrain_vision`, the part CLIP plays in
   LLaVA), its language model reads the text corpus (:func:`bpo_fast.demo.sft.sft_train` on
   text-only records).
3. **sft** (alignment): a short image-caption stage on the alignment split (projector and
   language model; the vision tower frozen), saved with ``save_pretrained``: the SFT start.
4. **pairs**: the real pair builder (:func:`bpo_fast.data.pairs.build_pairs`) bootstraps rejected
   answers: image-weakened prompting (greedy answers from the noised image, by default) and
   error injection with the rule injector (and, when asked, the model itself);
   :func:`bpo_fast.data.pairs.merge_pairs` merges them.
5. **bpo**: the real DPO trainer (:func:`bpo_fast.train.train`) with a frozen reference copy
   (DPO + the RPO term: the chosen answers' NLL, by default), logging each loss term and its
   gradient norm apart (``log_term_grads``). **paper**: the same pairs, steps and learning rate
   with the objective the BPO paper trains (:data:`PAPER_OBJECTIVE`: plain DPO, ``sigmoid``,
   beta 0.1, no NLL term): what the demo's own objective changes.
6. **control**: the same SFT model trained on the same chosen answers, with the same steps,
   learning rate and frozen vision tower, but no rejected answers: what the preference pairs add
   over more supervised training on the data set's own answers.
7. **eval**: greedy captions of the held-out images (``score_split="val"``: the validation
   images, for choosing settings) before (SFT model), after BPO, after the paper's objective
   and after the control, scored
   with CHAIR (:mod:`bpo_fast.eval.chair`), plus the prior-partner hallucination rate; and each
   model's greedy yes/no answers (3 tokens) to the POPE questions of the same images
   (:mod:`bpo_fast.eval.pope`: present, random-absent and prior-partner-absent objects of the
   world's prior pairs).
8. **report**: :func:`bpo_fast.demo.report.write_report` (Markdown, PNG plots, a printed table).

Seeds: the settings were chosen on the validation split of :data:`SELECTION_SEEDS`
(docs/demo-investigation.md); the demo reports on :data:`REPORT_SEEDS`, which no choice ever
looked at. :func:`check_selection_seeds` keeps it so: scoring a report seed on the validation
split (what choosing settings does) is refused.
"""

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from bpo_fast.demo.world import (EVAL_PROMPT, WorldConfig, make_world, prior_hallucination,
                                 score_captions, world_vocabulary)


# The seeds whose validation split chose the demo's settings (docs/demo-investigation.md), and
# the seeds the demo reports on: disjoint, so the report's models are not the ones the choice
# was made on.
SELECTION_SEEDS = (0, 1, 2, 3, 4)
REPORT_SEEDS = tuple(range(100, 110))
# The objective the BPO paper trains (arXiv 2403.08730; the official code's bpo_llava.py runs
# TRL's DPOTrainer with its default sigmoid loss and beta 0.1, no NLL term): the "paper" arm.
PAPER_OBJECTIVE = {"loss_type": "sigmoid", "beta": 0.1, "rpo_alpha": None}


def check_selection_seeds(seeds):
    """Refuse to score a report seed for choosing settings (the validation split): a seed the
    demo reports on must never take part in a choice."""
    bad = sorted(set(seeds) & set(REPORT_SEEDS))
    if bad:
        raise ValueError(f"seeds: {bad} are the demo's report seeds ({REPORT_SEEDS[0]}-"
                         f"{REPORT_SEEDS[-1]}); settings are chosen on other seeds only (e.g. "
                         f"the selection seeds {SELECTION_SEEDS[0]}-{SELECTION_SEEDS[-1]})")


@dataclass
class DemoConfig:
    """Sizes and hyper-parameters of the demo. :meth:`quick` is the CI-sized variant."""

    out: str = "demo_out"
    device: str = "cpu"
    seeds: tuple = REPORT_SEEDS
    # world: a large text-only corpus with a strong prior, a short image-caption alignment set
    # with a weaker one, validation and held-out images where the prior is right half the time
    n_text: int = 2000
    n_train: int = 400
    n_val: int = 100
    # 500 held-out images, as POPE's COCO split: with 150 the per-seed CHAIR differences between
    # BPO and the control were mostly the scoring's own noise (docs/demo-investigation.md, phase 5)
    n_eval: int = 500
    world: WorldConfig = field(default_factory=lambda: WorldConfig(
        prior_strength=0.8, text_prior_strength=0.95, eval_prior_strength=0.5, qa_per_image=1,
        qa_exist_weight=4, jitter=False, shape_scale=(0.7, 0.7)))
    # which split the captions and POPE answers are scored on: "eval" (held-out, the reported
    # numbers) or "val" (for choosing settings; never choose on "eval")
    score_split: str = "eval"
    # tiny LLaVA
    image_size: int = 64
    patch_size: int = 32              # one image token per grid cell of the default world
    hidden_size: int = 128
    num_layers: int = 2
    # stage 1: the vision tower's own pretraining (per-patch colour/kind, as LLaVA starts from
    # a pretrained CLIP) and the text-only pretraining of the language model
    n_vision: int = 2000
    vision_epochs: int = 2
    vision_lr: float = 2e-3
    pretrain_epochs: int = 2
    pretrain_batch_size: int = 64
    pretrain_lr: float = 2e-3
    # stage 2: short image-caption alignment (descriptions and QA turns), every parameter
    sft_epochs: int = 4
    sft_batch_size: int = 32
    sft_lr: float = 1e-3
    # pair building
    pair_images: int = 300            # alignment images the pair builder answers / rewrites
    noise_step: int = 500             # image-weakened prompting level (the builder's default)
    noise_schedule: str = "sigmoid"
    image_weakened: bool = True       # image-weakened prompting on the pair images
    rule_injection: bool = True       # error injection by rules on the pair images
    pair_turns: str = "first"         # the turns the builder answers: "first" (description), "all"
    pair_greedy: bool = True          # greedy answers from the weakened image (else sampled)
    max_new_tokens: int = 48
    llm_injector_images: int = 0      # images whose answer the model itself rewrites
    # DPO
    # 0.3 on the validation split (5 seeds): prior-partner hallucination below the control in
    # every seed, CHAIR-i against the control as 0.1 (docs/demo-investigation.md, phase 5)
    beta: float = 0.3
    loss_type: str = "sigmoid_norm"    # DPO on per-token log-ratios (chosen on the validation split)
    rpo_alpha: float = 1.0            # + the chosen answers' NLL (keeps them likely)
    dpo_lr: float = 1e-4
    dpo_epochs: int = 1
    dpo_batch_size: int = 8
    control: bool = True              # the supervised-only control arm (see the module doc)
    quick_run: bool = False           # a pipeline check (:meth:`quick`): the report says so
    paper: bool = True                # the paper's-objective arm (PAPER_OBJECTIVE)
    # POPE probe of every arm: at most this many present / random / prior-partner questions per
    # held-out image (0: no POPE)
    pope_per_image: int = 3
    # torch's CPU threads (None: the CPUs other processes leave free, followed while it runs)
    threads: int = None

    def __post_init__(self):
        if self.score_split not in ("eval", "val"):
            raise ValueError(f"score_split: expected 'eval' or 'val', got {self.score_split!r}")
        self.seeds = tuple(self.seeds)

    @classmethod
    def quick(cls, **kw):
        base = dict(quick_run=True, seeds=REPORT_SEEDS[:1], n_text=600, n_train=150, n_val=20,
                    n_eval=40, pair_images=48,
                    max_new_tokens=40, pretrain_epochs=1, n_vision=512, sft_epochs=4)
        base.update(kw)
        return cls(**base)

    def objective(self):
        """The BPO arm's objective, in :data:`PAPER_OBJECTIVE`'s keys."""
        return {"loss_type": self.loss_type, "beta": self.beta, "rpo_alpha": self.rpo_alpha}

    def paper_arm(self):
        """Whether the paper's-objective arm runs: asked for, and not the BPO arm itself."""
        same = (self.loss_type == PAPER_OBJECTIVE["loss_type"]
                and self.beta == PAPER_OBJECTIVE["beta"] and not self.rpo_alpha)
        return self.paper and not same

    def to_dict(self):
        d = dataclasses.asdict(self)
        d["world"] = self.world.to_dict()
        d["seeds"] = list(self.seeds)
        return d


_BAR = None  # the demo's one progress display (stages done over all seeds), set by run_demo
_CURRENT = {}  # the stage running now (seed folder, stage): for the line of an interrupted demo


def stopped_at(out):
    """Where an interrupted or failed demo stopped, what it kept, how to resume (the one line
    of its :class:`bpo_fast.errors.CommandGuard`)."""
    where = (f"in stage {_CURRENT['stage']} of {_CURRENT['seed']}" if _CURRENT
             else "before the first stage")
    return (where, f"every finished stage is kept in {out!r}",
            "rerun the same command to continue (finished stages are reused)")


def _say(msg, stage_done=False):
    """A log line (through the progress bar when there is one); ``stage_done``: one of the
    seed's stages the bar counts (world, before, after, control, done) has finished."""
    line = f"[demo {time.strftime('%H:%M:%S')}] {msg}"
    if _BAR is None:
        print(line, flush=True)
        return
    _BAR.write(line)
    if stage_done:
        _BAR.update(1)


def _f(x):
    return "n/a" if x is None else f"{x:.3f}"


def _stage_done(path, key):
    """True when ``path`` holds the done-marker of a stage run with settings ``key``."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f) == key
    except (OSError, ValueError):
        return False


def _rel(path):
    """``path`` relative to its seed folder (``seedN/``), for the stages' settings keys: a demo
    folder that is moved or copied is reused, and a stage never reads another seed's output."""
    path = os.path.normpath(os.path.abspath(path))
    parts = path.split(os.sep)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].startswith("seed"):
            return "/".join(parts[i:])
    return path


def _mark_done(path, key):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(key, f)
    os.replace(tmp, path)


class _StageTimes:
    """Each stage's own wall time, kept in ``stage_times.json`` of the seed's folder: a stage
    that runs (its done-marker is written anew) records its time; a stage reused from an
    earlier run keeps the time recorded by that run (None when that run kept none)."""

    def __init__(self, path):
        self.path = path
        try:
            with open(path, encoding="utf-8") as f:
                self.times = json.load(f)
        except (OSError, ValueError):
            self.times = {}

    def run(self, stage, marker, fn, *args, **kwargs):
        def stamp():
            try:
                return os.stat(marker).st_mtime_ns
            except OSError:
                return None

        before, t0 = stamp(), time.perf_counter()
        _CURRENT.update(stage=stage, seed=os.path.basename(os.path.dirname(self.path)))
        out = fn(*args, **kwargs)
        after = stamp()
        if after is not None and after != before:
            self.times[stage] = round(time.perf_counter() - t0, 2)
            tmp = self.path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.times, f, indent=1)
            os.replace(tmp, self.path)
        else:
            self.times.setdefault(stage, None)
        return out


def _read_eval(world, split="eval"):
    from PIL import Image

    with open(world.split(split)[0], encoding="utf-8") as f:
        records = json.load(f)
    images = []
    for r in records:
        with Image.open(os.path.join(world.images, r["image"])) as im:
            images.append(im.convert("RGB"))
    return records, images


def _captions(model_dir, model_key, world, cfg, path):
    """Greedy captions of the held-out images by the model in ``model_dir`` (cached in ``path``;
    ``model_key`` is the settings key of the stage that made the model, so a retrained model
    is never scored with stale captions)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from bpo_fast.demo.sft import generate_answers

    key = {"model": _rel(model_dir), "model_key": model_key, "split": cfg.score_split,
           "n_eval": cfg.n_eval, "n_val": cfg.n_val, "max_new_tokens": cfg.max_new_tokens}
    if _stage_done(path + ".done", key):
        with open(path, encoding="utf-8") as f:
            return {r["id"]: r["caption"] for r in map(json.loads, f)}
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, local_files_only=True)
    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    records, images = _read_eval(world, cfg.score_split)
    answers = generate_answers(model, processor, images, EVAL_PROMPT,
                               max_new_tokens=cfg.max_new_tokens, device=cfg.device)
    caps = {r["id"]: a for r, a in zip(records, answers)}
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for i, c in caps.items():
            f.write(json.dumps({"id": i, "caption": c}) + "\n")
    os.replace(tmp, path)
    _mark_done(path + ".done", key)
    return caps


def _pope_questions(world, cfg, seed):
    """The POPE question set of the held-out images: present, random-absent and
    prior-partner-absent objects (the world's prior pairs), deterministic from the seed."""
    from bpo_fast.eval.chair import load_ground_truth
    from bpo_fast.eval.pope import build_questions

    truth = load_ground_truth(world.split(cfg.score_split)[1])
    return build_questions(truth, seed=seed, per_image=cfg.pope_per_image,
                           prior=[list(p) for p in cfg.world.prior_pairs],
                           vocabulary=cfg.world.objects), truth


def _pope_answers(model_dir, model_key, world, cfg, seed, path):
    """Greedy yes/no answers (a few tokens) of the model in ``model_dir`` to the POPE questions
    (cached in ``path`` like the captions). Returns the :class:`PopeResult`."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from bpo_fast.demo.sft import generate_answers
    from bpo_fast.data.jsonl import atomic_write_jsonl
    from bpo_fast.eval.pope import load_answers, score_pope

    questions, truth = _pope_questions(world, cfg, seed)
    key = {"model": _rel(model_dir), "model_key": model_key, "n_eval": cfg.n_eval,
           "n_val": cfg.n_val, "split": cfg.score_split, "per_image": cfg.pope_per_image,
           "n_questions": len(questions), "seed": seed}
    if not _stage_done(path + ".done", key):
        model = LlavaForConditionalGeneration.from_pretrained(model_dir, local_files_only=True)
        processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
        records, images = _read_eval(world, cfg.score_split)
        by_id = dict(zip((r["id"] for r in records), images))
        answers = generate_answers(model, processor, [by_id[q["image_id"]] for q in questions],
                                   [q["question"] for q in questions], max_new_tokens=3,
                                   device=cfg.device)
        atomic_write_jsonl(path, [{"question_id": q["question_id"], "answer": a}
                           for q, a in zip(questions, answers)])
        _mark_done(path + ".done", key)
    return score_pope(questions, load_answers(path), truth)


def _tiny_config(cfg):
    from bpo_fast.models.tiny import TinyLlavaConfig

    return TinyLlavaConfig(image_size=cfg.image_size, patch_size=cfg.patch_size,
                           vision_hidden=cfg.hidden_size, hidden_size=cfg.hidden_size,
                           intermediate_size=2 * cfg.hidden_size, num_layers=cfg.num_layers,
                           num_heads=4, num_kv_heads=4, vision_heads=4,
                           words=world_vocabulary(cfg.world) + ["user", "assistant", ":"],
                           # background -> 0: the patch embedding sees the shapes only (learns
                           # to read them several times faster than with CLIP's mean/std)
                           image_mean=tuple(c / 255 for c in cfg.world.background),
                           image_std=(0.5, 0.5, 0.5))


def _logger(stage, total_hint):
    every = max(1, total_hint // 5)

    def log(step, total, loss):
        if step % every == 0 or step == total:
            _say(f"{stage}: step {step}/{total} loss {loss:.3f}")
    return log


def _pretrain(world, cfg, seed, out_dir):
    """Stage 1: a fresh tiny LLaVA whose language model reads the text-only corpus (the
    strong co-occurrence prior) and nothing else. Returns its settings key."""
    from bpo_fast.demo.pretrain import pretrain_vision
    from bpo_fast.demo.sft import sft_train
    from bpo_fast.demo.world import generate_scenes, patch_labels, render
    from bpo_fast.models.tiny import build_tiny_llava

    key = {"seed": seed, "n_text": cfg.n_text, "epochs": cfg.pretrain_epochs,
           "lr": cfg.pretrain_lr, "batch": cfg.pretrain_batch_size, "hidden": cfg.hidden_size,
           "layers": cfg.num_layers, "patch": cfg.patch_size, "image_size": cfg.image_size,
           "world": cfg.world.to_dict(), "n_vision": cfg.n_vision,
           "vision_epochs": cfg.vision_epochs, "vision_lr": cfg.vision_lr,
           "text_loss": "answer tokens"}
    marker = os.path.join(out_dir, "pretrain.done")
    if _stage_done(marker, key):
        _say(f"pretrain: reusing {out_dir}")
        return key
    model, processor = build_tiny_llava(None, _tiny_config(cfg), seed=seed)
    vision_losses = []
    if cfg.n_vision and cfg.vision_epochs:
        # the vision tower's own pretraining (LLaVA's CLIP): images of the world, no text
        scenes = generate_scenes(cfg.n_vision, seed, cfg.world, "vision")
        pix = processor.image_processor([render(sc, cfg.world) for sc in scenes],
                                        return_tensors="pt")["pixel_values"]
        labels = torch.tensor([patch_labels(sc, cfg.patch_size, cfg.world) for sc in scenes])
        vision_losses = pretrain_vision(model, pix, labels, epochs=cfg.vision_epochs,
                                        batch_size=128, lr=cfg.vision_lr, seed=seed,
                                        device=cfg.device,
                                        log=_logger("vision", cfg.vision_epochs * cfg.n_vision // 128))
    with open(world.text, encoding="utf-8") as f:
        records = json.load(f)
    losses = []
    if records and cfg.pretrain_epochs:
        # text-only records: the language model alone trains (no pixels, no vision gradient)
        losses = sft_train(model, processor, records, None, epochs=cfg.pretrain_epochs,
                           batch_size=cfg.pretrain_batch_size, lr=cfg.pretrain_lr, seed=seed,
                           device=cfg.device,
                           log=_logger("pretrain", cfg.pretrain_epochs * len(records)
                                       * (1 + cfg.world.qa_per_image) // cfg.pretrain_batch_size))
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "pretrain_losses.json"), "w", encoding="utf-8") as f:
        json.dump({"text": losses, "vision": vision_losses}, f)
    _mark_done(marker, key)
    return key


def _sft(world, cfg, seed, pretrain_dir, pretrain_key, out_dir):
    """Stage 2: the short image-caption alignment of the pretrained model (projector and
    language model; the pretrained vision tower is frozen). Returns its settings key."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from bpo_fast.demo.sft import sft_train

    key = {"seed": seed, "n_train": cfg.n_train, "epochs": cfg.sft_epochs, "lr": cfg.sft_lr,
           "batch": cfg.sft_batch_size, "pretrain_key": pretrain_key, "vision": "frozen",
           "pretrain": _rel(pretrain_dir)}
    marker = os.path.join(out_dir, "sft.done")
    if _stage_done(marker, key):
        _say(f"sft: reusing {out_dir}")
        return key
    model = LlavaForConditionalGeneration.from_pretrained(pretrain_dir, local_files_only=True)
    processor = AutoProcessor.from_pretrained(pretrain_dir, local_files_only=True)
    # as LLaVA: the pretrained vision tower stays frozen; projector and language model align
    model.model.vision_tower.requires_grad_(False)
    losses = sft_train(model, processor, world.train, world.images, epochs=cfg.sft_epochs,
                       batch_size=cfg.sft_batch_size, lr=cfg.sft_lr, seed=seed,
                       device=cfg.device,
                       log=_logger("sft", cfg.sft_epochs * cfg.n_train // cfg.sft_batch_size))
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "sft_losses.json"), "w", encoding="utf-8") as f:
        json.dump(losses, f)
    _mark_done(marker, key)
    return key


def _pairs_data(world, n, path):
    """The first ``n`` training records, description turn only, as a LLaVA JSON file."""
    with open(world.train, encoding="utf-8") as f:
        records = json.load(f)[:n]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(records, f)
    os.replace(tmp, path)
    return path


def _pairs(world, cfg, seed, model_dir, model_key, out_dir):
    from bpo_fast.data.pairs import PairBuilderConfig, build_pairs, merge_pairs

    os.makedirs(out_dir, exist_ok=True)
    merged = os.path.join(out_dir, "pairs.jsonl")
    key = {"seed": seed, "pair_images": cfg.pair_images, "llm": cfg.llm_injector_images,
           "noise_step": cfg.noise_step, "schedule": cfg.noise_schedule,
           "max_new_tokens": cfg.max_new_tokens, "model": _rel(model_dir),
           "model_key": model_key, "rules": cfg.rule_injection, "turns": cfg.pair_turns,
           "weakened": cfg.image_weakened,
           "greedy": cfg.pair_greedy}
    marker = merged + ".done"
    if _stage_done(marker, key):
        _say(f"pairs: reusing {merged}")
        with open(os.path.join(out_dir, "summaries.json"), encoding="utf-8") as f:
            return merged, key, json.load(f)
    data = _pairs_data(world, cfg.pair_images, os.path.join(out_dir, "records.json"))
    data_llm = _pairs_data(world, cfg.llm_injector_images, os.path.join(out_dir, "records_llm.json"))
    common = dict(model=model_dir, image_root=world.images, turns=cfg.pair_turns, seed=seed,
                  device=cfg.device, max_new_tokens=cfg.max_new_tokens, num_workers=0,
                  batch_size=32, overwrite=True, progress=False, fsync=False,
                  lexicon=world.lexicon, do_sample=not cfg.pair_greedy)
    summaries = {}
    strategies = (("image_weakened",) if cfg.image_weakened else ()) + (
        ("error_injection",) if cfg.rule_injection else ())
    runs = []
    if strategies:
        runs.append(("weakened_rules", data, dict(strategies=strategies, injector="rules",
                                                  noise_steps=(cfg.noise_step,),
                                                  noise_schedule=cfg.noise_schedule)))
    if strategies and not cfg.pair_images:
        raise ValueError("pair_images: expected > 0 with image_weakened or rule_injection")
    if cfg.llm_injector_images:
        runs.append(("llm", data_llm, dict(strategies=("error_injection",), injector="llm")))
    if not runs:
        raise ValueError("pair_images/llm_injector_images: no pairs would be built")
    shards = []
    for name, data_path, extra in runs:
        out = os.path.join(out_dir, f"{name}.jsonl")
        summary = build_pairs(PairBuilderConfig(data=data_path, out=out, **common, **extra))
        _say(f"pairs ({name}): " + summary.format().splitlines()[0])
        summaries[name] = summary.to_dict()
        shards.append(out)
    merge_pairs(shards, merged)
    with open(os.path.join(out_dir, "summaries.json"), "w", encoding="utf-8") as f:
        json.dump(summaries, f, indent=1)
    _mark_done(marker, key)
    return merged, key, summaries


def _bpo(world, cfg, seed, sft_dir, pairs, pairs_key, out_dir, objective=None, name="bpo"):
    """DPO on the pairs with the BPO arm's objective, or ``objective`` (the paper arm's),
    logging each term and its gradient norm apart. Returns the metrics path and settings key."""
    from bpo_fast.train import TrainConfig, train

    obj = objective or cfg.objective()
    key = {"seed": seed, "pairs": _rel(pairs), "beta": obj["beta"], "lr": cfg.dpo_lr,
           "epochs": cfg.dpo_epochs, "batch": cfg.dpo_batch_size, "loss": obj["loss_type"],
           "rpo_alpha": obj["rpo_alpha"], "pairs_key": pairs_key, "term_grads": True}
    marker = os.path.join(out_dir, "bpo.done")
    metrics = os.path.join(out_dir, "metrics.jsonl")
    if _stage_done(marker, key):
        _say(f"{name}: reusing {out_dir}")
        return metrics, key
    tc = TrainConfig(model=sft_dir, data=pairs, image_root=world.images, output=out_dir,
                     reference="model", beta=obj["beta"], loss_type=obj["loss_type"],
                     rpo_alpha=obj["rpo_alpha"],
                     learning_rate=cfg.dpo_lr, epochs=cfg.dpo_epochs,
                     batch_size=cfg.dpo_batch_size, warmup_ratio=0.1, train_projector=True,
                     device=cfg.device, dtype="fp32" if cfg.device == "cpu" else "auto",
                     seed=seed, progress=False, max_length=None, overwrite=True,
                     log_term_grads=True)
    result = train(tc)
    _say(f"{name}: {result['steps']} DPO steps -> {out_dir}")
    _mark_done(marker, key)
    return result["metrics_path"], key


def _control(world, cfg, seed, sft_dir, sft_key, pairs, pairs_key, steps, out_dir):
    """The supervised-only control: the SFT model trained on the pairs' chosen answers (each
    pair once per epoch, as DPO sees it) for the DPO run's number of steps (``steps``), with its
    batch size, peak learning rate, warm-up fraction and frozen vision tower (the schedule is
    the SFT loop's own cosine). Returns its settings key."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from bpo_fast.demo.sft import sft_train

    key = {"seed": seed, "pairs_key": pairs_key, "sft_key": sft_key, "lr": cfg.dpo_lr,
           "epochs": cfg.dpo_epochs, "batch": cfg.dpo_batch_size, "steps": steps}
    marker = os.path.join(out_dir, "control.done")
    if _stage_done(marker, key):
        _say(f"control: reusing {out_dir}")
        return key
    with open(pairs, encoding="utf-8") as f:
        records = [{"id": p["id"], "image": p["image"],
                    "conversations": p["prompt"] + [{"from": "gpt", "value": p["chosen"]}]}
                   for p in map(json.loads, f)]
    model = LlavaForConditionalGeneration.from_pretrained(sft_dir, local_files_only=True)
    processor = AutoProcessor.from_pretrained(sft_dir, local_files_only=True)
    model.model.vision_tower.requires_grad_(False)   # as the DPO run (trainer default)
    # turns="last": the chosen answer, with any earlier turns of the prompt as its history
    losses = sft_train(model, processor, records, world.images, epochs=cfg.dpo_epochs,
                       batch_size=cfg.dpo_batch_size, lr=cfg.dpo_lr, warmup_ratio=0.1,
                       seed=seed, device=cfg.device, turns="last", max_steps=steps)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    _say(f"control: {len(losses)} supervised steps on the chosen answers -> {out_dir}")
    _mark_done(marker, key)
    return key


def run_seed(cfg, seed):
    """Every stage for one seed; returns the seed's results (CHAIR before/after, metrics path)."""
    if cfg.score_split == "val":
        check_selection_seeds([seed])
    root = os.path.join(cfg.out, f"seed{seed}")
    os.makedirs(root, exist_ok=True)
    t0 = time.time()
    times = _StageTimes(os.path.join(root, "stage_times.json"))
    world = times.run("world", os.path.join(root, "world", "world.json"), make_world,
                      os.path.join(root, "world"), cfg.n_train, cfg.n_eval, seed, cfg.world,
                      n_text=cfg.n_text, n_val=cfg.n_val)
    _say(f"seed {seed}: world with {cfg.n_text} text-only conversations, {cfg.n_train} "
         f"image-caption / {cfg.n_val} validation / {cfg.n_eval} held-out images", stage_done=True)
    pre_dir = os.path.join(root, "pretrain_model")
    pre_key = times.run("pretrain", os.path.join(pre_dir, "pretrain.done"), _pretrain, world, cfg,
                        seed, pre_dir)
    sft_dir = os.path.join(root, "sft_model")
    sft_key = times.run("sft", os.path.join(sft_dir, "sft.done"), _sft, world, cfg, seed,
                        pre_dir, pre_key, sft_dir)

    def captions(stage, model_dir, key, name):
        path = os.path.join(root, name)
        return times.run(stage, path + ".done", _captions, model_dir, key, world, cfg, path)

    def pope(arm, model_dir, key):
        if not cfg.pope_per_image:
            return None
        path = os.path.join(root, f"pope_{arm}.jsonl")
        return times.run(f"pope {arm}", path + ".done", _pope_answers, model_dir, key, world,
                         cfg, seed, path)

    caps_before = captions("captions before", sft_dir, sft_key, "captions_before.jsonl")
    pope_before = pope("before", sft_dir, sft_key)
    before = score_captions(caps_before, world, split=cfg.score_split)
    _say(f"seed {seed}: before BPO CHAIR-i {_f(before.chair_i)} recall {_f(before.recall)}", stage_done=True)
    pairs_dir = os.path.join(root, "pairs")
    pairs, pairs_key, summaries = times.run("pairs", os.path.join(pairs_dir, "pairs.jsonl.done"),
                                            _pairs, world, cfg, seed, sft_dir, sft_key, pairs_dir)
    bpo_dir = os.path.join(root, "bpo_model")
    metrics, bpo_key = times.run("bpo", os.path.join(bpo_dir, "bpo.done"), _bpo, world, cfg,
                                 seed, sft_dir, pairs, pairs_key, bpo_dir)
    caps_after = captions("captions after", bpo_dir, bpo_key, "captions_after.jsonl")
    pope_after = pope("after", bpo_dir, bpo_key)
    after = score_captions(caps_after, world, split=cfg.score_split)
    _say(f"seed {seed}: after BPO CHAIR-i {_f(after.chair_i)} recall {_f(after.recall)}", stage_done=True)
    paper = pope_paper = paper_metrics = None
    if cfg.paper_arm():
        paper_dir = os.path.join(root, "paper_model")
        paper_metrics, paper_key = times.run(
            "paper", os.path.join(paper_dir, "bpo.done"), _bpo, world, cfg, seed, sft_dir, pairs,
            pairs_key, paper_dir, objective=PAPER_OBJECTIVE, name="paper")
        paper = score_captions(captions("captions paper", paper_dir, paper_key,
                                        "captions_paper.jsonl"), world, split=cfg.score_split)
        pope_paper = pope("paper", paper_dir, paper_key)
        _say(f"seed {seed}: the paper's objective CHAIR-i {_f(paper.chair_i)} "
             f"recall {_f(paper.recall)}", stage_done=True)
    control = pope_control = None
    if cfg.control:
        ctl_dir = os.path.join(root, "control_model")
        from bpo_fast.demo.report import load_metrics

        dpo_steps = int(load_metrics(metrics)[-1]["step"])
        ctl_key = times.run("control", os.path.join(ctl_dir, "control.done"), _control, world,
                            cfg, seed, sft_dir, sft_key, pairs, pairs_key, dpo_steps, ctl_dir)
        control = score_captions(captions("captions control", ctl_dir, ctl_key,
                                          "captions_control.jsonl"), world,
                                 split=cfg.score_split)
        pope_control = pope("control", ctl_dir, ctl_key)
        _say(f"seed {seed}: supervised control CHAIR-i {_f(control.chair_i)} "
             f"recall {_f(control.recall)}", stage_done=True)
    _say(f"seed {seed}: done ({time.time() - t0:.0f}s)", stage_done=True)
    truth = {pc["id"]: pc["ground_truth"] for pc in before.per_caption}
    examples = [{"id": i, "truth": ", ".join(truth[i]), "before": caps_before[i],
                 "after": caps_after[i]} for i in list(caps_before)[:4]]
    return {"seed": seed, "before": before, "after": after, "paper": paper, "control": control,
            "metrics": metrics, "paper_metrics": paper_metrics,
            "pairs": summaries, "examples": examples,
            "prior_before": prior_hallucination(before, cfg.world)["all"]["rate"],
            "prior_after": prior_hallucination(after, cfg.world)["all"]["rate"],
            "prior_paper": (prior_hallucination(paper, cfg.world)["all"]["rate"]
                            if paper is not None else None),
            "prior_control": (prior_hallucination(control, cfg.world)["all"]["rate"]
                              if control is not None else None),
            "pope": {"before": pope_before, "after": pope_after, "paper": pope_paper,
                     "control": pope_control},
            "seconds": time.time() - t0, "stage_times": dict(times.times)}


def _seed_list(seeds):
    """``0-4`` for a run of consecutive seeds, else ``0, 2, 5``."""
    seeds = sorted(seeds)
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(map(str, seeds))


def seeds_text(cfg):
    """Which seeds were used for what: the report's seeds, and whether any of them took part in
    choosing the settings (:data:`SELECTION_SEEDS`)."""
    chose = (f"the settings were chosen on the validation split of seeds "
             f"{_seed_list(SELECTION_SEEDS)} (docs/demo-investigation.md)")
    used = sorted(set(cfg.seeds) & set(SELECTION_SEEDS))
    if cfg.score_split == "val":
        return (f"Seeds {_seed_list(cfg.seeds)}, scored on their validation split: a run for "
                f"choosing settings, not a result ({chose}).")
    if not used:
        return (f"Seeds {_seed_list(cfg.seeds)}: none of them was used to choose anything; "
                f"{chose}.")
    return (f"Seeds {_seed_list(cfg.seeds)}: **seed{'s' if len(used) > 1 else ''} "
            f"{_seed_list(used)} chose the settings** ({chose}), so "
            f"{'their' if len(used) > 1 else 'its'} numbers are biased in BPO's favour by that "
            f"choice; the demo's default seeds {_seed_list(REPORT_SEEDS)} took part in no "
            f"choice.")


def run_demo(cfg):
    """Run the demo for every seed of ``cfg`` and write the report; returns the report dict."""
    from bpo_fast.demo.report import load_metrics, write_report

    from bpo_fast.runtime import threads_for_command

    os.makedirs(cfg.out, exist_ok=True)
    t0 = time.time()
    global _BAR
    from tqdm.auto import tqdm

    # torch's CPU threads: --threads, or the CPUs other processes leave free, re-measured
    # between the training steps and generation batches (bpo_fast.runtime.use_threads)
    # a stage ends with a _say line: world, before, after, (paper,) (control,) done per seed
    _BAR = tqdm(total=len(cfg.seeds) * (4 + cfg.control + cfg.paper_arm()), desc="demo",
                unit="stage", dynamic_ncols=True, file=sys.stderr)
    try:
        with threads_for_command(cfg.threads, adapt=cfg.device == "cpu"):
            runs = [run_seed(cfg, s) for s in cfg.seeds]
    finally:
        _BAR.close()
        _BAR = None
    by_seed = lambda k: {r["seed"]: r[k] for r in runs}  # noqa: E731
    pair_counts = {}
    for r in runs:
        for s in r["pairs"].values():
            for strategy, n in s["written"].items():
                pair_counts[strategy] = pair_counts.get(strategy, 0) + n
    paper = cfg.paper_arm()
    settings = {
        "seeds": ", ".join(map(str, cfg.seeds)), "device": cfg.device,
        "world": f"{cfg.n_text} text-only conversations (pretraining), {cfg.n_train} "
                 f"image-caption records (alignment), {cfg.n_val} validation / {cfg.n_eval} "
                 f"held-out images, {cfg.world.image_size}px; prior P(partner|anchor) "
                 f"{cfg.world.text_prior_strength} text / {cfg.world.prior_strength} alignment / "
                 f"{cfg.world.eval_prior_strength} validation and held-out",
        "scored on": {"eval": "the held-out images", "val": "the validation images (for "
                      "choosing settings; not the held-out numbers)"}[cfg.score_split],
        "training": f"text pretraining {cfg.pretrain_epochs} epoch(s) at lr {cfg.pretrain_lr}; "
                    f"alignment {cfg.sft_epochs} epoch(s) at lr {cfg.sft_lr}",
        "model": f"tiny LLaVA, hidden {cfg.hidden_size}, {cfg.num_layers} layers, "
                 f"patch {cfg.patch_size}",
        "pairs": ", ".join(f"{k}: {v}" for k, v in sorted(pair_counts.items())) +
                 f" (noise step {cfg.noise_step}, {cfg.noise_schedule}; turns {cfg.pair_turns})",
        "DPO": f"{cfg.loss_type}, beta {cfg.beta}, lr {cfg.dpo_lr}, {cfg.dpo_epochs} epoch(s), "
               f"batch {cfg.dpo_batch_size}" +
               (f", + {cfg.rpo_alpha} x chosen NLL (RPO)" if cfg.rpo_alpha else ""),
        "paper's objective": (f"{PAPER_OBJECTIVE['loss_type']}, beta "
                              f"{PAPER_OBJECTIVE['beta']}, no NLL term; the BPO arm's lr, "
                              f"epochs and batch" if paper else
                              "not run (the BPO arm's objective is the paper's)"
                              if cfg.paper else "not run"),
        "wall time of this invocation": f"{time.time() - t0:.0f}s (stages reused from an "
                                        f"earlier run take no time here; their own times are "
                                        f"in the stage table)",
    }
    metrics = {r["seed"]: load_metrics(r["metrics"]) for r in runs}
    arms = ["before", "after"] + (["paper"] if paper else []) + (["control"] if cfg.control
                                                                 else [])
    extra = {"prior-partner hallucination (lower is better)":
             {arm: by_seed(f"prior_{arm}") for arm in arms}}
    notes = _control_notes() if cfg.control else None
    report = write_report(
        cfg.out, metrics=metrics, chair_before=by_seed("before"), chair_after=by_seed("after"),
        chair_control=by_seed("control") if cfg.control else None,
        chair_paper=by_seed("paper") if paper else None,
        paper_metrics={r["seed"]: load_metrics(r["paper_metrics"]) for r in runs}
        if paper else None,
        objectives={"after": cfg.objective(), **({"paper": PAPER_OBJECTIVE} if paper else {})},
        pope={arm: {r["seed"]: r["pope"][arm] for r in runs}
              for arm in arms if all(r["pope"][arm] for r in runs)}
        or None,
        settings=settings, seeds_text=seeds_text(cfg), stage_times=by_seed("stage_times"),
        examples=runs[0]["examples"], extra_metrics=extra, notes=notes, quick=cfg.quick_run,
        scored_on={"eval": "held-out images", "val": "validation images"}[cfg.score_split],
    )
    with open(os.path.join(cfg.out, "demo_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg.to_dict(), f, indent=1)
    return report


def _control_notes():
    """What the control arm is (the numbers are in the report's tables and headline)."""
    return [
        "**BPO against a supervised-only control.** The control trains the same SFT model on "
        "the same chosen answers with the same number of steps, learning rate and frozen vision "
        "tower, without the rejected answers. What BPO does beyond it is what the bootstrapped "
        "preference pairs add.", "",
        "How the demo's defaults were chosen (on the validation split) and what else was "
        "tried, with the numbers: docs/demo-investigation.md in the bpo-fast repository."]


def main_table(report, file=sys.stdout):
    from bpo_fast.demo.report import QUICK_NOTE

    if report["summary"].get("quick"):     # the first line says it: the numbers mean nothing
        print(f"This is {QUICK_NOTE}.\n", file=file)
    print(report["table"], file=file)
    if report.get("headline"):
        print("\n" + "\n".join(line.replace("**", "") for line in report["headline"]
                                if line and QUICK_NOTE not in line), file=file)
    print(f"\nreport: {report['report']}", file=file)
