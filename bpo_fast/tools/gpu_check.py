"""GPU-readiness gate: every Triton kernel specialisation the launchers can pick compiles for
every GPU architecture we support (sm_80, sm_86, sm_89, sm_90, sm_100, sm_120) under every
supported Triton, without spills, within shared memory, with 16-byte loads of the LM head's
operands and no 32-bit product of a runtime size or stride.

    python -m bpo_fast.tools.gpu_check [--versions 3.9.0,3.6.0] [--archs 80,120] [--jobs 2]

No GPU is needed. How it works:

1. **Record.** For each arch, the launchers of ``kernels/`` are called with ``meta`` tensors
   (shapes, dtypes and strides, no data) over the shape grid below, with
   ``kernels.target._PLAN_TARGET`` saying which GPU to plan for (so each arch gets the tiles its
   own row of the launchers' tables gives); each ``kernel[grid](...)`` launch is recorded
   instead of run (argument dtypes, 16-byte alignment of each pointer, the integer values, the
   constexprs, ``num_warps``/``num_stages``). Launches that Triton would compile alike are
   merged, so the grid yields its *distinct* specialisations, not one per shape.
2. **Compile.** Each Triton version runs in its own subprocesses (``PYTHONPATH`` pointing at
   ``~/.cache/bpo-fast/triton-X``, installed there with ``pip install --no-deps --target`` on
   first use; the shared install is never touched). A subprocess binds the recorded arguments
   with that version's own specialisation code (so divisibility-by-16 and ``== 1`` attributes
   are exactly those a real launch gets), builds an ``ASTSource`` and runs ``triton.compile``
   for ``GPUTarget("cuda", arch, 32)``; registers and spills come from ptxas's ``-v`` log,
   shared memory from the compiled metadata (+ ptxas's static smem), load widths from the PTX
   (each load traced to its source line by the ``.loc`` line info), 32-bit products from the
   TTIR.
3. **Judge** (:func:`judge`). A row fails on a compile error; on a missing ptxas log (no
   register/spill data is not "no spills"); on any spill; on shared memory above the arch's
   per-block limit; when a fused LM-head launch that promises 16-byte rows (hidden rows
   announced aligned by ``ROW_ALIGN``, a weight with contiguous 16-byte-aligned rows) reads
   them with narrower loads (the bias and the small per-row vectors are not judged); and on a
   32-bit integer product with a runtime integer argument (a size or stride) as a factor: such
   products are formed in 64 bits in the kernels, so that no shape or stride can wrap them.
   Exit 1 on any failure; a table goes to stdout and ``bench/results/gpu-check.json``.

**Faults of the machine are not findings.** A compile that fails because the machine is short
of something (``EAGAIN``/``BlockingIOError`` starting ptxas, ``ENOMEM``, ``MemoryError``, a
compiler or worker process killed) is retried with back-off (:data:`BACKOFF_S`); if it still
fails, its row says so and the gate fails without calling it a compile error. Only complete
measurements are cached (``~/.cache/bpo-fast/gpu-check.json``, keyed by kernel module source,
Triton version, arch, specialisation and :data:`GATE_VERSION`); errors and rows without ptxas
data never are, so a loaded machine cannot leave a red (or a falsely green) gate behind.
``--no-cache`` recompiles everything.
"""

import argparse
import ast
import collections
import contextlib
import errno
import functools
import hashlib
import inspect
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

# the folder holding the bpo_fast package (the repository root in a checkout)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = (os.path.join(ROOT, "bench", "results", "gpu-check.json")
           if os.path.isdir(os.path.join(ROOT, "bench")) else "gpu-check.json")
CACHE_ROOT = os.environ.get("BPO_FAST_CACHE", os.path.join(os.path.expanduser("~"), ".cache",
                                                             "bpo-fast"))
# what a cached row holds and how it was measured: bump it when that changes, so that rows
# measured by an older gate are never judged by this one
GATE_VERSION = 2

# The Triton versions the kernels are proven on, oldest first (the one place: pyproject.toml's
# triton floor is the first, tests/test_gpu_gate.py checks it). CUDA torch pins: 2.11 -> 3.6.0,
# 2.12 -> 3.7.0, 2.13 -> 3.7.1, 2.14 -> 3.8.x; 3.9.0 is the newest release (what a fresh CI
# install gets). An installed Triton outside this list is checked too.
TRITON_VERSIONS = ("3.6.0", "3.7.1", "3.8.0", "3.9.0")
OLDEST_TRITON = TRITON_VERSIONS[0]


class Arch(collections.namedtuple("Arch", "gpus smem sms")):
    """A GPU architecture the gate compiles for: examples of it, the most shared memory one block
    may use (bytes, with the opt-in), and the SM count the launchers plan for (it only decides
    how many programs split the vocabulary, a runtime argument: any count of the family gives
    the same compiled variants)."""


# Shared memory per block (opt-in), as CUTLASS's arch tables and the CUDA programming guide
# state it: sm_80 163 KB, sm_86/sm_89/sm_120 99 KB, sm_90/sm_100 227 KB. Every arch has 64K
# 32-bit registers per SM (255 per thread at most); sm_86/89/120 hold 1536 threads per SM,
# the others 2048.
ARCHS = {
    80: Arch("A100", 163 * 1024, 108),
    86: Arch("A10, A40, RTX 30xx", 99 * 1024, 84),
    89: Arch("L4, L40S, RTX 40xx", 99 * 1024, 142),
    90: Arch("H100, H200", 227 * 1024, 132),
    100: Arch("B200", 227 * 1024, 148),
    120: Arch("RTX 50xx, RTX PRO 6000 Blackwell", 99 * 1024, 188),
}

