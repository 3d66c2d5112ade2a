"""GPU-readiness gate: every Triton kernel specialisation the launchers can pick compiles for
sm_80 and sm_90 under every supported Triton, without spills and within shared memory.

    python -m bpo_fast.tools.gpu_check [--versions 3.9.0,3.7.1,3.6.0] [--jobs 2] [--no-cache]

No GPU is needed. How it works:

1. **Record.** For each arch, the launchers of ``kernels/`` are called with ``meta`` tensors
   (shapes, dtypes and strides, no data) over the shape grid below, with
   ``kernels._PLAN_TARGET`` saying which GPU to plan for; each ``kernel[grid](...)`` launch is
   recorded instead of run (argument dtypes, 16-byte alignment of each pointer, the integer
   values, the constexprs, ``num_warps``/``num_stages``). Launches that Triton would compile
   alike are merged, so the grid yields its *distinct* specialisations, not one per shape.
2. **Compile.** Each Triton version runs in its own subprocess (``PYTHONPATH`` pointing at
   ``~/.cache/bpo-fast/triton-X``, installed there with ``pip install --no-deps --target`` on
   first use; the shared install is never touched). The subprocess binds the recorded arguments
   with that version's own specialisation code (so divisibility-by-16 and ``== 1`` attributes
   are exactly those a real launch gets), builds an ``ASTSource`` and runs ``triton.compile``
   for ``GPUTarget("cuda", arch, 32)``; registers and spills come from ptxas's ``-v`` log,
   shared memory from the compiled metadata (+ ptxas's static smem).
3. **Judge.** Any compile error, any spill, shared memory above the arch's per-block limit, or
   (fused LM-head kernels told that hidden rows are 16-byte aligned) a global load narrower
   than 16 bytes of a 2-byte operand fails the gate (exit 1). A table goes to stdout and ``bench/results/gpu-check.json``.

Results are cached in ``~/.cache/bpo-fast/gpu-check.json`` by a hash of (kernel module source,
Triton version, arch, specialisation); ``--no-cache`` recompiles everything.
"""

import argparse
import contextlib
import hashlib
import inspect
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

# the folder holding the bpo_fast package (the repository root in a checkout)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = (os.path.join(ROOT, "bench", "results", "gpu-check.json")
           if os.path.isdir(os.path.join(ROOT, "bench")) else "gpu-check.json")
CACHE_ROOT = os.environ.get("BPO_FAST_CACHE", os.path.join(os.path.expanduser("~"), ".cache",
                                                             "bpo-fast"))

# the Triton that CUDA torch 2.13.0 pins, and the oldest we support (pyproject's triton extra;
# torch 2.11's CUDA builds pair with 3.6); the installed one is added at run time
PINNED_TRITON = "3.7.1"
OLDEST_TRITON = "3.6.0"
ARCHS = {80: "A100", 90: "H100"}
# max shared memory per block (opt-in): A100 163 KB, H100 227 KB
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
SM_COUNT = {80: 108, 90: 132}

# the shape grid of the issue: pairs, sequence length, vocabulary, hidden size
GRID_B = (1, 2, 3, 8, 16, 64, 256)
GRID_T = (16, 17, 256, 1024, 4096, 16384)
GRID_V = (32000, 128256, 152064)
GRID_H = (2048, 4096, 8192)
DTYPES = ("float32", "bfloat16", "float16")


# ----------------------------------------------------------------------------------------------
# 1. record the launches
# ----------------------------------------------------------------------------------------------


