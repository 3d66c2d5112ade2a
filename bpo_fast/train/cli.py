"""``bpo-fast train``: DPO training of a vision-language model on preference pairs.

    bpo-fast train --model PATH --data pairs.jsonl --image-root DIR --output DIR [...]
    torchrun --nproc_per_node 8 -m bpo_fast.cli train ...      # FSDP2 over 8 GPUs

Every option maps to a field of :class:`bpo_fast.train.TrainConfig` (dashes -> underscores).
"""

import argparse


def _bool_or_auto(v):
    return {"auto": "auto", "on": True, "true": True, "off": False, "false": False}[v.lower()]


def add_arguments(parser):
    g = parser.add_argument_group("data and model")
    g.add_argument("--model", required=True, help="local path of the policy model (HF format)")
    g.add_argument("--data", required=True, help="preference pairs (JSONL)")
    g.add_argument("--image-root", required=True, help="directory the image paths are relative to")
    g.add_argument("--output", required=True, help="output directory (model, checkpoints, metrics.jsonl)")
    g.add_argument("--max-length", type=int, default=1024, help="tokens per row (default 1024)")
    g.add_argument("--strict", action="store_true", help="fail on the first bad record")

    g = parser.add_argument_group("reference")
    g.add_argument("--reference", choices=("model", "lora", "cached"), default=None,
                   help="frozen copy, LoRA adapters disabled, or a ref-logps cache "
                        "(default: lora with --lora-r, else model)")
    g.add_argument("--ref-model", default=None, help="reference weights (default: --model)")
    g.add_argument("--ref-cache", default=None, help="safetensors from `bpo-fast ref-logps`")
    g.add_argument("--ref-dtype", choices=("fp32", "bf16", "fp16"), default=None)

    g = parser.add_argument_group("loss")
    g.add_argument("--beta", type=float, default=0.1)
    g.add_argument("--loss-type", default="sigmoid", help="a DPO variant of bpo_fast.LOSS_TYPES")
    g.add_argument("--label-smoothing", type=float, default=0.0)
    g.add_argument("--rpo-alpha", type=float, default=None,
                   help="add this times the chosen answers' per-token NLL to the loss (RPO)")

    g = parser.add_argument_group("what trains")
    g.add_argument("--lora-r", type=int, default=0, help="LoRA rank on the language model (0: full)")
    g.add_argument("--lora-alpha", type=float, default=None, help="default 2 * r")
    g.add_argument("--lora-dropout", type=float, default=0.05)
    g.add_argument("--lora-target-modules", default=None,
                   help="comma-separated module names (matched as name suffixes) or a regex (matched against "
                        "the full module path) (default: the LLM's q/k/v/o/gate/up/down)")
    g.add_argument("--train-projector", action="store_true", help="also train the projector")
    g.add_argument("--train-vision", action="store_true", help="also train the vision tower")
    g.add_argument("--merge-lora", action="store_true", help="also write merged full weights")

    g = parser.add_argument_group("optimisation")
    g.add_argument("--learning-rate", "--lr", type=float, default=5e-6)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--warmup-steps", type=int, default=None)
    g.add_argument("--warmup-ratio", type=float, default=0.1)
    g.add_argument("--epochs", type=int, default=1)
    g.add_argument("--max-steps", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=4, help="pairs per process and micro-step")
    g.add_argument("--grad-accum", type=int, default=1)
    g.add_argument("--max-grad-norm", type=float, default=1.0)
    g.add_argument("--on-nonfinite", choices=("stop", "skip"), default="stop")

    g = parser.add_argument_group("runtime")
    g.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    g.add_argument("--device", default=None)
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--attn-implementation", default=None)
    g.add_argument("--packing", type=_bool_or_auto, default="auto", help="auto / on / off")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: at the end)")
    g.add_argument("--keep-checkpoints", type=int, default=None)
    g.add_argument("--resume", nargs="?", const=True, default=None,
                   help="continue from the newest checkpoint in --output, or from the given one")
    g.add_argument("--overwrite", action="store_true",
                   help="start over in an --output that holds an earlier run's checkpoints "
                        "(they are deleted)")
    g.add_argument("--num-workers", type=int, default=0)
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--log-every", type=int, default=1)


def config_from_args(args):
    from bpo_fast.train.config import TrainConfig

    d = {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "command"}
    d["progress"] = not d.pop("no_progress", False)
    return TrainConfig.from_dict(d)


def run(args):
    import logging

    from bpo_fast.train.trainer import train

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = train(config_from_args(args))
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():  # torchrun: leave cleanly
            dist.destroy_process_group()
    print(f"trained {result['steps']} steps; model in {result['output']}, metrics in "
          f"{result['metrics_path']}" + (f", skipped {result['skipped']} bad record(s)"
                                         if result["skipped"] else "")
          + (f", skipped {result['skipped_steps']} non-finite step(s)"
             if result.get("skipped_steps") else ""))
    return 0


if __name__ == "__main__":  # pragma: no cover
    p = argparse.ArgumentParser()
    add_arguments(p)
    raise SystemExit(run(p.parse_args()))