# the shape grid: pairs, sequence length, vocabulary (not a multiple of 16 too: 32001, 262208),
# hidden size; label dtypes the ops accept
GRID_B = (1, 2, 3, 8, 16, 64, 256)
GRID_T = (16, 17, 256, 1024, 4096, 16384)
GRID_V = (32000, 32001, 128256, 152064, 262144, 262208)
GRID_H = (2048, 4096, 8192)
DTYPES = ("float32", "bfloat16", "float16")
LABEL_DTYPES = ("int64", "int32")

# launches per worker process (~3 CPU-s to start one; a share's rows are cached as it ends)
SHARE_JOBS = 120
# back-off (seconds) before each retry of a compile that failed for want of a resource
BACKOFF_S = (0.5, 1, 2, 4, 8, 16)
# errno values that say "the machine is short of something now", not "this kernel is wrong"
TRANSIENT_ERRNOS = frozenset({errno.EAGAIN, errno.ENOMEM, errno.EMFILE, errno.ENFILE,
                              errno.EINTR})
# a compiler (ptxas) or worker process ended by one of these was killed (the OOM killer, a
# timeout), it did not fail
KILL_SIGNALS = frozenset({signal.SIGKILL, signal.SIGTERM})


# ----------------------------------------------------------------------------------------------
# 1. record the launches
# ----------------------------------------------------------------------------------------------


def _ser(x):
    if hasattr(x, "storage_offset"):  # a tensor (no torch import per argument: this is hot)
        # CUDA allocations start 512-byte aligned: the offset decides the alignment Triton sees
        return {"t": str(x.dtype)[6:],  # "torch.bfloat16" -> "bfloat16"
                "a16": (x.storage_offset() * x.element_size()) % 16 == 0}
    if isinstance(x, bool):
        return {"b": x}
    if isinstance(x, int):
        return {"i": x}
    if isinstance(x, float):
        return {"f": x}
    if x is None:
        return None
    if isinstance(x, str):
        return {"s": x}
    raise TypeError(f"cannot record a launch argument of type {type(x).__name__}")


def _canon(a):
    """What Triton specialises an argument on (its dtype; alignment; int == 1, % 16, width),
    less what the kernel's ``do_not_specialize*`` lists switch off (``ns``)."""
    if a is None or "f" in a:
        return "f" if a else None
    ns = a.get("ns", False)
    if "i" in a:
        v = a["i"]
        return ("i", -2 ** 31 <= v < 2 ** 31, v >= 2 ** 63) + (
            () if ns else (v == 1, v % 16 == 0))
    if "t" in a:
        return ("t", a["t"]) + (() if ns else (a["a16"],))
    return tuple(sorted(a.items()))


def _no_specialise(fn):
    """Per parameter: (do_not_specialize, do_not_specialize_on_alignment) of a @triton.jit
    function (a JITFunction, or an InterpretedFunction under TRITON_INTERPRET=1)."""
    if hasattr(fn, "params"):
        return [(p.do_not_specialize, p.do_not_specialize_on_alignment) for p in fn.params]
    names = list(inspect.signature(fn.fn).parameters)
    kw = getattr(fn, "kwargs", {})
    dns = set(kw.get("do_not_specialize") or ())
    dna = set(kw.get("do_not_specialize_on_alignment") or ())
    return [(n in dns or i in dns, n in dna or i in dna) for i, n in enumerate(names)]


# The fused LM-head kernels' matrix operands, by parameter name: the gate judges the width of
# their loads (a promise of 16-byte rows must give 16-byte loads); other loads (bias, per-row
# vectors, offsets) are not judged.
HIDDEN, WEIGHT = "h_ptr", "w_ptr"


def _wide_operands(names, args, kwargs):
    """Which matrix operands a fused LM-head launch must read with 16-byte loads: the hidden
    rows when the launcher announces them 16-byte aligned (``ROW_ALIGN > 1``), the weight when
    its rows are contiguous (k-stride 1) and start 16-byte aligned (a 16-aligned pointer and a
    row stride Triton sees divisible by 16). A transposed weight view is read as it comes."""
    arg = dict(zip(names, args))
    wide = []
    if HIDDEN in arg and (kwargs.get("ROW_ALIGN") or {}).get("i", 1) > 1:
        wide.append(HIDDEN)
    w, sv, sk = arg.get(WEIGHT), arg.get("stride_wv"), arg.get("stride_wk")
    if w and sv and sk and w["a16"] and sk["i"] == 1 and sv["i"] % 16 == 0:
        wide.append(WEIGHT)
    return wide


class _Recorder:
    """Stands in for a @triton.jit function inside its module: ``kernel[grid](...)`` records."""

    def __init__(self, fn, module, sink):
        self.fn, self.module, self.sink = fn, module, sink
        self.nospec = _no_specialise(fn)
        self.names = _param_names(fn)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            ser = [_ser(a) for a in args]
            kw = {k: _ser(v) for k, v in kwargs.items()}
            wide = _wide_operands(self.names, ser, kw)
            for a, (dns, dna) in zip(ser, self.nospec):
                if a and (("i" in a and dns) or ("t" in a and dna)):
                    a["ns"] = True
            self.sink.append({"module": self.module, "kernel": self.fn.__name__,
                              "args": ser, "kwargs": kw, "wide": wide})
        return launch


def _param_names(fn):
    """The parameter names of a @triton.jit function (compiled or interpreted)."""
    if hasattr(fn, "arg_names"):
        return list(fn.arg_names)
    return list(inspect.signature(fn.fn).parameters)


