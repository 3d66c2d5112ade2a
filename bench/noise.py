"""Benchmark: batched diffusion noising of uint8 images (BPO's image-weakened prompting).

    python bench/noise.py --all      # GPU: the full grid, writes bench/results/noise-<gpu>.json
    python bench/noise.py --smoke    # CPU: tiny shapes, checks every path, writes nothing

Grid (issue 2): B in {8, 64, 256} images of 3 x 336 x 336 uint8 (NCHW), K in {1, 4} noise
levels per image, output bf16 and fp32, CLIP normalisation, the sigmoid schedule.

Rows:
- ``bpo_fast``           ``diffusion_noise(..., check_timesteps=False)``: one kernel, noise drawn
                         in-kernel, each image read once for its K levels
- ``bpo_fast_checked``   the same with the default host-side timestep range check (one sync)
- ``bpo_fast_nhwc``      the same from channels-last ``[B, H, W, C]`` uint8 (decoded-image layout)
- ``torch_per_image``    the widespread VCD-style helper, per image and level: schedule rebuilt
                         on every call, uint8 -> float, normalise, ``randn_like``, mul-add
- ``torch_batched``      the same math batched in eager PyTorch, schedule tables cached
- ``torch_compile``      ``torch.compile`` of ``torch_batched`` (Inductor fuses and draws its own
                         Philox noise in-kernel): the strongest PyTorch baseline

gbps = (bytes read + bytes written) / time with bytes = B*C*H*W (uint8 in) + B*K*C*H*W*out_size;
floor_ms = those bytes / the device-to-device copy bandwidth measured in the same run
(``ceilings.copy_gbps``, counting read + write); ``frac_copy_bw`` = floor_ms / median_ms;
``speedup_vs_*`` on our rows = baseline median / ours. Each row first checks its output: ours
and the eager baselines exactly against ``diffusion_noise_reference`` fed with the same noise;
``torch_compile`` (its own RNG) by the statistics of the noise recovered from its output.
"""

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402
from bpo_fast.ops.noise import (CLIP_MEAN, CLIP_STD, DEFAULT_SCHEDULE,  # noqa: E402
                                diffusion_noise, diffusion_noise_reference,
                                philox_normal_reference)

SEED = 1234


# ----------------------------------------------------------------------------- baselines

