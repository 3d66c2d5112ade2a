"""Loading of the compiled extension ``bpo_fast._C`` and what it was built with.

The extension registers its ops with ``TORCH_LIBRARY(bpo_fast, ...)``; importing it makes
``torch.ops.bpo_fast.*`` available. When it is missing (``BPO_FAST_SKIP_EXT=1`` build, a failed
build, a source checkout), every op falls back to its pure-PyTorch implementation and a single
warning says so.
"""

import importlib
import json
import os
import warnings

_state = {"loaded": None, "error": None, "warned": False}


def load_extension():
    """Import ``bpo_fast._C`` once; return True when it is available."""
    if _state["loaded"] is None:
        try:
            import torch  # noqa: F401  (the extension links against libtorch)

            importlib.import_module("bpo_fast._C")
            _state["loaded"] = True
        except Exception as exc:  # ImportError, undefined symbol from a torch mismatch, ...
            _state["loaded"] = False
            _state["error"] = f"{type(exc).__name__}: {exc}"
    return _state["loaded"]


def warn_fallback(op_name):
    """Say once per process that the compiled extension is missing and ``op_name`` falls back."""
    if not _state["warned"]:
        _state["warned"] = True
        warnings.warn(
            f"bpo_fast: compiled extension bpo_fast._C is not available ({_state['error']}); "
            f"{op_name} and the other compiled ops use their pure-PyTorch fallbacks "
            "(same semantics, different random stream, slower). Rebuild with "
            "`pip install --no-build-isolation .` to get the fast path.",
            RuntimeWarning,
            stacklevel=3,
        )


def _build_info():
    path = os.path.join(os.path.dirname(__file__), "_build_info.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def extension_info():
    """What was built and what is loaded: a dict with keys

    ``available`` (the extension imported), ``cuda`` (built with CUDA kernels), ``archs``
    (CUDA architectures compiled for), ``built_with_torch``, ``cuda_version``, ``error``
    (why it could not be imported), ``ops`` (the registered ``torch.ops.bpo_fast`` op names).
    """
    import torch

    available = load_extension()
    info = _build_info()
    ops = []
    if available:
        ns = torch.ops.bpo_fast
        for name in ("diffusion_noise",):
            try:
                getattr(ns, name)
                ops.append(name)
            except (AttributeError, RuntimeError):
                pass
    return {
        "available": bool(available),
        "cuda": bool(available and info.get("cuda", False)),
        "archs": info.get("archs") if available else None,
        "built_with_torch": info.get("torch"),
        "cuda_version": info.get("cuda_version"),
        "git": info.get("git"),
        "error": _state["error"],
        "ops": ops,
    }
