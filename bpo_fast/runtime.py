"""Where and in what precision a command runs: one place for device, dtype and process-group
setup, used by ``train``, ``ref-logps`` and ``build-pairs``.

Vocabulary (the same in every command): devices ``cpu``, ``cuda``, ``cuda:N`` (default: CUDA
when available, ``cuda:LOCAL_RANK`` under torchrun); dtypes ``auto``, ``fp32``, ``bf16``,
``fp16`` (``float32``, ``bfloat16``, ``float16`` accepted too; ``auto``: bf16 on CUDA -- fp16
where the GPU has no bf16 -- and fp32 on the CPU).
"""

import os

import torch

from bpo_fast.options import canonical_dtype

__all__ = ["DTYPES", "parse_dtype", "resolve_device", "dist_env", "init_distributed"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_dtype(name, device=None):
    """A dtype name (or ``torch.dtype``) -> the ``torch.dtype``; ``auto`` depends on ``device``."""
    if isinstance(name, torch.dtype):
        return name
    try:
        key = "auto" if name is None else canonical_dtype(name)
    except Exception:
        raise ValueError(f"dtype: expected 'auto' or one of {list(DTYPES)} (or float32, "
                         f"bfloat16, float16), got {name!r}") from None
    if key != "auto":
        return DTYPES[key]
    dev = torch.device(device) if device is not None else \
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def dist_env(rank=None, world_size=None):
    """(rank, world_size, local_rank) from the arguments or torchrun's environment."""
    r = int(os.environ.get("RANK", 0)) if rank is None else int(rank)
    w = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else int(world_size)
    lr = int(os.environ.get("LOCAL_RANK", r if w > 1 else 0))
    if w < 1 or not 0 <= r < w:
        raise ValueError(f"rank/world_size: expected 0 <= rank < world_size, got {r}/{w}")
    return r, w, lr


def resolve_device(device=None, local_rank=0):
    """``device`` (or the default) as a ``torch.device``; a bare ``cuda`` becomes
    ``cuda:local_rank``. Asking for CUDA where there is none is an error naming ``device``."""
    if device is None:
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: expected cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {device!r} requested but CUDA is not available")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    return dev


def init_distributed(device=None):
    """Join torchrun's process group when there is one (nccl on CUDA, else gloo); returns
    ``(world, rank, device)`` with the CUDA device made current."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and device != "cpu" else "gloo"
        dist.init_process_group(backend)
    if dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    else:
        world, rank = 1, 0
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return world, rank, dev


def quiet_libraries():
    """Keep the libraries' own progress bars and info chatter (transformers' weight loading and
    saving, huggingface_hub) out of our output: a command shows one progress display, its own."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_warning()
    except ImportError:  # pragma: no cover
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass


class console:
    """``with console():`` around a long command: INFO logging of ``bpo_fast`` to stderr, written
    through tqdm so that log lines never tear the progress bar, and the libraries kept quiet."""

    def __enter__(self):
        import logging

        from tqdm.contrib.logging import logging_redirect_tqdm

        quiet_libraries()
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        self._redirect = logging_redirect_tqdm()
        self._redirect.__enter__()
        return self

    def __exit__(self, *exc):
        return self._redirect.__exit__(*exc)