def torch_per_image(x, ts_list, out_dtype, randn_like=torch.randn_like):
    """Per image: uint8 -> float, normalise (the CLIP processor's math), then per level the
    helper. ``ts_list``: the timesteps as Python ints (as the helper takes them: no sync)."""
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(-1, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(-1, 1, 1)
    outs = []
    for b in range(x.shape[0]):
        x0 = (x[b].float() / 255.0 - mean) / std
        for t in ts_list[b]:
            outs.append(common.vcd_add_diffusion_noise(x0, t, randn_like).to(out_dtype))
    return outs


def _torch_batched_fn(sab, s1mab, mean, std, out_dtype):
    def fn(x, ts, eps=None):
        u = x.float() / 255.0
        x0 = ((u - mean) / std).unsqueeze(1)
        B, K = ts.shape
        a = sab[ts].view(B, K, 1, 1, 1)
        s = s1mab[ts].view(B, K, 1, 1, 1)
        if eps is None:
            eps = torch.randn((B, K) + tuple(x.shape[1:]), device=x.device)
        return (a * x0 + s * eps).to(out_dtype)
    return fn


# ----------------------------------------------------------------------------- checks

def _reference(x, ts, out_dtype, eps):
    return diffusion_noise_reference(x, ts, out_dtype=out_dtype, noise=eps)


def _check_close(got, want, what):
    tol = dict(rtol=1e-5, atol=3e-5) if want.dtype == torch.float32 else dict(rtol=1.6e-2, atol=2e-2)
    torch.testing.assert_close(got.float(), want.float(), **tol, msg=lambda m: f"{what}: {m}")


def _check_statistics(out, x, ts, what):
    """eps = (out - a x0) / s must look N(0, 1) (for paths whose RNG we cannot feed)."""
    u = x.float() / 255.0
    m = torch.tensor(CLIP_MEAN, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(CLIP_STD, device=x.device).view(1, -1, 1, 1)
    x0 = ((u - m) / s).unsqueeze(1)
    sab, s1 = DEFAULT_SCHEDULE.tables(x.device)
    B, K = ts.shape
    eps = (out.float() - sab[ts].view(B, K, 1, 1, 1) * x0) / s1[ts].view(B, K, 1, 1, 1)
    tol = 0.02 if out.dtype == torch.float32 else 0.05
    mean, std = float(eps.mean()), float(eps.std())
    if abs(mean) > tol or abs(std - 1) > tol:
        raise AssertionError(f"{what}: recovered noise has mean {mean:.4f}, std {std:.4f}")


# ----------------------------------------------------------------------------- the grid

def run_case(B, K, out_dtype, C, H, W, device, copy_gbps, impls):
    g = torch.Generator().manual_seed(B * 100 + K)
    x = torch.randint(0, 256, (B, C, H, W), dtype=torch.uint8, generator=g).to(device)
    # high noise levels: the recovered-noise checks are well conditioned there
    ts = torch.randint(200, 1000, (B, K), generator=g).to(device)
    ts_list = ts.cpu().tolist()
    out_size = torch.tensor([], dtype=out_dtype).element_size()
    nbytes = B * C * H * W + B * K * C * H * W * out_size
    floor_ms = nbytes / (copy_gbps * 1e9) * 1e3 if copy_gbps else None
    dt_name = str(out_dtype).replace("torch.", "")
    short = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}[dt_name]
    case = f"B={B} C={C} H={H} W={W} K={K} out={short}"
    params = {"B": B, "K": K, "C": C, "H": H, "W": W, "out_dtype": dt_name, "in_dtype": "uint8"}
    sab, s1mab = DEFAULT_SCHEDULE.tables(device)
    mean = torch.tensor(CLIP_MEAN, device=device).view(1, -1, 1, 1)
    std = torch.tensor(CLIP_STD, device=device).view(1, -1, 1, 1)
    batched = _torch_batched_fn(sab, s1mab, mean, std, out_dtype)
    nchk = min(B, 2)  # images checked exactly against the reference
    x_nhwc = x.permute(0, 2, 3, 1).contiguous()

    def check_ours(fn_seeded, what):
        out = fn_seeded()
        eps = philox_normal_reference(SEED, 0, nchk * K, C * H * W, device=device).view(nchk, K, C, H, W)
        _check_close(out[:nchk], _reference(x[:nchk], ts[:nchk], out_dtype, eps), what)

    def eps_for_check():
        return torch.randn((nchk, K, C, H, W), generator=torch.Generator().manual_seed(7)).to(device)

    def check_per_image():
        eps = eps_for_check()
        it = iter(eps.reshape(nchk * K, C, H, W))
        outs = torch_per_image(x[:nchk], ts_list[:nchk], out_dtype, randn_like=lambda t: next(it))
        _check_close(torch.stack(outs).view(nchk, K, C, H, W), _reference(x[:nchk], ts[:nchk], out_dtype, eps),
                     "torch_per_image")

    def check_batched():
        eps = eps_for_check()
        _check_close(batched(x[:nchk], ts[:nchk], eps), _reference(x[:nchk], ts[:nchk], out_dtype, eps),
                     "torch_batched")

    compiled = [None]

    def compiled_fn():
        if compiled[0] is None:
            # A fresh cache per case: every case is a new shape, and dynamo's recompile limit
            # would otherwise silently send later cases back to eager.
            torch._dynamo.reset()
            compiled[0] = torch.compile(batched, dynamic=False)
        return compiled[0](x, ts)

    variants = {
        "bpo_fast": (lambda: diffusion_noise(x, ts, out_dtype=out_dtype, check_timesteps=False),
                     lambda: check_ours(lambda: diffusion_noise(x, ts, out_dtype=out_dtype, seed=SEED,
                                                                check_timesteps=False), "bpo_fast")),
        "bpo_fast_checked": (lambda: diffusion_noise(x, ts, out_dtype=out_dtype),
                             lambda: check_ours(lambda: diffusion_noise(x, ts, out_dtype=out_dtype, seed=SEED),
                                                "bpo_fast_checked")),
        "bpo_fast_nhwc": (lambda: diffusion_noise(x_nhwc, ts, out_dtype=out_dtype, layout="NHWC",
                                                  check_timesteps=False),
                          lambda: check_ours(lambda: diffusion_noise(x_nhwc, ts, out_dtype=out_dtype, seed=SEED,
                                                                     layout="NHWC", check_timesteps=False),
                                             "bpo_fast_nhwc")),
        "torch_per_image": (lambda: torch_per_image(x, ts_list, out_dtype), check_per_image),
        "torch_batched": (lambda: batched(x, ts), check_batched),
        "torch_compile": (compiled_fn, lambda: _check_statistics(compiled_fn(), x, ts, "torch_compile")),
    }
    rows = []
    for impl in impls:
        fn, check = variants[impl]
        try:
            check()
            med, p20, p80 = common.bench_ms(fn)
            peak = common.peak_mem_above(fn)
            err = None
        except Exception as exc:  # a baseline that cannot run gets a row saying why
            med = p20 = p80 = peak = None
            err = f"{type(exc).__name__}: {str(exc)[:300]}"
        gbps = nbytes / (med * 1e-3) / 1e9 if med else None
        extra = {"bytes": nbytes}
        if med and floor_ms:
            extra["frac_copy_bw"] = floor_ms / med
        row_params = dict(params, layout="NHWC" if impl == "bpo_fast_nhwc" else "NCHW")
        rows.append(common.row(case, impl, med, p20, p80, params=row_params, pass_="fwd",
                               peak_mem_bytes=peak, gbps=gbps, floor_ms=floor_ms, error=err, **extra))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    by_impl = {r["impl"]: r for r in rows}
    for r in rows:
        if r["impl"].startswith("bpo_fast") and r["median_ms"]:
            for base in ("torch_per_image", "torch_batched", "torch_compile"):
                b = by_impl.get(base)
                if b and b["median_ms"]:
                    r[f"speedup_vs_{base}"] = b["median_ms"] / r["median_ms"]
    return rows


IMPLS = ["bpo_fast", "bpo_fast_checked", "bpo_fast_nhwc", "torch_per_image", "torch_batched", "torch_compile"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--all", action="store_true", help="the full issue-2 grid (GPU), writes results")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, any device, writes nothing")
    ap.add_argument("--batch", type=int, nargs="*", default=[8, 64, 256])
    ap.add_argument("--levels", type=int, nargs="*", default=[1, 4])
    ap.add_argument("--out-dtypes", nargs="*", default=["bfloat16", "float32"])
    ap.add_argument("--size", type=int, default=336)
    ap.add_argument("--impls", nargs="*", default=IMPLS, choices=IMPLS)
    ap.add_argument("--out", default=None, help="results path (default bench/results/noise-<gpu>.json)")
    args = ap.parse_args(argv)
    if not (args.all or args.smoke):
        ap.error("pass --all (GPU grid) or --smoke")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        batches, levels, size, dtypes = [2], [1, 2], 32, ["bfloat16", "float32"]
        impls = [i for i in args.impls if i != "torch_compile" or device == "cuda"]
    else:
        if device != "cuda":
            ap.error("--all needs a CUDA GPU (use --smoke on CPU)")
        batches, levels, size, dtypes, impls = args.batch, args.levels, args.size, args.out_dtypes, args.impls
    copy_gbps = common.copy_bandwidth_gbps()
    ceilings = {"copy_gbps": copy_gbps}
    rows = []
    for B in batches:
        for K in levels:
            for dt in dtypes:
                rows += run_case(B, K, getattr(torch, dt), 3, size, size, device, copy_gbps, impls)
                common.print_table(rows[-len(impls):], cols=("case", "impl", "median_ms", "gbps",
                                                             "floor_ms", "frac_copy_bw", "speedup_vs_torch_batched"))
    failed = [r for r in rows if r.get("error") and r["impl"].startswith("bpo_fast")]
    if args.smoke:
        print(f"smoke: {len(rows)} rows, {len(failed)} of ours failed")
        return 1 if failed else 0
    path = common.write_results("noise", rows, ceilings, command="python bench/noise.py --all", path=args.out)
    print("wrote", path)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
