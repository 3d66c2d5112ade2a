"""``bpo-fast generate``: a model's answers to questions about images, for ``eval-chair`` and
``eval-pope``.

Thin wrapper over :func:`bpo_fast.eval.generate.generate`; the options are the fields of
:class:`bpo_fast.eval.generate.GenerateOptions` (declared once there, with their help).
"""

import argparse
import sys

EPILOG = """\
examples:
  # captions of held-out images (LLaVA records), scored with CHAIR
  bpo-fast generate --model runs/bpo --data eval.json --image-root images --out captions.jsonl
  bpo-fast eval-chair --captions captions.jsonl --ground-truth objects.jsonl

  # POPE: write the questions, answer them (a LoRA adapter on its base), score the answers
  bpo-fast eval-pope --ground-truth objects.jsonl --write-questions pope_q.jsonl
  bpo-fast generate --model runs/bpo-lora --base-model ckpt/llava-1.5-7b --data pope_q.jsonl \\
      --image-root images --out pope_a.jsonl --max-new-tokens 8
  bpo-fast eval-pope --ground-truth objects.jsonl --questions pope_q.jsonl --answers pope_a.jsonl

  # every image of a folder, one prompt; 8 GPUs (rank 0 merges the ranks' answers into --out)
  torchrun --nproc-per-node 8 -m bpo_fast.cli generate --model runs/bpo --image-root imgs \\
      --prompt "Describe the image." --out captions.jsonl

output: one JSON line per question, {"id", "question_id", "image", "question", "answer"}
(question files: "image_id" too). Greedy by default; --sample draws each answer from its own
seed (--seed and the question's id), so answers do not depend on --batch-size or the number of
ranks. A killed run loses at most the batch in flight: rerun with --resume. Bad samples (a
malformed record, an empty question, an image that does not decode, a question the model's family
or processor cannot take) are named in <out stem>.errors.jsonl (file, id, line, reason, kind) and
skipped; more than --max-bad-fraction of the questions stops the run (exit 2; 0 stops at the
first). Under torchrun rank 0 merges the ranks' errors files there too.
"""


def add_arguments(p):
    from bpo_fast.eval.generate import GenerateOptions
    from bpo_fast.options import add_arguments as add_options

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EPILOG
    add_options(p, GenerateOptions)


def run(args):
    from bpo_fast.eval.generate import GenerateOptions, generate
    from bpo_fast.options import from_args
    from bpo_fast.runtime import console, threads_for_command

    opts = from_args(GenerateOptions, args)
    try:
        with console(), threads_for_command(opts.threads):
            if _world() > 1:
                from bpo_fast.runtime import init_distributed

                init_distributed(opts.device)   # the ranks meet at the end: rank 0 merges
            summary = generate(opts)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():  # torchrun: leave cleanly
            dist.destroy_process_group()
    print(summary.format(), file=sys.stderr)
    return 0


def _world():
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))