@contextlib.contextmanager
def _recording(arch, sink):
    import importlib

    import bpo_fast.kernels.target as KP

    mods = {m: importlib.import_module(f"bpo_fast.kernels.{m}") for m in ("dpo", "logprobs",
                                                                            "linear")}
    saved = []
    for name, mod in mods.items():
        for attr, val in list(vars(mod).items()):
            if (type(val).__name__ in ("JITFunction", "InterpretedFunction")
                    and attr.endswith("_kernel")):
                saved.append((mod, attr, val))
                setattr(mod, attr, _Recorder(val, f"bpo_fast.kernels.{name}", sink))
    old = KP._PLAN_TARGET
    KP._PLAN_TARGET = (arch, ARCHS[arch].sms)
    try:
        yield
    finally:
        KP._PLAN_TARGET = old
        for mod, attr, val in saved:
            setattr(mod, attr, val)


def _launch_dpo():
    import torch

    from bpo_fast.kernels import dpo as K

    meta = dict(device="meta")
    for B in GRID_B:
        rc = torch.empty(B, dtype=torch.float32, **meta)
        for lt in range(K.N_LOSS_TYPES):
            kw = dict(beta=0.1, loss_type=lt, label_smoothing=0.1, tau=0.05)
            for dt in ("float32", "bfloat16"):
                pc = torch.empty(2 * B, dtype=getattr(torch, dt), **meta)
                K.dpo_pairs(pc[:B], pc[B:], rc, rc, **kw)
                n = torch.empty(B, dtype=torch.int64, **meta)
                K.dpo_pairs(pc[:B], pc[B:], rc, rc, n, n, **kw)
            for T in GRID_T:
                tok = torch.empty(2 * B, T - 1, dtype=torch.float32, **meta)
                for ldt in LABEL_DTYPES:
                    lab = torch.empty(2 * B, T, dtype=getattr(torch, ldt), **meta)
                    K.dpo_pairs(None, None, rc, rc, token_logps=tok, labels=lab, **kw)


