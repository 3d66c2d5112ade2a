"""Benchmark: fused LM head + DPO loss (forward + backward) straight from hidden states.

    python bench/linear.py --all      # GPU: the full grid, writes bench/results/linear-<gpu>.json
    python bench/linear.py --smoke    # CPU: tiny shapes (Triton interpreted), writes nothing
    python bench/linear.py --all --softcap 30 --out bench/results/linear-softcap-<gpu>.json
                                      # GPU: our implementations with Gemma 2's logit soft-cap

Grid (issue 4): H = 4096, V in {32000, 128256, 152064}, N*T in {8192, 32768} tokens as sequences
of T = 2048 (rows [chosen; rejected]), the second half of each row scored (the first half stands
for image + prompt tokens), bf16, DPO sigmoid loss, forward + backward w.r.t. hidden and weight.

Rows:
- ``bpo_fast``           fused_linear_dpo_loss, one row per implementation (params.variant:
                         cublas / triton / hybrid / torch; params.grad_in_forward:
                         gradients formed in the forward pass, 3 GEMMs, or forward +
                         recomputing backward, 4 GEMMs);
                         params.default marks what the defaults pick
- ``logits+bpo_fast``    materialised bf16 logits + our sequence_logprobs kernel + dpo_loss
- ``torch``              materialised bf16 logits + naive PyTorch (float log_softmax + gather)
- ``liger``              Liger-Kernel LigerFusedLinearDPOLoss (use_ref_model=False; chunk of 1 pair)
- ``trl``                TRL's ChunkedLogProbFunction on the scored tokens + per-row sums + dpo_loss

floor_ms = 3 matmuls of scored_tokens x H x V at the bf16 rate measured in the same run;
peak_mem_bytes = peak allocated above the inputs during one fwd+bwd, *including* the two gradient
outputs (grad_hidden, grad_weight) every implementation has to return; peak_extra_bytes excludes
them. Each timed row first checks its loss and gradients against the chunked reference twin
(``impl="torch"``, itself tested against materialised float32 logits).
"""

import argparse
import math
import os
import sys

import torch

if not torch.cuda.is_available():  # the Triton variants run under the interpreter on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402

BETA = 0.1
LOSS_TYPE = "sigmoid"


# ----------------------------------------------------------------------------------------------
# the implementations: each maps (hidden, weight, labels, ref_c, ref_r) -> scalar DPO loss
# ----------------------------------------------------------------------------------------------


def ours(variant, grad_in_forward=None, softcap=None):
    from bpo_fast.ops.linear import fused_linear_dpo_loss

    def fn(hidden, weight, labels, ref_c, ref_r):
        return fused_linear_dpo_loss(hidden, weight, labels, ref_c, ref_r, beta=BETA,
                                     loss_type=LOSS_TYPE, impl=variant,
                                     grad_in_forward=grad_in_forward,
                                     logit_softcap=softcap).loss
    return fn


def _dpo_from_logps(logps, ref_c, ref_r):
    from bpo_fast.ops.dpo import dpo_loss

    b = logps.shape[0] // 2
    return dpo_loss(logps[:b], logps[b:], ref_c, ref_r, beta=BETA, loss_type=LOSS_TYPE).loss


def logits_ours(hidden, weight, labels, ref_c, ref_r):
    from bpo_fast.ops.logprobs import sequence_logprobs

    logits = hidden @ weight.t()
    logps, _ = sequence_logprobs(logits, labels)
    return _dpo_from_logps(logps, ref_c, ref_r)


def logits_naive(hidden, weight, labels, ref_c, ref_r):
    logits = (hidden @ weight.t())[:, :-1].float()
    tgt = labels[:, 1:]
    mask = tgt != -100
    lp = torch.log_softmax(logits, -1).gather(-1, tgt.clamp(min=0)[..., None]).squeeze(-1)
    return _dpo_from_logps((lp * mask).sum(-1), ref_c, ref_r)