def _ser(x):
    import torch

    if isinstance(x, torch.Tensor):
        # CUDA allocations start 512-byte aligned: the offset decides the alignment Triton sees
        return {"t": str(x.dtype).replace("torch.", ""),
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


class _Recorder:
    """Stands in for a @triton.jit function inside its module: ``kernel[grid](...)`` records."""

    def __init__(self, fn, module, sink):
        self.fn, self.module, self.sink = fn, module, sink
        self.nospec = _no_specialise(fn)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            ser = [_ser(a) for a in args]
            for a, (dns, dna) in zip(ser, self.nospec):
                if a and (("i" in a and dns) or ("t" in a and dna)):
                    a["ns"] = True
            self.sink.append({"module": self.module, "kernel": self.fn.__name__,
                              "args": ser,
                              "kwargs": {k: _ser(v) for k, v in kwargs.items()}})
        return launch


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
    KP._PLAN_TARGET = (arch, SM_COUNT[arch])
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
                lab = torch.empty(2 * B, T, dtype=torch.int64, **meta)
                tok = torch.empty(2 * B, T - 1, dtype=torch.float32, **meta)
                K.dpo_pairs(None, None, rc, rc, token_logps=tok, labels=lab, **kw)


def _launch_logprobs():
    import torch

    from bpo_fast.kernels import logprobs as K

    meta = dict(device="meta")
    for dt in DTYPES:
        for V in GRID_V:
            for T in GRID_T:
                for N in (2, 16):
                    x = torch.empty(N, T, V, dtype=getattr(torch, dt), **meta)
                    lab = torch.empty(N, T, dtype=torch.int64, **meta)
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
            for V in GRID_V:
                w = torch.empty(V, H, dtype=dtype, **meta)
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


def record_launches(archs=tuple(ARCHS)):
    """The distinct launches per arch: ``[{arch, module, kernel, args, kwargs}, ...]``."""
    jobs, seen = [], set()
    for arch in archs:
        sink = []
        with _recording(arch, sink):
            for f in LAUNCHERS:
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


def _load_widths(ptx):
    """Bytes per global load instruction in the PTX -> how many (``cp.async`` copies to shared
    memory and ``ld.global`` into registers; vector loads count their full width)."""
    out = {}
    for m in re.finditer(r"cp\.async\.(?:ca|cg)\.shared\.global(?:\.L2::\w+)?\s+\[[^]]+\],\s*"
                         r"\[[^]]+\],\s*(0x[0-9a-fA-F]+|\d+)", ptx):
        key = f"cp{int(m.group(1), 0)}"
        out[key] = out.get(key, 0) + 1
    for m in re.finditer(r"ld\.global(?:\.\w+)*?(?:\.v(\d))?\.(?:b|u|s|f)(\d+)", ptx):
        key = f"ld{int(m.group(1) or 1) * int(m.group(2)) // 8}"
        out[key] = out.get(key, 0) + 1
    return out


def _compile_one(job):
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
    t0 = time.time()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                           options=options.__dict__)
    res = _parse_ptxas(buf.getvalue())
    res["smem"] = int(k.metadata.shared) + res.pop("static_smem")
    res["loads"] = _load_widths(k.asm["ptx"])
    res["seconds"] = round(time.time() - t0, 2)
    res["spec"] = hashlib.sha256(repr((signature, sorted(constexprs.items()),
                                       sorted(attrs.items()), sorted(options.__dict__.items()))
                                      ).encode()).hexdigest()[:16]
    return res


def _worker(inp, out):
    os.environ.pop("TRITON_INTERPRET", None)
    with open(inp) as f:
        jobs = json.load(f)
    import triton

    results, done = [], {}
    for job in jobs:
        try:
            r = _compile_one(job)
            # the same compiled variant reached through different launches: report it once
            r["duplicate_of"] = done.get((job["arch"], r["spec"]))
            done.setdefault((job["arch"], r["spec"]), job["id"])
        except Exception as e:  # noqa: BLE001 -- every failure is a finding of the gate
            msg = f"{type(e).__name__}: {e}"
            r = {"error": msg[-2000:]}
        r.update(id=job["id"], triton=triton.__version__)
        results.append(r)
        with open(out + ".tmp", "w") as f:
            json.dump(results, f)
    os.replace(out + ".tmp", out)


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
    os.replace(tmp, path)
    print(f"installed triton {version} into {path} ({time.time() - t0:.0f} s)", flush=True)
    return path


