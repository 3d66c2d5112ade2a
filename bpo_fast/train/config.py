"""The training configuration: one dataclass, shared by :func:`bpo_fast.train.train` and the CLI."""

import dataclasses
from dataclasses import dataclass

import torch

from bpo_fast.options import (DTYPE_CHOICES, canonical_dtype, check_processor_kwargs,
                              check_values, device_option, dtype_option, max_bad_fraction_option,
                              option, processor_kwargs_option, threads_option)

from bpo_fast.runtime import DTYPES, parse_dtype  # noqa: F401  (re-exported)

# the settings that define a run: `--resume` with other values is refused, naming each, unless
# resume_with_changes (the model, the data and the schedule's total and warmup steps, however
# given, are compared by trainer._run_identity)
RUN_SETTINGS = ("batch_size", "grad_accum", "max_length", "learning_rate", "weight_decay",
                "adam_beta1", "adam_beta2", "adam_eps", "max_grad_norm", "loss_type", "beta",
                "label_smoothing", "rpo_alpha", "reference", "lora_r", "lora_alpha",
                "lora_dropout", "lora_target_modules", "train_projector", "train_vision", "seed",
                "dtype", "ref_dtype", "chat_template", "processor_kwargs")

_DATA, _REF, _LOSS = "data and model", "reference", "loss"
_WHAT, _OPT, _RUN = "what trains", "optimisation", "runtime"
_EVAL = "evaluation and logging"
REPORT_TO = ("none", "tensorboard", "wandb")


def _loss_types():
    from bpo_fast.ops.losses import LOSS_TYPES

    return tuple(LOSS_TYPES)


def _bool_or_auto(v):
    if isinstance(v, bool) or v == "auto":
        return v
    key = str(v).lower()
    table = {"auto": "auto", "on": True, "true": True, "off": False, "false": False}
    if key not in table:
        import argparse

        raise argparse.ArgumentTypeError(f"expected auto, on or off, got {v!r}")
    return table[key]