def liger():
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    mod = LigerFusedLinearDPOLoss(beta=BETA, loss_type=LOSS_TYPE, use_ref_model=False)

    def fn(hidden, weight, labels, ref_c, ref_r):
        # Liger has no precomputed-reference input: use_ref_model=False is the reference at 0,
        # which the timed inputs use (ref_c = ref_r = 0). Liger does not shift: we do.
        out = mod(weight, hidden[:, :-1], labels[:, 1:])
        return out[0] if isinstance(out, tuple) else out
    return fn


def trl():
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    def fn(hidden, weight, labels, ref_c, ref_r):
        # what TRL's fused LM head does: score only the valid positions, 32768-wide vocab tiles
        h, tgt = hidden[:, :-1], labels[:, 1:]
        mask = tgt != -100
        per_tok = ChunkedLogProbFunction.apply(h[mask], weight, None, tgt[mask], 1.0, 32768,
                                               None, 1.0, ("log_probs",))[0]
        lp = per_tok.new_zeros(mask.shape).masked_scatter(mask, per_tok)
        return _dpo_from_logps(lp.sum(-1), ref_c, ref_r)
    return fn


# ----------------------------------------------------------------------------------------------


def make_inputs(NT, T, H, V, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    N = NT // T
    hidden = torch.randn(N, T, H, device=device, dtype=dtype, generator=g)
    weight = (torch.randn(V, H, device=device, generator=g) / math.sqrt(H)).to(dtype)
    labels = torch.randint(0, V, (N, T), device=device, generator=g)
    labels[:, : T // 2 + 1] = -100  # positions 0 .. T/2 - 1 score nothing: half of them scored
    ref = torch.zeros(N // 2, device=device)
    return hidden.requires_grad_(True), weight.requires_grad_(True), labels, ref


def fwd_bwd(fn, hidden, weight, labels, ref):
    def run():
        loss = fn(hidden, weight, labels, ref, ref)
        gh, gw = torch.autograd.grad(loss, (hidden, weight))
        return loss.detach(), gh, gw
    return run


def rel_err(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def check(out, ref, tol):
    """Loss and both gradients within ``tol`` relative (Frobenius) of the reference twin."""
    errs = {"loss": abs(out[0].item() - ref[0].item()) / max(abs(ref[0].item()), 1e-6),
            "grad_hidden": rel_err(out[1], ref[1]), "grad_weight": rel_err(out[2], ref[2])}
    bad = {k: v for k, v in errs.items() if not v <= tol}
    return errs, bad


def impls(device, softcap=None):
    from bpo_fast.ops import linear as L

    default = L._resolve_impl("auto", device)
    # (impl, grad_in_forward): the default DPO path forms the gradients in the forward pass
    # (3 GEMMs) for torch/cublas; "recompute" is the composed forward + recomputing backward
    variants = [("cublas", True), ("cublas", False), ("triton", False), ("hybrid", False),
                ("torch", True)]
    out = [("bpo_fast", v + ("-recompute" if v in ("cublas", "torch") and not gif else ""),
            ours(v, gif, softcap), {"variant": v, "grad_in_forward": gif,
                                    "default": v == default and gif == (v in ("cublas", "torch"))})
           for v, gif in variants]
    if softcap is not None:  # the baselines below compute un-capped logits
        return out
    out += [("logits+bpo_fast", None, logits_ours, {}), ("torch", None, logits_naive, {})]
    for name, maker in (("liger", liger), ("trl", trl)):
        try:
            out.append((name, None, maker(), {}))
        except Exception as exc:  # not installed / incompatible: an error row
            out.append((name, None, None, {"error": f"{type(exc).__name__}: {exc}"}))
    return out


def run_case(NT, T, H, V, dtype, device, tflops, rows, smoke, softcap=None):
    hidden, weight, labels, ref_lp = make_inputs(NT, T, H, V, dtype, device)
    S = int((labels[:, 1:] != -100).sum())
    case = f"H={H} V={V} NT={NT} T={T} scored={S} {str(dtype).replace('torch.', '')}"
    params = {"H": H, "V": V, "NT": NT, "T": T, "scored": S,
              "dtype": str(dtype).replace("torch.", "")}
    if softcap is not None:
        case += f" softcap={softcap:g}"
        params["logit_softcap"] = softcap
    flops = 6.0 * S * H * V
    floor_ms = flops / (tflops * 1e12) * 1e3 if tflops else None
    grads_bytes = hidden.numel() * hidden.element_size() + weight.numel() * weight.element_size()
    reference = fwd_bwd(ours("torch", False, softcap), hidden, weight, labels, ref_lp)()
    for impl, variant, fn, extra in impls(device, softcap):
        # ours keep float32 logits; the baselines that round logits to bf16 get a looser check
        tol = 1e-4 if dtype == torch.float32 else (1e-2 if impl == "bpo_fast" else 5e-2)
        r = dict(case=case, impl=impl, pass_="fwd+bwd", params=dict(params, **{
            k: v for k, v in extra.items() if k != "error"}), floor_ms=floor_ms, variant=variant)
        if fn is None:
            rows.append(common.row(**r, error=extra["error"]))
            continue
        run = fwd_bwd(fn, hidden, weight, labels, ref_lp)
        try:
            errs, bad = check(run(), reference, tol)
            if bad:
                rows.append(common.row(**r, error=f"mismatch vs reference: {bad}", check=errs))
                continue
            peak = common.peak_mem_above(run)
            # fwd+bwd takes 10-300 ms at these shapes: ~2 s of repetitions for a stable median
            med, p20, p80 = common.bench_ms(run, warmup=2 if smoke else 20,
                                            rep=5 if smoke else 400)
        except torch.cuda.OutOfMemoryError as exc:
            rows.append(common.row(**r, error=f"OutOfMemoryError: {str(exc).splitlines()[0]}"))
            torch.cuda.empty_cache()
            continue
        except Exception as exc:
            rows.append(common.row(**r, error=f"{type(exc).__name__}: {exc}"[:500]))
            continue
        rows.append(common.row(
            **r, median_ms=med, p20_ms=p20, p80_ms=p80, peak_mem_bytes=peak,
            peak_extra_bytes=None if peak is None else peak - grads_bytes,
            tflops=flops / (med * 1e-3) / 1e12,
            over_floor=None if floor_ms is None else med / floor_ms, check=errs))
        print(f"{case:55s} {impl:16s} {str(variant or ''):7s} {med:9.3f} ms"
              + (f"  x{med / floor_ms:.2f} floor" if floor_ms else "")
              + (f"  peak {peak / 2**20:.0f} MiB" if peak is not None else ""), flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    del hidden, weight


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--all", action="store_true", help="the full issue-4 grid (GPU)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, any device, writes nothing")
    ap.add_argument("--vocab", type=int, nargs="*", default=[32000, 128256, 152064])
    ap.add_argument("--tokens", type=int, nargs="*", default=[8192, 32768])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--softcap", type=float, default=None,
                    help="logit soft-cap (Gemma 2: 30): our implementations only, with the cap")
    ap.add_argument("--out", default=None,
                    help="results path (default bench/results/linear-<gpu>.json)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    rows = []
    if args.smoke or not cuda:
        # CPU: fp32 (the interpreter mishandles bf16), shapes the interpreter gets through quickly
        run_case(128, 32, 48, 301, torch.float32, device, None, rows, smoke=True,
                 softcap=args.softcap)
        common.print_table(rows, cols=("case", "impl", "variant", "median_ms", "error"))
        return 0 if all("error" not in r or r["impl"] in ("liger", "trl") for r in rows) else 1
    tflops = common.bf16_tflops()
    ceilings = {"bf16_tflops": tflops, "copy_gbps": common.copy_bandwidth_gbps()}
    print(f"measured bf16 rate {tflops:.0f} TFLOP/s", flush=True)
    for V in args.vocab:
        for NT in args.tokens:
            run_case(NT, args.seq, args.hidden, V, torch.bfloat16, device, tflops, rows,
                     smoke=False, softcap=args.softcap)
    path = common.write_results("linear", rows, ceilings, path=args.out)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