def _source_hash(module):
    import importlib.util

    with open(importlib.util.find_spec(module).origin, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _job_key(job, version, src_hash):
    body = json.dumps({k: job[k] for k in ("arch", "module", "kernel", "args", "kwargs")},
                      sort_keys=True)
    return hashlib.sha256(f"{src_hash}|{version}|{body}".encode()).hexdigest()


def _run_worker(version, path, jobs, tmpdir, idx):
    inp = os.path.join(tmpdir, f"in-{version}-{idx}.json")
    out = os.path.join(tmpdir, f"out-{version}-{idx}.json")
    with open(inp, "w") as f:
        json.dump(jobs, f)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (path, ROOT) if p)
    env["TRITON_CACHE_DIR"] = os.path.join(tmpdir, f"cache-{version}-{idx}")
    env["TRITON_DUMP_PTXAS_LOG"] = "1"
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "bpo_fast.tools.gpu_check", "--worker", inp,
                           out], env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not os.path.exists(out):
        done = json.load(open(out + ".tmp")) if os.path.exists(out + ".tmp") else []
        ids = {r["id"] for r in done}
        err = (proc.stderr or proc.stdout)[-1500:]
        return done + [{"id": j["id"], "triton": version, "error": f"worker died: {err}"}
                       for j in jobs if j["id"] not in ids]
    with open(out) as f:
        return json.load(f)


def judge(row):
    """The reasons a compiled row fails the gate (empty: it passes)."""
    why = []
    if row.get("error"):
        why.append("compile error")
        return why
    if row.get("spill_stores") or row.get("spill_loads"):
        why.append(f"spills {row['spill_stores']}/{row['spill_loads']} B")
    if row.get("smem", 0) > SMEM_LIMIT[row["arch"]]:
        why.append(f"smem {row['smem']} > {SMEM_LIMIT[row['arch']]}")
    if row.get("row_align", 1) > 1 and row.get("loads"):
        # hidden rows announced 16-byte aligned must be read with 16-byte copies
        narrow = {k: v for k, v in row["loads"].items()
                  if (k.startswith("cp") and k != "cp16") or k == "ld2"}
        if narrow:
            why.append(f"narrow loads {narrow}")
    return why