@dataclass
class TrainConfig:
    """Everything :func:`bpo_fast.train.train` needs. Paths are local; nothing is downloaded.

    Batch sizes count *pairs*: ``batch_size`` per process and micro-step, the optimiser sees
    ``batch_size * grad_accum * world_size`` pairs per step.
    """

    # data and model
    model: str = option(help="local path of the policy model (HF save_pretrained folder)",
                        group=_DATA, metavar="DIR")
    data: str = option(help="preference pairs: our JSONL (build-pairs / merge-pairs), official "
                            "BPO records, or via HF datasets a JSON/JSONL/Parquet/Arrow file or "
                            "folder in our schema or TRL's standard / conversational preference "
                            "format (images: `images` list; none: text only)",
                       group=_DATA, metavar="FILE")
    image_root: str = option(help="directory the pairs' image paths are relative to",
                             group=_DATA, metavar="DIR")
    output: str = option(help="output directory: final model, checkpoint-N/, metrics.jsonl",
                         group=_DATA, metavar="DIR")
    data_format: str = option("auto", help="reader of --data/--eval-data: pairs (our reader: "
                                            "pair JSONL, official BPO), hf (datasets), or auto "
                                            "(hf for Parquet/Arrow/folders and TRL-format JSON)",
                              choices=("auto", "pairs", "hf"), group=_DATA)
    streaming: bool = option(False, help="read --data lazily through datasets streaming (data "
                                         "larger than memory; needs --max-steps; shuffled in a "
                                         "1000-pair buffer)", group=_DATA)
    max_length: int = option(1024, help="tokens per row (prompt and image tokens kept, answers "
                                        "cut)", group=_DATA, bounds="[2, inf)", nullable=True)
    strict: bool = option(False, help="fail on the first bad record (else: skipped, counted, "
                                      "reported with its line)", group=_DATA)
    chat_template: str = option(None, help="a Jinja chat template, or a file holding one",
                                group=_DATA, metavar="TEMPLATE",
                                default_text="the processor's own, else the model family's "
                                             "documented default (bpo_fast.models.vlm)")
    processor_kwargs: dict = processor_kwargs_option(group=_DATA)
    max_bad_fraction: float = max_bad_fraction_option(group=_DATA)

    # reference
    reference: str = option(None, help="the reference: a frozen copy of the model, the policy "
                                       "with its LoRA adapters disabled, or a ref-logps cache",
                            choices=("model", "lora", "cached"), group=_REF,
                            default_text="lora with --lora-r, else model")
    ref_model: str = option(None, help="reference weights for --reference model", group=_REF,
                            metavar="DIR", default_text="--model")
    ref_cache: str = option(None, help="safetensors from `bpo-fast ref-logps` for --reference "
                                       "cached", group=_REF, metavar="FILE")
    ref_dtype: str = option(None, help="dtype of the reference model", group=_REF,
                            type=canonical_dtype, choices=DTYPE_CHOICES, default_text="--dtype")

    # loss
    beta: float = option(0.1, help="DPO beta: strength of the KL anchor to the reference",
                         group=_LOSS)
    loss_type: str = option("sigmoid", help="DPO variant (docs/losses.md: formulas, parameters "
                                              "each one reads)", choices=_loss_types, group=_LOSS)
    label_smoothing: float = option(0.0, help="probability that a pair's preference is "
                                              "flipped, in [0, 0.5): read by cdpo, robust, "
                                              "exo_pair (exo_pair needs > 0)", group=_LOSS)
    rpo_alpha: float = option(None, help="add this times the chosen answers' mean per-token NLL "
                                         "to the loss (RPO; TRL 1.16: loss_type=[sigmoid, sft], "
                                         "loss_weights=[1, alpha])", group=_LOSS,
                              default_text="off")

    # what trains
    lora_r: int = option(0, help="LoRA rank on the language model (0: full fine-tuning)",
                         group=_WHAT, bounds="[0, inf)")
    lora_alpha: float = option(None, help="LoRA alpha", group=_WHAT, default_text="2 * r",
                               bounds="(0, inf)")
    lora_dropout: float = option(0.05, help="LoRA dropout", group=_WHAT, bounds="[0, 1)")
    lora_target_modules: list = option(
        None, help="comma-separated module names (matched as name suffixes) or a regex (matched "
                   "against the full module path)", group=_WHAT, type=str,
        default_text="the LLM's q/k/v/o/gate/up/down projections")
    train_projector: bool = option(False, help="also train the projector", group=_WHAT)
    train_vision: bool = option(False, help="also train the vision tower (not with LoRA)",
                                group=_WHAT)
    merge_lora: bool = option(False, help="also write merged full weights at the end",
                              group=_WHAT)

    # optimisation
    learning_rate: float = option(5e-6, help="peak learning rate (cosine schedule after "
                                             "warmup)", group=_OPT, aliases=("lr",),
                                  bounds="[0, inf)")
    weight_decay: float = option(0.0, help="AdamW weight decay (matrices only)", group=_OPT,
                                 bounds="[0, inf)")
    adam_beta1: float = option(0.9, help="AdamW beta1", group=_OPT, bounds="[0, 1)")
    adam_beta2: float = option(0.999, help="AdamW beta2", group=_OPT, bounds="[0, 1)")
    adam_eps: float = option(1e-8, help="AdamW epsilon", group=_OPT, bounds="(0, inf)")
    warmup_steps: int = option(None, help="linear warmup steps", group=_OPT,
                               default_text="--warmup-ratio x total steps", bounds="[0, inf)")
    warmup_ratio: float = option(0.1, help="warmup as a fraction of the total steps", group=_OPT,
                                 bounds="[0, 1]")
    epochs: int = option(1, help="passes over the data", group=_OPT, bounds="[1, inf)")
    max_steps: int = option(None, help="optimiser steps to run (overrides --epochs)", group=_OPT,
                            default_text="epochs x steps per epoch", bounds="[1, inf)")
    batch_size: int = option(4, help="pairs per process and micro-step", group=_OPT,
                             bounds="[1, inf)")
    grad_accum: int = option(1, help="micro-steps per optimiser step", group=_OPT,
                             bounds="[1, inf)")
    max_grad_norm: float = option(1.0, help="clip the gradient norm to this (<= 0: no "
                                            "clipping; the norm is logged either way)",
                                  group=_OPT)
    on_nonfinite: str = option("stop", help="a non-finite loss or gradient: stop the run, or "
                                            "skip the step (both name the batch's record ids)",
                               choices=("stop", "skip"), group=_OPT)
    nonfinite_skip_limit: int = option(10, help="with --on-nonfinite skip: stop (exit 2) after "
                                                "this many skipped steps in a row, naming their "
                                                "record ids", group=_OPT, bounds="[1, inf)")

    # runtime
    dtype: str = dtype_option(help="compute dtype (auto: bf16 on CUDA with fp32 master weights "
                                   "and autocast, fp32 on CPU)", group=_RUN)
    device: str = device_option(group=_RUN)
    threads: int = threads_option(group=_RUN)
    gradient_checkpointing: bool = option(False, help="recompute activations in backward",
                                          group=_RUN)
    attn_implementation: str = option(None, help="force an attention implementation (eager, "
                                                 "sdpa, flash_attention_2)", group=_RUN,
                                      default_text="flash_attention_2 when usable, else sdpa")
    packing: object = option("auto", help="padding-free rows: auto (with flash-attention), on "
                                          "or off", type=_bool_or_auto, group=_RUN,
                          metavar="auto|on|off")
    seed: int = option(0, help="seed of initialisation, data order and dropout", group=_RUN,
                       bounds="[0, 4294967295]")  # numpy's seed range
    save_every: int = option(0, help="checkpoint every N optimiser steps (0: only at the end)",
                             group=_RUN, bounds="[0, inf)")
    keep_checkpoints: int = option(None, help="keep only the newest N checkpoints", group=_RUN,
                                   default_text="all", bounds="[1, inf)")
    resume: object = option(None, help="continue from the newest good checkpoint in --output, "
                                       "or from the one given", nargs="?", const=True,
                            metavar="CHECKPOINT", group=_RUN, default_text="off")
    resume_with_changes: bool = option(False, help="--resume even where the settings that "
                                                   "define the run (data, model, batch size, "
                                                   "learning rate, schedule, loss...) differ "
                                                   "from the checkpoint's (else refused, naming "
                                                   "each difference)", group=_RUN)
    overwrite: bool = option(False, help="start over in an --output that holds an earlier "
                                         "run's checkpoints (they are deleted)", group=_RUN)
    num_workers: int = option(0, help="DataLoader worker processes", group=_RUN,
                              bounds="[0, inf)")
    progress: bool = option(True, help="no progress bar", cli="no-progress", group=_RUN)
    log_every: int = option(1, help="a metrics.jsonl line every N steps", group=_RUN,
                            bounds="[1, inf)")
    log_term_grads: bool = option(False, help="also log the gradient norm of the DPO term and "
                                              "of the RPO term apart (grad_norm_dpo, "
                                              "grad_norm_rpo, grad_cos_dpo_rpo): one more "
                                              "backward pass per micro-batch; one process only",
                                  group=_EVAL)

    # evaluation and logging
    eval_data: list = option(
        None, help="evaluation pair sets as NAME=FILE (or FILE: named by its file stem), space- "
                   "or comma-separated; a FILE holds pairs like --data (a record may carry "
                   "\"objects\": [names] for --eval-chair)", nargs="+", type=str, group=_EVAL,
        metavar="NAME=FILE", default_text="none")
    eval_image_root: str = option(None, help="directory the eval pairs' image paths are "
                                             "relative to", group=_EVAL, metavar="DIR",
                                  default_text="--image-root")
    eval_every: int = option(0, help="evaluate every N optimiser steps (0: only after the last "
                                     "step); logs eval_<set>/<metric> lines in metrics.jsonl",
                             group=_EVAL, bounds="[0, inf)")
    eval_batch_size: int = option(None, help="pairs per eval batch", group=_EVAL,
                                  default_text="--batch-size", bounds="[1, inf)")
    eval_generate: int = option(0, help="at each evaluation, greedy answers on the first N "
                                        "pairs of each eval set, written to "
                                        "<output>/eval_samples.jsonl and the tracker",
                                group=_EVAL, bounds="[0, inf)")
    eval_max_new_tokens: int = option(64, help="token limit of each --eval-generate answer",
                                      group=_EVAL, bounds="[1, inf)")
    eval_chair: bool = option(False, help="score the --eval-generate answers with CHAIR "
                                          "(eval_<set>/chair_i, chair_s, chair_recall) on the "
                                          "sets whose records carry \"objects\"", group=_EVAL)
    eval_chair_synonyms: str = option(None, help="CHAIR synonym file (bpo_fast.eval.chair "
                                                 "formats)", group=_EVAL, metavar="FILE",
                                      default_text="the ground-truth names themselves")
    save_best: str = option(None, help="keep the checkpoint with the best value of this eval "
                                       "metric in <output>/best-<step>/ (e.g. "
                                       "eval_val/reward_accuracy; a bare metric name when there "
                                       "is one eval set)", group=_EVAL, metavar="METRIC",
                            default_text="off")
    save_best_mode: str = option("auto", help="whether larger or smaller --save-best values are "
                                              "better (auto: max for reward_accuracy, "
                                              "reward_margin, reward_chosen, logps_chosen, "
                                              "chair_recall; min for the others)",
                                 choices=("auto", "min", "max"), group=_EVAL)
    report_to: str = option("none", help="also log metrics to this tracker (tensorboard: "
                                         "<output>/tensorboard; wandb: its own settings, e.g. "
                                         "WANDB_PROJECT, WANDB_MODE=offline); optional "
                                         "dependencies", choices=REPORT_TO, group=_EVAL)
    run_name: str = option(None, help="the run's name in the tracker", group=_EVAL,
                           default_text="the --output folder name")

    def __post_init__(self):
        check_values(self)  # each value by its declaration: type, finite, bounds, choices
        if self.reference is None:
            self.reference = "lora" if self.lora_r > 0 else "model"
        if self.reference == "lora" and self.lora_r <= 0:
            raise ValueError("reference: 'lora' needs lora_r > 0 (--lora-r)")
        if self.reference == "cached" and not self.ref_cache:
            raise ValueError("ref_cache: reference='cached' needs the cache file (--ref-cache)")
        # the loss: the registry's checks (ranges, parameters each loss type reads), before any
        # model loads
        from bpo_fast.ops.losses import check_rpo_alpha, loss_config

        loss_config(self.loss_type, self.beta, self.label_smoothing)
        check_rpo_alpha(self.rpo_alpha)
        if self.merge_lora and self.lora_r <= 0:
            raise ValueError("merge_lora: needs LoRA (lora_r > 0)")
        if self.train_vision and self.lora_r > 0:
            raise ValueError("train_vision: not supported with LoRA (lora_r > 0); the adapters "
                             "target the language model")
        self.processor_kwargs = check_processor_kwargs(self.processor_kwargs) or None
        from bpo_fast.data.bad_samples import check_max_bad_fraction

        self.max_bad_fraction = check_max_bad_fraction(self.max_bad_fraction)
        if self.packing not in ("auto", True, False):
            raise ValueError(f"packing: expected 'auto', True or False, got {self.packing!r}")
        if not isinstance(self.resume, (str, bool, type(None))):  # `resume: 3` in a config
            raise ValueError(f"resume: expected true (the newest checkpoint in output) or a "
                             f"checkpoint folder, got {self.resume!r}")
        self._check_eval()
        if self.streaming:
            if self.max_steps is None:
                raise ValueError("streaming: the length of a stream is unknown; set max_steps "
                                 "(--max-steps)")
            if self.reference == "cached":
                raise ValueError("streaming: not with reference='cached' (the cache is checked "
                                 "against every pair id up front)")
            if self.num_workers:
                raise ValueError("streaming: reads in the main process; set num_workers 0")
        parse_dtype(self.dtype)
        if not isinstance(self.dtype, torch.dtype):
            self.dtype = canonical_dtype(self.dtype)
        if self.ref_dtype is not None:
            parse_dtype(self.ref_dtype)
            if not isinstance(self.ref_dtype, torch.dtype):
                self.ref_dtype = canonical_dtype(self.ref_dtype)

    def _check_eval(self):
        from bpo_fast.train.eval import parse_eval_sets, resolve_best_metric

        sets = parse_eval_sets(self.eval_data)   # validates the NAME=FILE syntax
        if not sets:
            for name in ("eval_image_root", "save_best"):
                if getattr(self, name):
                    raise ValueError(f"{name}: needs eval sets (eval_data, --eval-data)")
            if self.eval_every or self.eval_generate or self.eval_chair:
                raise ValueError("eval_every / eval_generate / eval_chair: need eval sets "
                                 "(eval_data, --eval-data)")
        if self.eval_chair and not self.eval_generate:
            raise ValueError("eval_chair: scores generated answers; set eval_generate "
                             "(--eval-generate N) too")
        if self.save_best:
            self.save_best, mode = resolve_best_metric(self.save_best, sets, self.save_best_mode,
                                                       chair=self.eval_chair)
            self.save_best_mode = mode

    def check_paths(self):
        """The inputs exist and are what they should be, the output can be written: before any
        work starts (raises :class:`bpo_fast.errors.UserError` naming the option)."""
        from bpo_fast.errors import input_dir, input_file, output_dir

        input_dir(self.model, "model", what="model directory (a save_pretrained folder)")
        from bpo_fast.data.hf_pairs import check_data_path

        check_data_path(self.data, "data")
        input_dir(self.image_root, "image_root", what="image directory")
        if self.ref_model:
            input_dir(self.ref_model, "ref_model",
                      what="model directory (a save_pretrained folder)")
        if self.reference == "cached":
            input_file(self.ref_cache, "ref_cache",
                       what="safetensors file from `bpo-fast ref-logps`")
        output_dir(self.output, "output")
        if self.resume not in (None, True, False, "", "latest"):
            input_dir(self.resume, "resume", what="checkpoint directory")
        if self.eval_data:
            from bpo_fast.train.eval import parse_eval_sets

            for name, path in parse_eval_sets(self.eval_data):
                check_data_path(path, "eval_data")
            if self.eval_image_root:
                input_dir(self.eval_image_root, "eval_image_root", what="image directory")
        if self.eval_chair_synonyms:
            input_file(self.eval_chair_synonyms, "eval_chair_synonyms", what="CHAIR synonym file",
                       text=True)

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        """The config from a dict of field names (e.g. a saved ``train_config.json``); an
        unknown key is an error naming it (a typo would otherwise be silently dropped)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in names)
        if unknown:
            raise ValueError(f"config: unknown option(s) {unknown}; expected some of "
                             f"{sorted(names)}")
        return cls(**d)


__all__ = ["TrainConfig", "RUN_SETTINGS", "parse_dtype", "DTYPES"]
