"""``bpo-fast ref-logps``: precompute reference log-probs into a safetensors cache.

    bpo-fast ref-logps --model PATH --data pairs.jsonl --image-root DIR --out ref.safetensors

Resume-safe: rerun the same command after an interruption and it continues where it stopped.
Train with it: ``bpo-fast train ... --reference cached --ref-cache ref.safetensors`` (same
``--max-length``).
"""

from dataclasses import dataclass

from bpo_fast.options import (DTYPE_CHOICES, canonical_dtype, max_bad_fraction_option, option,
                              parse_device, processor_kwargs_option)


@dataclass
class RefLogpsOptions:
    """The options of ``bpo-fast ref-logps``."""

    model: str = option(None, help="local path of the reference model (HF save_pretrained "
                                   "folder)", metavar="DIR", required=True)
    data: str = option(None, help="preference pairs: our JSONL, official BPO records, or a "
                                  "JSON/JSONL/Parquet/Arrow file or folder (HF datasets) in our "
                                  "schema or TRL's preference formats", metavar="FILE",
                       required=True)
    data_format: str = option("auto", help="reader of --data: pairs, hf (datasets) or auto (as "
                                           "`bpo-fast train`)", choices=("auto", "pairs", "hf"))
    image_root: str = option(None, help="directory the image paths are relative to",
                             metavar="DIR", required=True)
    out: str = option(None, help="output .safetensors file", metavar="FILE", required=True)
    overwrite: bool = option(False, help="replace an existing --out (else it is refused)")
    batch_size: int = option(8, help="pairs per forward", bounds="[1, inf)")
    max_length: int = option(1024, help="truncate rows to this many tokens; use the same value "
                                        "for training (train's default too)", bounds="[2, inf)",
                             nullable=True)
    dtype: str = option("auto", help="reference dtype (auto: bf16 on CUDA, fp32 on CPU)",
                        type=canonical_dtype, choices=DTYPE_CHOICES)
    device: str = option(None, help="cpu, cuda or cuda:N", type=parse_device, metavar="DEVICE",
                         default_text="cuda if available")
    temperature: float = option(1.0, help="score at this temperature (training needs 1.0)",
                                bounds="(0, inf)")
    attn_implementation: str = option(None, help="force an attention implementation",
                                      default_text="flash_attention_2 when usable, else sdpa")
    strict: bool = option(False, help="fail on the first bad record")
    errors: str = option(None, help="errors JSONL: the bad samples, named and left out of the "
                                    "cache", metavar="FILE",
                         default_text="<out stem>.errors.jsonl")
    max_bad_fraction: float = max_bad_fraction_option()
    processor_kwargs: dict = processor_kwargs_option()
    chat_template: str = option(None, help="a Jinja chat template, or a file holding one; use "
                                           "the same one for training", metavar="TEMPLATE",
                                default_text="the processor's own, else the model family's "
                                             "documented default (bpo_fast.models.vlm)")
    progress: bool = option(True, help="no progress bar", cli="no-progress")


def add_arguments(parser):
    from bpo_fast.options import add_arguments as add_options

    add_options(parser, RefLogpsOptions)


def run(args):
    from bpo_fast.errors import check_no_overlap
    from bpo_fast.options import config_file_of, from_args
    from bpo_fast.runtime import console
    from bpo_fast.train.ref_cache import compute_reference_logps, errors_path

    o = from_args(RefLogpsOptions, args)
    check_no_overlap({"out": o.out, "errors": o.errors}, {"--config": config_file_of(o)})
    with console():
        cache = compute_reference_logps(
            o.model, o.data, o.image_root, o.out, batch_size=o.batch_size,
            max_length=o.max_length, dtype=o.dtype, device=o.device, temperature=o.temperature,
            strict=o.strict, attn_implementation=o.attn_implementation, progress=o.progress,
            overwrite=o.overwrite, chat_template=o.chat_template, data_format=o.data_format,
            processor_kwargs=o.processor_kwargs, max_bad_fraction=o.max_bad_fraction,
            errors=o.errors)
    n_bad = int(cache.metadata.get("skipped") or 0)
    print(f"wrote reference log-probs of {len(cache)} pairs to {o.out}"
          + (f"; {n_bad} bad sample(s) left out, named in "
             f"{o.errors or errors_path(o.out)}" if n_bad else ""))
    return 0