def _launch_logprobs():
    import torch

    from bpo_fast.kernels import logprobs as K

    meta = dict(device="meta")
    for dt in DTYPES:
        for V in GRID_V:
            for T in GRID_T:
                for N, ldt in ((n, ldt) for n in (2, 16) for ldt in LABEL_DTYPES):
                    x = torch.empty(N, T, V, dtype=getattr(torch, dt), **meta)
                    lab = torch.empty(N, T, dtype=getattr(torch, ldt), **meta)
                    lp, lse = K.forward(x, lab, -100, 1.0)
                    K.sequence_sums(lp, lab, -100)
                    g_tok = torch.empty(N, T - 1, dtype=torch.float32, **meta)
                    g_seq = torch.empty(N, dtype=torch.float32, **meta)
                    g0 = torch.empty((), dtype=torch.float32, **meta)
                    for out in (None, x):
                        K.backward(x, lab, lse, -100, 1.0, mode=K.MODE_TOKEN, g=g_tok, out=out)
                        K.backward(x, lab, lse, -100, 1.0, mode=K.MODE_SEQUENCE, g=g_seq,
                                   out=out)
                        for gl in (None, g0):
                            for gls in (None, g_seq[: N // 2]):
                                for glp in (None, g_seq):
                                    K.backward(x, lab, lse, -100, 1.0, mode=K.MODE_DPO, g=glp,
                                               g_loss=gl, g_losses=gls, dlosses=g_seq,
                                               B=N // 2, out=out)


# Gemma 2's final_logit_softcapping (the value does not matter: the cap is a runtime float, the
# SOFTCAP constexpr is what specialises)
SOFTCAPS = (None, 30.0)


def _launch_linear():
    import torch

    from bpo_fast.kernels import linear as K

    meta = dict(device="meta")
    f32 = torch.float32
    for dt in DTYPES:
        dtype = getattr(torch, dt)
        for H in GRID_H:
            for V, w in ((V, w) for V in GRID_V for w in (
                    torch.empty(V, H, dtype=dtype, **meta),
                    # a transposed view (an LM head tied to a [H, V] matrix): k-stride V
                    torch.empty(H, V, dtype=dtype, **meta).t())):
                b = torch.empty(V, dtype=dtype, **meta)
                for S in (1, 16, 1000, 8192, 65536):
                    hid = torch.empty(S, H, dtype=dtype, **meta)
                    roff = torch.empty(S, dtype=torch.int64, **meta)
                    tgt = torch.empty(S, dtype=torch.int64, **meta)
                    lse = torch.empty(S, dtype=f32, **meta)
                    gs = torch.empty(S, dtype=f32, **meta)
                    for bias in (None, b):
                        for cap in SOFTCAPS:
                            K.fused_forward(hid, roff, w, bias, tgt, 1.0, softcap=cap)
                        gh = torch.empty(S, H, dtype=f32, **meta)
                        gw = torch.empty(V, H, dtype=f32, **meta)
                        gb = torch.empty(V, dtype=f32, **meta)
                        for need in range(1, 8):
                            if need & 4 and bias is None:
                                continue
                            for det in (False, True):
                                for cap in SOFTCAPS:
                                    K.fused_backward(hid, roff, w, bias, tgt, lse, gs, 1.0,
                                                     gh=gh if need & 1 else None,
                                                     gw=gw if need & 2 else None,
                                                     gb=gb if need & 4 else None,
                                                     deterministic=det, softcap=cap)
                    # the cuBLAS strategy's row kernels over float32 chunks of the logits
                    for cv in sorted({min(V, c) for c in (4096, 16384, V)}):
                        z = torch.empty(S, cv, dtype=f32, **meta)
                        bv = None if bias is None else b[:cv]
                        m = torch.empty(S, dtype=f32, **meta)
                        for cap in SOFTCAPS:
                            K.lse_update(z, bv, tgt, m, m, m, 0, 1.0, softcap=cap)
                            K.lse_update(z, None, tgt, m, m, m, 0, 1.0, softcap=cap)
                            K.dlogits(z, None, tgt, lse, gs, 0, 1.0, dtype, softcap=cap)
                            K.dlogits(z, b[:cv], tgt, lse, gs, 0, 1.0, dtype, softcap=cap)


LAUNCHERS = (_launch_dpo, _launch_logprobs, _launch_linear)


def record_launches(archs=tuple(ARCHS), launchers=LAUNCHERS):
    """The distinct launches per arch: ``[{arch, module, kernel, args, kwargs, wide}, ...]``."""
    jobs, seen = [], set()
    for arch in archs:
        sink = []
        with _recording(arch, sink):
            for f in launchers:
                f()
        for j in sink:
            key = (arch, j["module"], j["kernel"], tuple(_canon(a) for a in j["args"]),
                   json.dumps(j["kwargs"], sort_keys=True))  # constexprs: verbatim
            if key not in seen:
                seen.add(key)
                jobs.append(dict(j, arch=arch))
    return jobs


def config_label(job):
    """Human-readable config of a launch: its constexprs, warps/stages, pointer dtypes."""
    kw = {k: (v.get("i", v.get("b", v.get("s", v.get("f")))) if isinstance(v, dict) else v)
          for k, v in job["kwargs"].items()}
    parts = [f"{k}={v}" for k, v in kw.items() if k not in ("num_warps", "num_stages")]
    parts.append(f"w{kw.get('num_warps', 4)}s{kw.get('num_stages', '-')}")
    dts = sorted({a["t"] for a in job["args"] if a and "t" in a} - {"int64", "float32"})
    if dts:
        parts.append("/".join(dts))
    if any(a and "t" in a and not a["a16"] and not a.get("ns") for a in job["args"]):
        parts.append("unaligned")
    ints = [a["i"] for a in job["args"] if a and "i" in a and not a.get("ns")]
    spec = "".join("1" if v == 1 else "D" if v % 16 == 0 else "." for v in ints)
    return " ".join(parts) + f" ints[{spec}]"


# ----------------------------------------------------------------------------------------------
# 2. compile (in a subprocess per Triton version)
# ----------------------------------------------------------------------------------------------


class _Ptr:
    """A pointer argument for Triton's binder: a dtype and an address of the right alignment."""

    def __init__(self, dtype, aligned):
        import torch

        self.dtype = getattr(torch, dtype)
        self._p = 0 if aligned else torch.empty((), dtype=self.dtype).element_size()

    def data_ptr(self):
        return self._p


def _parse_ptxas(log):
    regs = re.findall(r"Used (\d+) registers", log)
    st = re.findall(r"(\d+) bytes spill stores", log)
    ld = re.findall(r"(\d+) bytes spill loads", log)
    smem = re.findall(r"(\d+) bytes smem", log)
    stack = re.findall(r"(\d+) bytes stack frame", log)
    return dict(regs=int(regs[-1]) if regs else None,
                spill_stores=int(st[-1]) if st else None,
                spill_loads=int(ld[-1]) if ld else None,
                stack=int(stack[-1]) if stack else None,
                static_smem=int(smem[-1]) if smem else 0)


_FILE = re.compile(r'^\s*\.file\s+(\d+)\s+"([^"]+)"', re.M)
_LOC = re.compile(r"^\s*\.loc\s+(\d+)\s+(\d+)\s")
_CP = re.compile(r"\bcp\.async\.(?:ca|cg)\.shared\.global\b[^\[]*\[[^\]]+\],\s*\[[^\]]+\],\s*"
                 r"(0x[0-9a-fA-F]+|\d+)")
_LD = re.compile(r"\bld((?:\.[\w:]+)+)")


def _global_loads(ptx):
    """Each global load instruction of the PTX as ``(source file, line, kind)``: ``cpN`` for an
    N-byte ``cp.async`` copy to shared memory, ``ldN`` for an N-byte ``ld.global`` (vector
    loads count their full width). The source line is that of the last ``.loc`` before it."""
    files = {int(n): os.path.realpath(p) for n, p in _FILE.findall(ptx)}
    out, where = [], (None, None)
    for text in ptx.splitlines():
        m = _LOC.match(text)
        if m:
            where = (files.get(int(m.group(1))), int(m.group(2)))
            continue
        m = _CP.search(text)
        if m:
            out.append(where + (f"cp{int(m.group(1), 0)}",))
            continue
        m = _LD.search(text)
        if m:
            parts = m.group(1).split(".")[1:]
            if "global" not in parts:
                continue
            vec = next((int(x[1:]) for x in parts if re.fullmatch(r"v\d", x)), 1)
            bits = next((int(x[1:]) for x in reversed(parts) if re.fullmatch(r"[bsuf]\d+", x)),
                        None)
            out.append(where + (f"ld{vec * bits // 8}" if bits else "ld?",))
    return out


def _operand_lines(fn, operands):
    """``(file, {operand: source lines})``: the lines of each ``tl.load`` in ``fn``'s module whose
    address is built on one of the pointer parameters ``operands`` (``h_ptr + ...``); the
    kernels name a matrix operand the same way in every function that loads it."""
    path = os.path.realpath(inspect.getsourcefile(getattr(fn, "fn", fn)))
    with open(path) as f:
        tree = ast.parse(f.read())
    lines = {op: set() for op in operands}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load" and node.args):
            base = node.args[0]
            while isinstance(base, ast.BinOp):
                base = base.left
            if isinstance(base, ast.Name) and base.id in lines:
                lines[base.id].update(range(node.lineno, node.end_lineno + 1))
    return path, lines


def _operand_loads(loads, path, lines):
    """Per operand: load kind -> count, over the loads traced to its source lines."""
    out = {}
    for op, ls in lines.items():
        kinds = collections.Counter(k for f, line, k in loads if f == path and line in ls)
        out[op] = dict(kinds)
    return out


_V = r"%[\w$.#-]+"
_TT_FUNC = re.compile(r"tt\.func\s+(?:public\s+|private\s+)?@[\w$.]+\((.*?)\)\s*(?:attributes\b|\{)",
                      re.S)
_ALIAS = re.compile(rf"^\s*({_V})\s*=\s*tt\.(?:splat|broadcast|expand_dims|reshape)\s+({_V})",
                    re.M)
_MULI = re.compile(rf"^\s*({_V})\s*=\s*arith\.muli\s+({_V}),\s*({_V})(?:\s+overflow<[^>]*>)?"
                   r"\s*:\s*(i32|tensor<[^>]*xi32>)(?:\s+loc\((#loc\d*|[^)]*)\))?", re.M)
_LOC_DEF = re.compile(r"^(#loc\d*)\s*=\s*loc\((.*)\)\s*$", re.M)


def _i32_products(ttir):
    """The 32-bit integer products in a kernel's TTIR that have a runtime integer argument (a
    size or stride, possibly splat/broadcast to a tensor) as a factor, as readable strings;
    ``None`` when the TTIR has no kernel signature to read. Products of such an argument with
    a program id or an index can exceed 2^31 at large shapes; the kernels form them in 64 bits
    (an ``int64`` operand makes the product ``i64``), so this list must stay empty. Products
    of indices with constexprs (``pid * BM``) are bounded by the tensor sizes and not listed."""
    m = _TT_FUNC.search(ttir)
    if not m:
        return None
    args = set(re.findall(rf"({_V}):\s*i32\b", m.group(1)))
    alias = dict(_ALIAS.findall(ttir))
    locs = dict(_LOC_DEF.findall(ttir))

    def root(v):
        for _ in range(64):
            if v not in alias:
                break
            v = alias[v]
        return v

    def where(loc, depth=0):
        if not loc or depth > 32:
            return "?"
        loc = locs.get(loc, loc)
        f = re.match(r'"([^"]+)":(\d+)', loc)
        if f:
            return f"{os.path.basename(f.group(1))}:{f.group(2)}"
        inner = re.search(r"callsite\((#loc\d*)", loc) or re.search(r"\((#loc\d*)\)", loc)
        return where(inner.group(1), depth + 1) if inner else "?"

    out = []
    for res, x, y, _ty, loc in _MULI.findall(ttir):
        hit = [root(v) for v in (x, y) if root(v) in args]
        if hit:
            out.append(f"{res} = {root(x)} * {root(y)} at {where(loc)}")
    return out


def _spec(fn, signature, constexprs, attrs, options):
    """What Triton compiles a launch to (two launches with one spec share the binary): the
    function's source (with its callees') and how it is specialised."""
    return hashlib.sha256(repr((fn.cache_key, signature, sorted(constexprs.items()),
                                sorted(attrs.items()), sorted(options.__dict__.items()))
                               ).encode()).hexdigest()[:16]


def _compile_one(job, done=None):
    """Compile one recorded launch for its arch; the measurements of :func:`judge`. ``done``:
    spec -> (job id, row) of what this process compiled already (a launch with the same spec
    reuses that row instead of a compile whose ptxas log Triton's own cache would swallow)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = getattr(importlib.import_module(job["module"]), job["kernel"])

    def val(a):
        if a is None:
            return None
        if "t" in a:
            return _Ptr(a["t"], a["a16"])
        return next(v for k, v in a.items() if k != "ns")

    args = [val(a) for a in job["args"]]
    kwargs = {k: val(v) for k, v in job["kwargs"].items()}
    target = GPUTarget("cuda", job["arch"], 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    key = _spec(fn, signature, constexprs, attrs, options)
    if done is not None and key in done:
        first, row = done[key]
        return dict(row, duplicate_of=first, seconds=0.0, cpu_seconds=0.0)
    t0, c0 = time.time(), _cpu_seconds()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                           options=options.__dict__)
    cpu = _cpu_seconds() - c0
    res = _parse_ptxas(buf.getvalue())
    res["smem"] = int(k.metadata.shared) + res.pop("static_smem")
    loads = _global_loads(k.asm["ptx"])
    res["loads"] = dict(collections.Counter(kind for _, _, kind in loads))
    res["operand_loads"] = _operand_loads(loads, *_operand_lines(fn, (HIDDEN, WEIGHT)))
    res["i32_products"] = _i32_products(k.asm["ttir"])
    res["seconds"] = round(time.time() - t0, 2)
    res["cpu_seconds"] = round(cpu, 2)  # this process and ptxas: what a busy machine inflates less
    res["spec"] = key
    # the source compiled (the driver caches the row only under the hash it keyed it with)
    res["src"] = _source_hash(job["module"])
    res["duplicate_of"] = None
    return res


def _cpu_seconds():
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def transient_reason(exc):
    """Why ``exc`` is a fault of the machine (worth a retry), not of the kernel; None if it is
    not. Looks through the exception's causes (Triton raises its PTXASError from the
    CalledProcessError of ptxas)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, MemoryError):
            return "MemoryError"
        if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
            return f"{type(exc).__name__}: [Errno {exc.errno}] {exc.strerror}"
        rc = getattr(exc, "returncode", None)
        if isinstance(rc, int) and (-rc in KILL_SIGNALS or rc - 128 in KILL_SIGNALS):
            return f"{type(exc).__name__}: the compiler was killed ({rc})"
        exc = exc.__cause__ or exc.__context__
    return None


def _compile_retrying(job, done):
    """:func:`_compile_one`, retried with back-off while it fails for want of a resource: a
    row, an ``error`` row (a finding) or a ``transient`` row (no finding: no result)."""
    for attempt, pause in enumerate(BACKOFF_S + (None,)):
        try:
            return _compile_one(job, done)
        except Exception as e:  # noqa: BLE001 -- every failure is a finding, or a retry
            why = transient_reason(e)
            if why is None:
                return {"error": f"{type(e).__name__}: {e}"[-2000:]}
            if pause is None:
                return {"transient": why, "tries": attempt + 1}
            time.sleep(pause * (1 + random.random() / 2))


def _worker(inp, out):
    os.environ.pop("TRITON_INTERPRET", None)
    with open(inp) as f:
        jobs = json.load(f)
    import triton

    results, done = [], {}
    _write_json(out + ".tmp", results)  # started: a death from here on is a job's
    for job in jobs:
        r = _compile_retrying(job, done)
        if "spec" in r and r.get("duplicate_of") is None:
            done[r["spec"]] = (job["id"], r)
        r = dict(r, id=job["id"], triton=triton.__version__)
        results.append(r)
        _write_json(out + ".tmp", results)
    os.replace(out + ".tmp", out)


def _write_json(path, obj, indent=None):
    with open(path + ".part", "w") as f:
        json.dump(obj, f, indent=indent)
    os.replace(path + ".part", path)


# ----------------------------------------------------------------------------------------------
# 3. drive and judge
# ----------------------------------------------------------------------------------------------


def _installed_triton():
    out = subprocess.run([sys.executable, "-c", "import triton; print(triton.__version__)"],
                         capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    return out.stdout.strip() or None


def ensure_triton(version, installed):
    """The folder to put first on PYTHONPATH for ``version`` ('' for the installed one);
    installs it there once (``pip install --no-deps --target``)."""
    if version == installed:
        return ""
    path = os.path.join(CACHE_ROOT, f"triton-{version}")
    if os.path.exists(os.path.join(path, "triton", "__init__.py")):
        return path
    os.makedirs(CACHE_ROOT, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f"triton-{version}.", dir=CACHE_ROOT)
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--disable-pip-version-check", "--target", tmp, f"triton=={version}"],
                   check=True)
    try:
        os.replace(tmp, path)
    except OSError:  # another gate installed it meanwhile: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.exists(os.path.join(path, "triton", "__init__.py")):
            raise
    print(f"installed triton {version} into {path} ({time.time() - t0:.0f} s)", flush=True)
    return path


@functools.lru_cache(maxsize=None)
def _source_hash(module):
    import importlib.util

    with open(importlib.util.find_spec(module).origin, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _kernel_key(module, kernel):
    """What a kernel's compiled code depends on in our sources: Triton's hash of the @triton.jit
    function with every jit function and constexpr global it uses (editing a docstring or a
    launcher's tile table elsewhere in the module recompiles nothing: the tiles a launch uses
    are its constexprs, part of the job); the module file's hash where there is no such hash
    (under the interpreter)."""
    import importlib

    fn = getattr(importlib.import_module(module), kernel)
    try:
        return fn.cache_key
    except AttributeError:
        return _source_hash(module)


def _job_key(job, version, kernel_key):
    body = json.dumps({k: job[k] for k in ("arch", "module", "kernel", "args", "kwargs")},
                      sort_keys=True)
    return hashlib.sha256(f"{GATE_VERSION}|{kernel_key}|{version}|{body}".encode()).hexdigest()


def _worker_env(path, tmpdir, tag):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (path, ROOT, env.get("PYTHONPATH")) if p)
    env["TRITON_CACHE_DIR"] = os.path.join(tmpdir, f"cache-{tag}")
    env["TRITON_DUMP_PTXAS_LOG"] = "1"
    env["TRITON_ALWAYS_COMPILE"] = "1"  # a cache hit would compile without a ptxas log
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


def _worker_process(version, path, jobs, tmpdir, tag, env=None):
    """Run one worker over ``jobs``: ``(rows it finished, return code or None if it could not
    start, stderr tail, whether it got past its imports)``."""
    inp = os.path.join(tmpdir, f"in-{tag}.json")
    out = os.path.join(tmpdir, f"out-{tag}.json")
    _write_json(inp, jobs)
    try:
        proc = subprocess.run([sys.executable, "-m", "bpo_fast.tools.gpu_check", "--worker", inp,
                               out], env=env or _worker_env(path, tmpdir, tag),
                              capture_output=True, text=True)
    except OSError as e:
        if e.errno not in TRANSIENT_ERRNOS:
            raise
        return [], None, f"{type(e).__name__}: {e}", False
    for name in (out, out + ".tmp"):
        if os.path.exists(name):
            with open(name) as f:
                return json.load(f), proc.returncode, (proc.stderr or proc.stdout)[-1500:], True
    return [], proc.returncode, (proc.stderr or proc.stdout)[-1500:], False


def _run_worker(version, path, jobs, tmpdir, idx):
    """All rows of ``jobs`` under Triton ``version``. A worker that dies is replaced and the jobs
    it left are compiled by the next one: after a back-off when it was killed or could not
    start (a fault of the machine); a job in flight at every one of its deaths gets a row that
    says so (``transient``, or ``error`` for a crash: the compiler dying on a kernel is a
    finding)."""
    rows, deaths, left, attempt = [], collections.Counter(), list(jobs), 0
    while left:
        done, rc, err, started = _worker_process(version, path, left, tmpdir, f"{idx}.{attempt}")
        attempt += 1
        rows += done
        finished = {r["id"] for r in done}
        left = [j for j in left if j["id"] not in finished]
        if not left:
            break
        killed = rc is None or -rc in KILL_SIGNALS or rc - 128 in KILL_SIGNALS
        if not killed and not started:
            # the worker cannot even start (a broken install): every job left says why
            rows += [{"id": j["id"], "triton": version, "error": f"worker failed ({rc}): {err}"}
                     for j in left]
            break
        head = left[0]  # the job in flight when it died
        deaths[head["id"]] += 1
        n = deaths[head["id"]]
        if n > (len(BACKOFF_S) if killed else 1):
            what = "killed" if killed else "crashed"
            rows.append({"id": head["id"], "triton": version, "tries": n,
                         "transient" if killed else "error":
                         f"worker {what} ({rc}) {n} times compiling this: {err}"})
            left = left[1:]
        elif killed:
            time.sleep(BACKOFF_S[n - 1] * (1 + random.random() / 2))
    return rows


def cacheable(row):
    """Only complete measurements are cached: never an error (it may be fixed by a rerun of a
    repaired machine or install), never a row without ptxas or TTIR data."""
    return (not row.get("error") and not row.get("transient")
            and all(row.get(k) is not None for k in ("regs", "spill_stores", "spill_loads",
                                                     "smem", "loads", "operand_loads",
                                                     "i32_products")))


def judge(row):
    """The reasons a compiled row fails the gate (empty: it passes)."""
    if row.get("transient"):
        return [f"no result: the machine was short of resources ({row['transient'][:200]}; "
                f"{row.get('tries', 1)} tries): not a compile failure, not cached, rerun"]
    if row.get("error"):
        return ["compile error"]
    why = []
    missing = [k for k in ("regs", "spill_stores", "spill_loads") if row.get(k) is None]
    if missing:
        why.append(f"no ptxas data ({', '.join(missing)} missing)")
    if row.get("spill_stores") or row.get("spill_loads"):
        why.append(f"spills {row['spill_stores']}/{row['spill_loads']} B")
    limit = ARCHS[row["arch"]].smem
    if row.get("smem") is None:
        why.append("no shared-memory size")
    elif row["smem"] > limit:
        why.append(f"smem {row['smem']} > {limit}")
    for op in row.get("wide") or ():
        loads = (row.get("operand_loads") or {}).get(op)
        if not loads:
            why.append(f"no global loads of {op} found")
            continue
        narrow = {k: v for k, v in loads.items() if k not in ("cp16", "ld16")}
        if narrow:
            why.append(f"narrow loads of {op} {narrow}")
    if row.get("i32_products") is None:
        why.append("no TTIR to check for 32-bit products")
    elif row["i32_products"]:
        why.append("32-bit products of runtime integers: " + "; ".join(row["i32_products"]))
    return why


def _table(rows):
    head = ("kernel", "config", "arch", "triton", "regs", "spills", "smem", "")
    lines = [head]
    for r in rows:
        if r.get("duplicate_of") is not None:
            continue
        sp = ("-" if r.get("error") or r.get("transient")
              else f"{r.get('spill_stores')}/{r.get('spill_loads')}")
        lines.append((r["kernel"], r["config"], f"sm_{r['arch']}", r["triton"],
                      str(r.get("regs", "-")), sp, str(r.get("smem", "-")),
                      "FAIL: " + ", ".join(r["fail"]) if r["fail"] else "ok"))
    w = [max(len(x[i]) for x in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w[i]) for i, c in enumerate(x)).rstrip() for x in lines)