def _table(rows):
    head = ("kernel", "config", "arch", "triton", "regs", "spills", "smem", "")
    lines = [head]
    for r in rows:
        if r.get("duplicate_of") is not None:
            continue
        sp = "-" if r.get("error") else f"{r.get('spill_stores', 0)}/{r.get('spill_loads', 0)}"
        lines.append((r["kernel"], r["config"], f"sm_{r['arch']}", r["triton"],
                      str(r.get("regs", "-")), sp, str(r.get("smem", "-")),
                      "FAIL: " + ", ".join(r["fail"]) if r["fail"] else "ok"))
    w = [max(len(x[i]) for x in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w[i]) for i, c in enumerate(x)).rstrip() for x in lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bpo_fast.tools.gpu_check",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--versions", help="comma-separated Triton versions (default: the installed "
                    f"one, {PINNED_TRITON} and {OLDEST_TRITON})")
    ap.add_argument("--archs", default="80,90", help="comma-separated (default 80,90)")
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
        assert all(x in ARCHS for x in archs)
    except (ValueError, AssertionError):
        ap.error(f"--archs: expected a comma-separated subset of {sorted(ARCHS)}, got {a.archs!r}")
    if a.jobs < 1:
        ap.error(f"--jobs: expected >= 1, got {a.jobs}")
    installed = _installed_triton()
    versions = (a.versions.split(",") if a.versions
                else sorted({v for v in (installed, PINNED_TRITON, OLDEST_TRITON) if v},
                            key=lambda v: tuple(int(x) for x in re.findall(r"\d+", v))))
    paths = {v: ensure_triton(v, installed) for v in versions}
    t_install = time.time() - t_start

    jobs = record_launches(archs)
    if a.kernels:
        names = a.kernels.split(",")
        jobs = [j for j in jobs if any(n in j["kernel"] for n in names)]
    for i, j in enumerate(jobs):
        j["id"] = i
        j["config"] = config_label(j)
    print(f"{len(jobs)} distinct launches x {len(versions)} Triton versions "
          f"({', '.join(versions)})", flush=True)

    cache_file = os.path.join(CACHE_ROOT, "gpu-check.json")
    cache = {}
    if not a.no_cache and os.path.exists(cache_file):
        with open(cache_file) as f:
            cache = json.load(f)
    src = {m: _source_hash(m) for m in {j["module"] for j in jobs}}
    rows, todo = [], []
    for v in versions:
        pending = []
        for j in jobs:
            key = _job_key(j, v, src[j["module"]])
            if key in cache:
                rows.append(dict(cache[key], id=j["id"], triton=v, cached=True))
            else:
                pending.append(dict(j, key=key))
        # split each version's work in --jobs shares, the expensive kernels dealt round-robin
        pending.sort(key=lambda j: j["kernel"])
        for i in range(a.jobs):
            share = pending[i::a.jobs]
            if share:
                todo.append((v, share))
    with tempfile.TemporaryDirectory(prefix="gpu-check.") as tmp, \
            ThreadPoolExecutor(max_workers=a.jobs) as ex:
        futs = [ex.submit(_run_worker, v, paths[v], share, tmp, i)
                for i, (v, share) in enumerate(todo)]
        by_id = {j["id"]: j for j in jobs}
        keys = {(v, j["id"]): j["key"] for v, share in todo for j in share}
        for fut in futs:
            for r in fut.result():
                rows.append(r)
                if not r.get("error", "").startswith("worker died"):
                    cache[keys[(r["triton"], r["id"])]] = {
                        k: v for k, v in r.items() if k not in ("id", "triton", "cached")}
    os.makedirs(os.path.dirname(cache_file), exist_ok=True)
    with open(cache_file + ".tmp", "w") as f:
        json.dump(cache, f)
    os.replace(cache_file + ".tmp", cache_file)

    for r in rows:
        j = by_id[r["id"]]
        r.update(kernel=j["kernel"], config=j["config"], arch=j["arch"],
                 row_align=(j["kwargs"].get("ROW_ALIGN") or {}).get("i", 1))
        r["fail"] = judge(r)
    rows.sort(key=lambda r: (r["kernel"], r["config"], r["arch"], r["triton"]))
    print(_table(rows))
    failed = [r for r in rows if r["fail"]]
    for r in failed:
        if r.get("error"):
            print(f"\n{r['kernel']} {r['config']} sm_{r['arch']} triton {r['triton']}:\n"
                  f"  {r['error'][-800:]}")
    elapsed = time.time() - t_start
    compiled = [r for r in rows if not r.get("cached") and "seconds" in r]
    summary = dict(
        passed=not failed, n_launches=len(jobs), n_rows=len(rows), n_failed=len(failed),
        triton_versions=versions, archs=[f"sm_{x}" for x in archs],
        smem_limit=SMEM_LIMIT, grid=dict(B=GRID_B, T=GRID_T, V=GRID_V, H=GRID_H, dtypes=DTYPES),
        seconds=dict(total=round(elapsed, 1), install=round(t_install, 1),
                     compile_cpu=round(sum(r["seconds"] for r in compiled), 1)),
        n_compiled=len(compiled), n_cached=len(rows) - len(compiled))
    if not a.kernels:
        os.makedirs(os.path.dirname(a.output), exist_ok=True)
        keep = ("kernel", "config", "arch", "triton", "regs", "spill_stores", "spill_loads",
                "stack", "smem", "loads", "fail", "error", "duplicate_of", "id")
        with open(a.output + ".tmp", "w") as f:
            json.dump(_results_file(summary, rows, keep, versions), f, indent=0)
        os.replace(a.output + ".tmp", a.output)
    print(f"\n{'PASS' if not failed else 'FAIL'}: {len(rows) - len(failed)}/{len(rows)} ok, "
          f"{len(jobs)} launches, Triton {', '.join(versions)}, {elapsed:.0f} s "
          f"({len(compiled)} compiled, {len(rows) - len(compiled)} cached)")
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
