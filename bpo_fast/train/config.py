"""The training configuration: one dataclass, shared by :func:`bpo_fast.train.train` and the CLI."""

import dataclasses
from dataclasses import dataclass

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_dtype(name, device=None):
    """``"auto"`` -> bf16 on CUDA, fp32 elsewhere; ``"fp32"/"bf16"/"fp16"`` -> the torch dtype."""
    if name in (None, "auto"):
        dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.bfloat16 if dev.type == "cuda" else torch.float32
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype: expected 'auto' or one of {list(DTYPES)}, got {name!r}")
    return DTYPES[name]


@dataclass
class TrainConfig:
    """Everything :func:`bpo_fast.train.train` needs. Paths are local; nothing is downloaded.

    Batch sizes count *pairs*: ``batch_size`` per process and micro-step, the optimiser sees
    ``batch_size * grad_accum * world_size`` pairs per step.
    """

    # data and model
    model: str
    data: str
    image_root: str
    output: str
    max_length: int = 1024          # tokens per row (prompt + image tokens kept, responses cut)
    strict: bool = False            # raise on the first bad record instead of skipping it

    # reference: "model" (frozen copy), "lora" (adapters disabled), "cached" (ref_cache file);
    # None: "lora" when lora_r > 0, else "model"
    reference: str = None
    ref_model: str = None           # reference weights for "model" (default: model)
    ref_cache: str = None           # safetensors from `bpo-fast ref-logps` for "cached"
    ref_dtype: str = None           # reference dtype (default: dtype)

    # loss
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    rpo_alpha: float = None         # + rpo_alpha * NLL of the chosen answers (RPO; TRL's name)

    # what trains
    lora_r: int = 0                 # > 0: LoRA on the language model
    lora_alpha: float = None        # default 2 * lora_r
    lora_dropout: float = 0.05
    lora_target_modules: list = None  # default: the LLM's q/k/v/o/gate/up/down projections
    train_projector: bool = False
    train_vision: bool = False
    merge_lora: bool = False        # also write merged full weights at the end

    # optimisation
    learning_rate: float = 5e-6
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    warmup_steps: int = None        # default: warmup_ratio * total steps
    warmup_ratio: float = 0.1
    epochs: int = 1
    max_steps: int = None           # optimiser steps to run (overrides epochs; default: epochs x data)
    batch_size: int = 4
    grad_accum: int = 1
    max_grad_norm: float = 1.0      # <= 0 disables clipping
    on_nonfinite: str = "stop"      # a non-finite loss or gradient: "stop" the run or "skip" the step

    # runtime
    dtype: str = "auto"             # auto: bf16 on CUDA (fp32 master weights + autocast), fp32 on CPU
    device: str = None              # default: cuda if available
    gradient_checkpointing: bool = False
    attn_implementation: str = None  # default: flash_attention_2 when usable, else sdpa
    packing: object = "auto"        # padding-free rows (auto: with flash-attention)
    seed: int = 0
    save_every: int = 0             # checkpoint every N optimiser steps (0: only at the end)
    keep_checkpoints: int = None    # keep only the newest N checkpoints
    resume: object = None           # True: newest checkpoint under output; or a checkpoint path
    overwrite: bool = False         # start over in an output that holds an earlier run's checkpoints
    num_workers: int = 0
    progress: bool = True
    log_every: int = 1              # metrics.jsonl line every N steps

    def __post_init__(self):
        for name in ("batch_size", "grad_accum", "epochs"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise ValueError(f"max_steps: expected a positive int or None, got {self.max_steps!r}")
        if self.reference not in (None, "model", "lora", "cached"):
            raise ValueError(f"reference: expected 'model', 'lora', 'cached' or None, got "
                             f"{self.reference!r}")
        if self.reference is None:
            self.reference = "lora" if self.lora_r > 0 else "model"
        if self.reference == "lora" and self.lora_r <= 0:
            raise ValueError("reference: 'lora' needs lora_r > 0 (--lora-r)")
        if self.reference == "cached" and not self.ref_cache:
            raise ValueError("ref_cache: reference='cached' needs the cache file (--ref-cache)")
        if self.lora_r < 0:
            raise ValueError(f"lora_r: expected >= 0, got {self.lora_r}")
        if self.rpo_alpha is not None and not (isinstance(self.rpo_alpha, (int, float))
                                               and self.rpo_alpha >= 0):
            raise ValueError(f"rpo_alpha: expected a number >= 0 or None, got {self.rpo_alpha!r}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing: expected in [0, 0.5), got {self.label_smoothing}")
        if self.beta <= 0:
            raise ValueError(f"beta: expected > 0, got {self.beta}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length: expected >= 2, got {self.max_length}")
        if self.save_every < 0:
            raise ValueError(f"save_every: expected >= 0, got {self.save_every}")
        if self.merge_lora and self.lora_r <= 0:
            raise ValueError("merge_lora: needs LoRA (lora_r > 0)")
        if self.train_vision and self.lora_r > 0:
            raise ValueError("train_vision: not supported with LoRA (lora_r > 0); the adapters "
                             "target the language model")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout: expected in [0, 1), got {self.lora_dropout}")
        if self.learning_rate < 0:
            raise ValueError(f"learning_rate: expected >= 0, got {self.learning_rate}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay: expected >= 0, got {self.weight_decay}")
        if self.warmup_steps is not None and (not isinstance(self.warmup_steps, int)
                                              or self.warmup_steps < 0):
            raise ValueError(f"warmup_steps: expected an int >= 0 or None, got {self.warmup_steps!r}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"warmup_ratio: expected in [0, 1], got {self.warmup_ratio}")
        if not isinstance(self.log_every, int) or self.log_every < 1:
            raise ValueError(f"log_every: expected a positive int, got {self.log_every!r}")
        if self.keep_checkpoints is not None and (not isinstance(self.keep_checkpoints, int)
                                                  or self.keep_checkpoints < 1):
            raise ValueError(f"keep_checkpoints: expected a positive int or None, got "
                             f"{self.keep_checkpoints!r}")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"num_workers: expected an int >= 0, got {self.num_workers!r}")
        if self.on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite: expected 'stop' or 'skip', got {self.on_nonfinite!r}")
        if self.packing not in ("auto", True, False):
            raise ValueError(f"packing: expected 'auto', True or False, got {self.packing!r}")
        from bpo_fast.ops.dpo import LOSS_TYPES

        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type: expected one of {list(LOSS_TYPES)}, got {self.loss_type!r}")
        parse_dtype(self.dtype)
        if self.ref_dtype is not None:
            parse_dtype(self.ref_dtype)

    def check_paths(self):
        """The inputs exist and are what they should be, the output can be written: before any
        work starts (raises :class:`bpo_fast.errors.UserError` naming the option)."""
        from bpo_fast.errors import input_dir, input_file, output_dir

        input_dir(self.model, "model", what="model directory (a save_pretrained folder)")
        input_file(self.data, "data", what="preference pairs JSONL file", text=True)
        input_dir(self.image_root, "image_root", what="image directory")
        if self.ref_model:
            input_dir(self.ref_model, "ref_model", what="model directory (a save_pretrained folder)")
        if self.reference == "cached":
            input_file(self.ref_cache, "ref_cache", what="safetensors file from `bpo-fast ref-logps`")
        output_dir(self.output, "output")
        if self.resume not in (None, True, False, "", "latest"):
            input_dir(self.resume, "resume", what="checkpoint directory")

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


__all__ = ["TrainConfig", "parse_dtype", "DTYPES"]
