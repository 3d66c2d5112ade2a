"""``bpo-fast train``: DPO training of a vision-language model on preference pairs.

    bpo-fast train --model PATH --data pairs.jsonl --image-root DIR --output DIR [...]
    bpo-fast train --config run.yaml [--lr 1e-5 ...]          # options from a file
    torchrun --nproc_per_node 8 -m bpo_fast.cli train ...      # FSDP2 over 8 GPUs

The options are the fields of :class:`bpo_fast.train.TrainConfig` (declared once there, with
their help; see :mod:`bpo_fast.options`).
"""

import argparse


def add_arguments(parser):
    from bpo_fast.options import add_arguments as add_options
    from bpo_fast.train.config import TrainConfig

    add_options(parser, TrainConfig)


def config_from_args(args):
    from bpo_fast.options import from_args
    from bpo_fast.train.config import TrainConfig

    return from_args(TrainConfig, args)


def run(args):
    from bpo_fast.runtime import console, threads_for_command
    from bpo_fast.train.trainer import train

    config = config_from_args(args)
    try:
        with console(), threads_for_command(config.threads):
            result = train(config)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():  # torchrun: leave cleanly
            dist.destroy_process_group()
    print(f"trained {result['steps']} steps; model in {result['output']}, metrics in "
          f"{result['metrics_path']}" + (f", skipped {result['skipped']} bad sample(s) (named "
                                         f"in {result['errors_path']})"
                                         if result["skipped"] else "")
          + (f", skipped {result['skipped_steps']} non-finite step(s)"
             if result.get("skipped_steps") else ""))
    return 0


if __name__ == "__main__":  # pragma: no cover
    p = argparse.ArgumentParser()
    add_arguments(p)
    raise SystemExit(run(p.parse_args()))
