"""The library versions bpo-fast relies on, checked where it relies on them.

``pyproject.toml`` states the same floors for pip (``tests/test_versions.py`` keeps the two in
step); here they are checked at run time, because an older library does not fail, it computes
something else: below :data:`TRANSFORMERS` the VLM base forwards have no ``mm_encoder_outputs``
argument and swallow it through ``**kwargs``, so every family would run without its images.

- :data:`TRANSFORMERS`: checked when the model layer (``bpo_fast.models``) is imported;
- :data:`PALIGEMMA2_TRANSFORMERS`: checked by the PaliGemma adapter for a Gemma 2 text model;
- :func:`interpreter_problem`: Triton 3.6's CPU interpreter and numpy >= 2.4 do not go together
  (tests/conftest.py, which turns the interpreter on, stops on it). No requirement marker can tie
  numpy's version to Triton's, and the GPU path does not use numpy, so pyproject.toml does not
  bound numpy; the floor environment of .ci/run installs numpy < 2.4 beside Triton 3.6.

A version below its floor is the user's to fix: one line (:class:`bpo_fast.errors.UserError`,
exit 2 from the CLI) naming the installed and the needed version.
"""

from importlib import metadata

from packaging.version import Version

from bpo_fast.errors import UserError

__all__ = ["TRANSFORMERS", "PALIGEMMA2_TRANSFORMERS", "installed", "require",
           "interpreter_problem"]

# the first transformers whose VLM base forwards take precomputed image features
# (``mm_encoder_outputs``), through which models/vlm.py passes each pair's encoded images
TRANSFORMERS = "5.18.0"
# PaliGemma 2 (Gemma 2 text model): before 5.21 transformers runs Gemma 2 under SDPA, which
# cannot soft-cap the attention scores, and its log-probs drift from the eager forward
PALIGEMMA2_TRANSFORMERS = "5.21.0"


def installed(dist):
    """The installed version of distribution ``dist`` (the one ``import`` finds: the first on
    ``sys.path``), or None."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def require(dist, floor, what):
    """Raise :class:`UserError` (one line) unless ``dist`` >= ``floor`` is installed; ``what``
    says who needs it and why."""
    have = installed(dist)
    if have is not None and Version(have) >= Version(floor):
        return have
    found = f"{dist} {have} is installed" if have else f"{dist} is not installed"
    raise UserError(f"{found}; {what} needs {dist} >= {floor} (pip install '{dist}>={floor}')")


# the first Triton whose interpreter converts its 1-element arrays to Python ints explicitly;
# 3.6 calls int() on them (every runtime loop bound), which numpy 2.4 made a TypeError
_INTERPRETER_FIXED_TRITON = "3.7"
_INTERPRETER_BREAKING_NUMPY = "2.4"


def interpreter_problem(triton=None, numpy=None):
    """Why the Triton CPU interpreter (``TRITON_INTERPRET=1``) cannot run the kernels with these
    versions (default: the installed ones), or None."""
    triton = triton or installed("triton")
    numpy = numpy or installed("numpy")
    if triton is None or numpy is None:
        return None
    if Version(triton) < Version(_INTERPRETER_FIXED_TRITON) and \
            Version(numpy) >= Version(_INTERPRETER_BREAKING_NUMPY):
        return (f"Triton {triton}'s CPU interpreter (TRITON_INTERPRET=1) fails with numpy "
                f"{numpy} (TypeError: only 0-dimensional arrays can be converted to Python "
                f"scalars): pip install 'numpy<{_INTERPRETER_BREAKING_NUMPY}' or "
                f"'triton>={_INTERPRETER_FIXED_TRITON}'")
    return None
