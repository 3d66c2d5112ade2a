"""``bpo-fast build-pairs``: bootstrap BPO preference pairs from LLaVA-format data.

Thin wrapper over :func:`bpo_fast.data.pairs.build_pairs`; every flag maps to a field of
:class:`bpo_fast.data.pairs.PairBuilderConfig`.
"""

import argparse
import json
import os
import sys

EPILOG = """\
examples:
  # both strategies, three noise levels, rule-based error injection
  bpo-fast build-pairs --model ckpt/llava-1.5-7b --data llava_instruct_150k.json \\
      --image-root coco/train2017 --out pairs.jsonl --noise-steps 200,500,800

  # error injection only, with the model's language backbone and our prompt template
  bpo-fast build-pairs --model ckpt/llava --data data.jsonl --out pairs.jsonl \\
      --strategies error_injection --injector llm

  # 8 GPUs: each rank writes pairs.rank{r}.jsonl; then merge
  torchrun --nproc-per-node 8 -m bpo_fast.cli build-pairs ... --out pairs.jsonl
  bpo-fast merge-pairs --out pairs.merged.jsonl pairs.jsonl

output: one JSON pair per line (id, image, prompt, chosen, rejected, strategy, noise_step,
injector, generation, seed, source_id, turn). Rejected answers that are empty or equal to the
chosen one (whitespace/case-insensitive) are dropped and counted. Unreadable images and
malformed records go to <out stem>.errors.jsonl (.errors.rank{r}.jsonl per rank) with the reason and line number; the run goes on.
A killed run loses at most the batch in flight: rerun with --resume.
"""


def _strategies(s):
    from bpo_fast.data.schema import STRATEGIES

    items = tuple(x.strip() for x in s.split(",") if x.strip())
    bad = [x for x in items if x not in STRATEGIES]
    if not items or bad:
        raise argparse.ArgumentTypeError(f"expected a comma list of {','.join(STRATEGIES)}, got {s!r}")
    return items


