"""Shared benchmark plumbing: timing, ceilings, and the results file of ../shared/BENCH.md.

Every bench script builds rows with :func:`row`, measures with :func:`bench_ms` and
:func:`peak_mem_above`, and writes one JSON per GPU with :func:`write_results`.
"""

import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")


def vcd_add_diffusion_noise(image_tensor, noise_step, randn_like=torch.randn_like):
    """The public image-weakening helper (VCD / BPO code), the baseline of bench/noise.py and
    bench/pairs.py, as written there: the sigmoid schedule is rebuilt on the CPU on every call
    and indexed with a Python int. ``randn_like`` lets a check feed the same noise as ours."""
    num_steps = 1000
    betas = torch.linspace(-6, 6, num_steps)
    betas = torch.sigmoid(betas) * (0.5e-2 - 1e-5) + 1e-5
    alphas = 1 - betas
    alphas_prod = torch.cumprod(alphas, dim=0)
    alphas_bar_sqrt = torch.sqrt(alphas_prod)
    one_minus_alphas_bar_sqrt = torch.sqrt(1 - alphas_prod)
    noise = randn_like(image_tensor)
    return alphas_bar_sqrt[noise_step] * image_tensor + one_minus_alphas_bar_sqrt[noise_step] * noise


def git_sha():
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                       stderr=subprocess.DEVNULL).decode().strip()
    except Exception:
        return "unknown"


def versions(**extra):
    out = {"torch": torch.__version__, "bpo_fast": git_sha()}
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception:
        out["triton"] = None
    for name, mod in (("trl", "trl"), ("liger_kernel", "liger_kernel"), ("transformers", "transformers")):
        try:
            m = __import__(mod)
            out[name] = getattr(m, "__version__", "unknown")
        except Exception:
            pass
    out.update(extra)
    return out


def gpu_name():
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def gpu_slug():
    name = gpu_name().lower()
    for key in ("h200", "h100", "a100", "l40s", "l4", "a10", "b200", "4090", "3090"):
        if key in name:
            return key
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "cpu"


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_ms(fn, warmup=10, rep=50, quantiles=(0.5, 0.2, 0.8)):
    """(median, p20, p80) in ms. CUDA: triton's do_bench (events, cache flush); CPU: wall clock,
    at most ``$BPO_BENCH_MAX_REPS`` warmup and timed calls each when set (a rehearsal that only
    proves the rows run: ``gpu_session.sh --dry-run`` sets 1; the Triton interpreter takes
    seconds per call)."""
    if torch.cuda.is_available():
        try:
            from triton.testing import do_bench

            return tuple(do_bench(fn, warmup=warmup * 5, rep=rep * 5, quantiles=list(quantiles)))
        except ImportError:
            pass
    cap = int(os.environ.get("BPO_BENCH_MAX_REPS", 0)) or None
    for _ in range(min(max(1, warmup // 5), cap or warmup)):
        fn()
    sync()
    times = []
    for _ in range(min(max(3, rep // 5), cap or rep)):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = lambda p: times[min(len(times) - 1, int(p * len(times)))]  # noqa: E731
    return (statistics.median(times), q(quantiles[1]), q(quantiles[2]))


def peak_mem_above(fn):
    """Peak bytes allocated while ``fn`` runs, above what was allocated before (CUDA only)."""
    if not torch.cuda.is_available():
        return None
    sync()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync()
    return int(torch.cuda.max_memory_allocated() - base)


def copy_bandwidth_gbps(nbytes=1 << 30):
    """Measured device-to-device copy bandwidth, counting bytes read + bytes written."""
    if not torch.cuda.is_available():
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    src.random_()  # never time on zeros
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))[0]
    del src, dst
    return 2 * nbytes / (ms * 1e-3) / 1e9


def bf16_tflops(n=8192):
    """Measured bf16 matmul rate of the library's GEMM (TFLOP/s)."""
    if not torch.cuda.is_available():
        return None
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = bench_ms(lambda: a @ b)[0]
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def row(case, impl, median_ms=None, p20_ms=None, p80_ms=None, params=None, pass_=None,
        peak_mem_bytes=None, gbps=None, tflops=None, floor_ms=None, error=None, **extra):
    r = {"case": case, "params": params or {}, "impl": impl, "pass": pass_,
         "median_ms": median_ms, "p20_ms": p20_ms, "p80_ms": p80_ms,
         "peak_mem_bytes": peak_mem_bytes, "gbps": gbps, "tflops": tflops, "floor_ms": floor_ms}
    if error is not None:
        r["error"] = error
    r.update(extra)
    return r


def write_results(bench, rows, ceilings, command=None, extra_versions=None, path=None):
    """Write ``bench/results/<bench>-<gpu-slug>.json`` atomically; return its path."""
    os.makedirs(RESULTS, exist_ok=True)
    doc = {
        "bench": bench,
        "gpu": gpu_name(),
        "versions": versions(**(extra_versions or {})),
        "ceilings": ceilings,
        "date": datetime.date.today().isoformat(),
        "command": command or " ".join(["python"] + sys.argv),
        "rows": rows,
    }
    path = path or os.path.join(RESULTS, f"{bench}-{gpu_slug()}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return path


def print_table(rows, cols=("case", "impl", "pass", "median_ms", "gbps", "tflops", "peak_mem_bytes")):
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols} if rows else {}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in cols))


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)