def _version_key(v):
    return tuple(int(x) for x in re.findall(r"\d+", v))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bpo_fast.tools.gpu_check",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--versions", help="comma-separated Triton versions (default: "
                    f"{', '.join(TRITON_VERSIONS)} and the installed one)")
    ap.add_argument("--archs", default=",".join(map(str, ARCHS)),
                    help="comma-separated compute capabilities (default: all, %(default)s)")
    ap.add_argument("--jobs", type=int, default=2, help="parallel compiler processes")
    ap.add_argument("--no-cache", action="store_true", help="recompile everything")
    ap.add_argument("--output", default=RESULTS, help="where the JSON table goes")
    ap.add_argument("--kernels", help="only kernels whose name contains one of these (comma-"
                    "separated); for development, the committed table is a full run")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return _worker(*a.worker)
    t_start = time.time()
    try:
        archs = tuple(int(x) for x in a.archs.split(","))
        assert archs and all(x in ARCHS for x in archs)
    except (ValueError, AssertionError):
        ap.error(f"--archs: expected a comma-separated subset of {sorted(ARCHS)}, got {a.archs!r}")
    if a.jobs < 1:
        ap.error(f"--jobs: expected >= 1, got {a.jobs}")
    installed = _installed_triton()
    versions = (a.versions.split(",") if a.versions
                else sorted({v for v in TRITON_VERSIONS + (installed,) if v}, key=_version_key))
    paths = {v: ensure_triton(v, installed) for v in versions}
    t_install = time.time() - t_start

    jobs = record_launches(archs)
    if a.kernels:
        names = a.kernels.split(",")
        jobs = [j for j in jobs if any(n in j["kernel"] for n in names)]
    for i, j in enumerate(jobs):
        j["id"] = i
        j["config"] = config_label(j)
    print(f"{len(jobs)} distinct launches over {len(archs)} archs x {len(versions)} Triton "
          f"versions ({', '.join(versions)})", flush=True)

    cache_file = os.path.join(CACHE_ROOT, "gpu-check.json")
    cache = {}
    if not a.no_cache and os.path.exists(cache_file):
        with open(cache_file) as f:
            cache = {k: v for k, v in json.load(f).items() if cacheable(v)}
    src = {m: _source_hash(m) for m in {j["module"] for j in jobs}}
    kkey = {(j["module"], j["kernel"]): None for j in jobs}
    kkey = {mk: _kernel_key(*mk) for mk in kkey}
    rows, todo = [], []
    for v in versions:
        pending = []
        for j in jobs:
            key = _job_key(j, v, kkey[(j["module"], j["kernel"])])
            if key in cache:
                rows.append(dict(cache[key], id=j["id"], triton=v, cached=True))
            else:
                pending.append(dict(j, key=key))
        # split each version's work in shares of at most SHARE_JOBS (a worker process each: its
        # rows are cached when it ends), the expensive kernels dealt round-robin
        pending.sort(key=lambda j: j["kernel"])
        n = max(a.jobs, -(-len(pending) // SHARE_JOBS))
        todo += [(v, pending[i::n]) for i in range(n) if pending[i::n]]
    by_id = {j["id"]: j for j in jobs}
    keys = {(v, j["id"]): j["key"] for v, share in todo for j in share}
    os.makedirs(os.path.dirname(cache_file), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check.") as tmp, \
            ThreadPoolExecutor(max_workers=a.jobs) as ex:
        futs = [ex.submit(_run_worker, v, paths[v], share, tmp, i)
                for i, (v, share) in enumerate(todo)]
        for fut in as_completed(futs):
            new = fut.result()
            rows += new
            # saved as each share ends: an interrupted run keeps what it measured; a row is
            # cached only if it was compiled from the source its key was made from
            cache.update((keys[(r["triton"], r["id"])], {
                k: v for k, v in r.items() if k not in ("id", "triton", "cached")})
                for r in new
                if cacheable(r) and r.get("src") == src[by_id[r["id"]]["module"]])
            _write_json(cache_file, cache)
    for r in rows:
        j = by_id[r["id"]]
        r.update(kernel=j["kernel"], config=j["config"], arch=j["arch"], wide=j["wide"])
        r["fail"] = judge(r)

    rows.sort(key=lambda r: (r["kernel"], r["config"], r["arch"], _version_key(r["triton"])))
    print(_table(rows))
    failed = [r for r in rows if r["fail"]]
    for r in failed:
        if r.get("error") or r.get("transient"):
            print(f"\n{r['kernel']} {r['config']} sm_{r['arch']} triton {r['triton']}:\n"
                  f"  {(r.get('error') or r.get('transient'))[-800:]}")
    elapsed = time.time() - t_start
    compiled = [r for r in rows if not r.get("cached") and "seconds" in r]
    per_arch = collections.Counter(f"sm_{r['arch']}" for r in rows)
    summary = dict(
        passed=not failed, n_launches=len(jobs), n_rows=len(rows), n_failed=len(failed),
        n_transient=sum(1 for r in rows if r.get("transient")),
        triton_versions=versions, archs=[f"sm_{x}" for x in archs],
        rows_per_arch={k: per_arch[k] for k in sorted(per_arch, key=lambda s: int(s[3:]))},
        smem_limit={x: ARCHS[x].smem for x in archs},
        grid=dict(B=GRID_B, T=GRID_T, V=GRID_V, H=GRID_H, dtypes=DTYPES, labels=LABEL_DTYPES,
                  weight=("contiguous", "transposed view")),
        seconds=dict(total=round(elapsed, 1), install=round(t_install, 1),
                     compile_wall=round(sum(r["seconds"] for r in compiled), 1),
                     compile_cpu=round(sum(r.get("cpu_seconds", 0) for r in compiled), 1)),
        n_compiled=len(compiled), n_cached=len(rows) - len(compiled))
    if not a.kernels:
        os.makedirs(os.path.dirname(os.path.abspath(a.output)), exist_ok=True)
        keep = ("kernel", "config", "arch", "triton", "regs", "spill_stores", "spill_loads",
                "stack", "smem", "loads", "operand_loads", "wide", "i32_products", "fail",
                "error", "transient", "duplicate_of", "id")
        _write_json(a.output, _results_file(summary, rows, keep, versions), indent=0)
    print(f"\n{'PASS' if not failed else 'FAIL'}: {len(rows) - len(failed)}/{len(rows)} ok, "
          f"{len(jobs)} launches ({', '.join(f'{k} {v}' for k, v in per_arch.items())} rows), "
          f"Triton {', '.join(versions)}, {elapsed:.0f} s ({len(compiled)} compiled, "
          f"{len(rows) - len(compiled)} cached)")
    return 0 if not failed else 1


def _results_file(summary, rows, keep, versions):
    """The gate's table in the bench results format (shared/BENCH.md): a compile check, not a
    timing, so every row's ``median_ms`` is null and ``gpu`` says no device ran it."""
    import datetime
    import subprocess

    import triton

    try:
        sha = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                      stderr=subprocess.DEVNULL, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        sha = None
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    return dict(
        bench="gpu_check", gpu="none (ahead-of-time compile for " + ", ".join(summary["archs"]) + ")",
        versions={"torch": torch_version, "triton": triton.__version__, "bpo_fast": sha,
                  "triton_checked": list(versions)},
        date=datetime.date.today().isoformat(), command="python -m bpo_fast.tools.gpu_check",
        summary=summary,
        rows=[dict(case=f"{r['kernel']} {r['config']} sm_{r['arch']} triton {r['triton']}",
                   impl="bpo_fast", median_ms=None, **{k: r.get(k) for k in keep})
              for r in rows])


if __name__ == "__main__":
    sys.exit(main())