def _noise_steps(s):
    from bpo_fast.data.pairs import parse_noise_steps

    try:
        return parse_noise_steps(s)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(p):
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EPILOG
    io = p.add_argument_group("input and output")
    io.add_argument("--model", metavar="DIR",
                    help="saved LLaVA-style model + processor (save_pretrained folder); needed for "
                         "image_weakened and --injector llm")
    io.add_argument("--data", required=True, metavar="FILE",
                    help="LLaVA-format JSON array or JSONL (id, image, conversations)")
    io.add_argument("--image-root", metavar="DIR", help="directory the records' image paths are relative to")
    io.add_argument("--out", required=True, metavar="FILE",
                    help="output JSONL; under torchrun rank r writes <stem>.rank{r}.jsonl instead")
    io.add_argument("--errors", metavar="FILE", help="errors JSONL (default: <out stem>.errors.jsonl)")
    io.add_argument("--turns", choices=["first", "all"], default="first",
                    help="answer the first question only, or every gpt turn (earlier turns become "
                         "the prompt's history) (default: %(default)s)")
    io.add_argument("--limit", type=int, metavar="N", help="use only the first N records (for a try run)")
    io.add_argument("--resume", action="store_true",
                    help="continue an interrupted run: drop a torn last line, skip ids already written")
    io.add_argument("--overwrite", action="store_true", help="start over if --out exists")
    io.add_argument("--strict", action="store_true",
                    help="stop at the first malformed record (else it is logged to the errors "
                         "file with its line number and skipped)")

    st = p.add_argument_group("strategies")
    st.add_argument("--strategies", type=_strategies, default=("image_weakened", "error_injection"),
                    metavar="LIST", help="comma list of image_weakened,error_injection (default: both)")
    st.add_argument("--noise-steps", type=_noise_steps, default=(500,), metavar="LIST",
                    help="diffusion step(s) for image_weakened, e.g. 200,500,800: one pair per level, "
                         "each image decoded once; 'none' = clean image (default: 500)")
    st.add_argument("--noise-schedule", default="sigmoid",
                    help="beta schedule of the forward diffusion (bpo_fast.NoiseSchedule kinds, "
                         "e.g. sigmoid, linear, cosine) (default: %(default)s)")
    st.add_argument("--num-noise-steps", type=int, default=1000, metavar="T",
                    help="length of the noise schedule (default: %(default)s)")
    st.add_argument("--injector", choices=["rules", "llm"], default="rules",
                    help="error injection: 'rules' (deterministic rewriter, no model) or 'llm' (the "
                         "model's language backbone with our prompt) (default: %(default)s)")
    st.add_argument("--inject-template", metavar="FILE",
                    help="prompt template for --injector llm, with {question} and {answer} "
                         "(default: the packaged bpo_fast/resources/inject_template.txt)")
    st.add_argument("--lexicon", metavar="FILE",
                    help="JSON extending the rule injector's lexicon (keys: colors, attributes, spatial, "
                         "objects, plurals, places)")
    st.add_argument("--max-edits", type=int, default=2,
                    help="rule injector: at most this many words changed per answer (default: %(default)s)")

    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=256, help="(default: %(default)s)")
    g.add_argument("--min-new-tokens", type=int, default=0, help="(default: %(default)s)")
    g.add_argument("--inject-max-new-tokens", type=int, metavar="N",
                   help="cap for --injector llm rewrites (default: --max-new-tokens)")
    g.add_argument("--temperature", type=float, default=1.0, help="(default: %(default)s)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default: %(default)s)")
    g.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    g.add_argument("--seed", type=int, default=0,
                   help="seeds sampling, noise and the rule injector (default: %(default)s)")

    r = p.add_argument_group("runtime")
    r.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available; cuda:LOCAL_RANK "
                                    "under torchrun)")
    r.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="model dtype (default: auto = bfloat16 on CUDA, float32 on CPU)")
    r.add_argument("--batch-size", type=int, default=32,
                   help="records (images) per batch; output is appended and fsynced per batch "
                        "(default: %(default)s)")
    r.add_argument("--gen-batch-size", type=int,
                   help="rows per generate call (default: batch size x noise levels)")
    r.add_argument("--num-workers", type=int, default=4,
                   help="CPU worker processes decoding/resizing images (default: %(default)s)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--no-fsync", action="store_true",
                   help="flush without fsync per batch (faster on slow disks; a machine crash may "
                        "then lose more than one batch)")
    r.add_argument("--summary-json", metavar="FILE", help="also write the end summary as JSON")


def config_from_args(args):
    from bpo_fast.data.pairs import PairBuilderConfig

    return PairBuilderConfig(
        model=args.model, data=args.data, out=args.out, image_root=args.image_root,
        strategies=args.strategies, turns=args.turns, noise_steps=args.noise_steps,
        noise_schedule=args.noise_schedule, num_noise_steps=args.num_noise_steps,
        injector=args.injector, inject_template=args.inject_template, lexicon=args.lexicon,
        max_edits=args.max_edits, batch_size=args.batch_size, gen_batch_size=args.gen_batch_size,
        num_workers=args.num_workers, max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.min_new_tokens,
        inject_max_new_tokens=args.inject_max_new_tokens, do_sample=not args.greedy,
        temperature=args.temperature, top_p=args.top_p, seed=args.seed, device=args.device,
        dtype=args.dtype, resume=args.resume, overwrite=args.overwrite, errors=args.errors,
        limit=args.limit, progress=not args.no_progress, fsync=not args.no_fsync,
        strict=args.strict,
    )


def run(args):
    from bpo_fast.data.pairs import build_pairs
    from bpo_fast.errors import output_file

    if args.summary_json:
        output_file(args.summary_json, "--summary-json")
    summary = build_pairs(config_from_args(args))
    print(summary.format(), file=sys.stderr)
    if args.summary_json:
        tmp = args.summary_json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(summary.to_dict(), f, indent=1)
        os.replace(tmp, args.summary_json)
    return 0
