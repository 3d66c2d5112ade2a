"""``bpo-fast ref-logps``: precompute reference log-probs into a safetensors cache.

    bpo-fast ref-logps --model PATH --data pairs.jsonl --image-root DIR --out ref.safetensors

Resume-safe: rerun the same command after an interruption and it continues where it stopped.
Train with it: ``bpo-fast train ... --reference cached --ref-cache ref.safetensors`` (same
``--max-length``).
"""


def add_arguments(parser):
    parser.add_argument("--model", required=True, help="local path of the reference model")
    parser.add_argument("--data", required=True, help="preference pairs (JSONL)")
    parser.add_argument("--image-root", required=True, help="directory the image paths are relative to")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per forward (default 8)")
    parser.add_argument("--max-length", type=int, default=1024,
                        help="truncate rows to this many tokens; use the same value for training "
                             "(default 1024, as `bpo-fast train`)")
    parser.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                        help="reference dtype (auto: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--attn-implementation", default=None,
                        help="force an attention implementation (default: flash-attn if usable, else sdpa)")
    parser.add_argument("--strict", action="store_true", help="fail on the first bad record")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out (else it is refused)")
    parser.add_argument("--no-progress", action="store_true")


def run(args):
    import logging

    from bpo_fast.train.config import parse_dtype
    from bpo_fast.train.ref_cache import compute_reference_logps

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cache = compute_reference_logps(
        args.model, args.data, args.image_root, args.out, batch_size=args.batch_size,
        max_length=args.max_length, dtype=parse_dtype(args.dtype, args.device),
        device=args.device, temperature=args.temperature, strict=args.strict,
        attn_implementation=args.attn_implementation, progress=not args.no_progress,
        overwrite=args.overwrite)
    print(f"wrote reference log-probs of {len(cache)} pairs to {args.out}")
    return 0
