"""Benchmark: sequence log-probs (and the fused DPO loss) from logits, forward and forward+backward.

    python bench/logprobs.py --all      # GPU: the issue-3 grid -> bench/results/logprobs-<gpu>.json
    python bench/logprobs.py --all --sweep   # GPU: plus (BLOCK_V, num_warps) alternatives
    python bench/logprobs.py --vocab 152064 --append   # GPU: part of the grid, merged into the file
    python bench/logprobs.py --smoke    # CPU: tiny fp32 shapes, Triton under the interpreter,
                                        # writes nothing (times mean nothing)

Grid (issue 3): tokens N*T in {4096, 16384, 32768} as sequences of T = 1024, V in {32000,
128256, 152064}, bf16 logits, every position scored (the worst case: no masked row skips its
V-pass), ``pass`` = ``fwd`` (per-sequence log-probs) or ``fwd+bwd`` (plus the gradient w.r.t. the
logits of their sum).

Rows (``impl``):
- ``bpo_fast``   ``sequence_logprobs`` (params.inplace: the in-place backward that writes the
                 gradient over the logits; params.op = "dpo" rows run ``fused_dpo_loss``)
- ``torch``      naive PyTorch: float32 upcast, ``log_softmax``, ``gather``, sum
- ``trl``        TRL's ``selective_log_softmax`` (its Triton kernel on CUDA) + masked sum; falls
                 back to ``trl.kernels.logprob_entropy`` when ``trl.trainer.utils`` cannot be
                 imported (missing trainer dependencies); ``--trl-wheel PATH`` imports trl from
                 a wheel file
- ``liger``      Liger-Kernel's cross entropy (``reduction="none"`` for fwd, ``"sum"`` for
                 fwd+bwd, where it forms the gradient during the forward, in place);
                 ``--liger-wheel PATH`` imports it from a wheel file

``floor_ms``: bytes that must move over the copy bandwidth measured in the same run (read + write
counted): the logits read once (fwd), or read twice and the gradient written once (fwd+bwd).
``gbps`` is those bytes over the median time. ``peak_mem_bytes``: peak allocated above the inputs
(logits, labels) during one call, including the returned gradient. Every timed row is first
checked against the float32 reference (chunked over rows) on the same inputs.
"""

import argparse
import contextlib
import os
import sys

import torch

SMOKE = "--smoke" in sys.argv
if SMOKE and not torch.cuda.is_available():  # run our Triton kernels under the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402

T_SEQ = 1024
TOKENS = (4096, 16384, 32768)
VOCABS = (32000, 128256, 152064)
SWEEP = ((2048, 4), (4096, 4), (4096, 8), (8192, 8), (8192, 16), (16384, 16))
BETA = 0.1


# ----------------------------------------------------------------------------------------------
# implementations: (logits, labels) -> per-sequence log-probs [N] float32
# ----------------------------------------------------------------------------------------------


def ours(inplace=False):
    from bpo_fast.ops.logprobs import sequence_logprobs

    return lambda x, labels: sequence_logprobs(x, labels, inplace_backward=inplace)[0]


def naive_torch(x, labels):
    tgt = labels[:, 1:]
    mask = tgt != -100
    lp = torch.log_softmax(x[:, :-1].float(), -1).gather(-1, tgt.clamp(min=0)[..., None])
    return (lp.squeeze(-1) * mask).sum(-1)


def add_wheel(path):
    """Make a pure-Python wheel importable: unpacked into a temporary folder (zipimport cannot
    load namespace packages, which liger_kernel has)."""
    import tempfile
    import zipfile

    dest = tempfile.mkdtemp(prefix="bench-wheel-")
    with zipfile.ZipFile(path) as z:
        z.extractall(dest)
    sys.path.insert(0, dest)


def load_trl(wheel=None):
    """(fn, note) for TRL's helper, or raises with the reason."""
    if wheel:
        add_wheel(wheel)
    try:
        from trl.trainer.utils import selective_log_softmax

        note = None
    except Exception as exc:  # trainer deps (accelerate, datasets, ...) missing
        from trl.kernels.logprob_entropy import selective_log_softmax_and_entropy

        note = (f"trl.trainer.utils import failed ({type(exc).__name__}: {exc}); "
                f"used trl.kernels.logprob_entropy (what selective_log_softmax calls on CUDA)")

        def selective_log_softmax(logits, index, row_mask=None):
            return selective_log_softmax_and_entropy(logits, index, row_mask=row_mask)[0]

    def fn(x, labels):
        tgt = labels[:, 1:]
        mask = tgt != -100
        lp = selective_log_softmax(x[:, :-1], tgt.clamp(min=0), row_mask=mask)
        return (lp * mask).sum(-1)

    return fn, note


def load_liger(wheel=None):
    if wheel:
        add_wheel(wheel)
    from liger_kernel.transformers.functional import liger_cross_entropy

    def fwd(x, labels):
        # the full logits viewed as [N*T, V] (no copy) with labels shifted left, -100 last
        N, T, V = x.shape
        tgt = torch.cat([labels[:, 1:], labels.new_full((N, 1), -100)], 1).reshape(-1)
        nll = liger_cross_entropy(x.reshape(N * T, V), tgt, ignore_index=-100,
                                  reduction="none")
        return -nll.view(N, T).sum(-1)

    def total(x, labels):
        N, T, V = x.shape
        tgt = torch.cat([labels[:, 1:], labels.new_full((N, 1), -100)], 1).reshape(-1)
        return -liger_cross_entropy(x.reshape(N * T, V), tgt, ignore_index=-100,
                                    reduction="sum")

    return fwd, total


# DPO: (logits, labels, ref_c, ref_r) -> loss
def ours_dpo(inplace=False):
    from bpo_fast.ops.dpo import fused_dpo_loss

    return lambda x, labels, rc, rr: fused_dpo_loss(x, labels, rc, rr, beta=BETA,
                                                    inplace_backward=inplace).loss


def compose_dpo(logps_fn):
    from bpo_fast.ops.dpo import dpo_loss_reference

    def fn(x, labels, rc, rr):
        logps = logps_fn(x, labels)
        b = logps.shape[0] // 2
        return dpo_loss_reference(logps[:b], logps[b:], rc, rr, beta=BETA).loss

    return fn


# ----------------------------------------------------------------------------------------------
# reference and checks
# ----------------------------------------------------------------------------------------------


def reference(x, labels, rows_for_grad):
    """float32 reference: per-sequence log-probs (chunked over rows) and the gradient of their
    sum for a few rows."""
    from bpo_fast.ops.logprobs import sequence_logprobs_reference

    logps = torch.cat([sequence_logprobs_reference(x[i:i + 1].float(), labels[i:i + 1])[0]
                       for i in range(x.shape[0])])
    grads = {}
    for i in rows_for_grad:
        z = x[i:i + 1].detach().float().requires_grad_(True)
        sequence_logprobs_reference(z, labels[i:i + 1])[0].sum().backward()
        grads[i] = z.grad[0]
    return logps, grads


def reference_dpo(logps_ref, rc, rr, grads_ref):
    """DPO loss from the reference log-probs and d loss / d logits for the reference rows."""
    from bpo_fast.ops.dpo import dpo_loss_reference

    lp = logps_ref.detach().clone().requires_grad_(True)
    b = lp.shape[0] // 2
    loss = dpo_loss_reference(lp[:b], lp[b:], rc, rr, beta=BETA).loss
    (dl,) = torch.autograd.grad(loss, lp)
    return loss.detach(), {i: g * dl[i] for i, g in grads_ref.items()}


def rel_err(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def check_run(run, ref, grads_ref):
    out, grad = run()
    return check(out, ref, grad, grads_ref)


def check(val, ref, grad=None, grads_ref=None, tol_val=1e-4, tol_grad=3e-2):
    """None if ok, else a message."""
    e = rel_err(val.detach(), ref)
    if not (e <= tol_val):
        return f"value mismatch vs reference: rel err {e:.3g}"
    if grad is not None:
        for i, g in grads_ref.items():
            e = rel_err(grad[i], g)
            if not (e <= tol_grad):
                return f"gradient mismatch vs reference at row {i}: rel err {e:.3g}"
    return None


# ----------------------------------------------------------------------------------------------
# the runs
# ----------------------------------------------------------------------------------------------


def make_inputs(N, T, V, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    logits = (torch.randn(N, T, V, device=device, dtype=torch.float32, generator=g) * 2
              ).to(dtype) if device == "cpu" else torch.randn(N, T, V, device=device,
                                                                dtype=dtype, generator=g) * 2
    labels = torch.randint(0, V, (N, T), device=device, generator=g)
    return logits, labels


def measure(name, impl, case, params, fn_run, check_fn, nbytes, copy_gbps, pass_, note=None):
    """Check once, then time; returns a row (with ``error`` on failure)."""
    try:
        msg = check_fn()
        if msg:
            return common.row(case, impl, params=params, pass_=pass_, error=msg)
        peak = common.peak_mem_above(fn_run)
        med, p20, p80 = common.bench_ms(fn_run)
    except torch.cuda.OutOfMemoryError as exc:
        torch.cuda.empty_cache()
        return common.row(case, impl, params=params, pass_=pass_,
                          error=f"OutOfMemoryError: {str(exc).splitlines()[0]}")
    except Exception as exc:  # a baseline that cannot run says so
        return common.row(case, impl, params=params, pass_=pass_,
                          error=f"{type(exc).__name__}: {exc}")
    floor = nbytes / (copy_gbps * 1e9) * 1e3 if copy_gbps else None
    r = common.row(case, impl, median_ms=med, p20_ms=p20, p80_ms=p80, params=params,
                   pass_=pass_, peak_mem_bytes=peak, gbps=nbytes / (med * 1e-3) / 1e9,
                   floor_ms=floor)
    if floor:
        r["x_floor"] = med / floor
    if note:
        r["note"] = note
    r["variant"] = params.get("op", "") + ("+inplace" if params.get("inplace") else "")
    print(f"  {impl:9s} {pass_:8s} {str(params):48s} {med:9.3f} ms  "
          f"{'' if not floor else f'{med / floor:5.2f}x floor'}", flush=True)
    return r


def run_shape(N, T, V, dtype, device, copy_gbps, impls, dpo=True, inplace=True):
    rows = []
    case = f"N*T={N * T} (N={N} T={T}) V={V} {str(dtype).replace('torch.', '')}"
    base = dict(tokens=N * T, N=N, T=T, V=V, dtype=str(dtype).replace("torch.", ""))
    print(case, flush=True)
    logits, labels = make_inputs(N, T, V, dtype, device)
    elt = logits.element_size()
    fwd_bytes = N * T * V * elt
    fb_bytes = 3 * fwd_bytes
    grad_rows = [0, N - 1]
    ref, grads_ref = reference(logits, labels, grad_rows)
    rc = (ref[: N // 2] + 0.5).detach()
    rr = (ref[N // 2:] - 0.5).detach()
    ref_loss, dgrads_ref = reference_dpo(ref, rc, rr, grads_ref)

    def fwd_only(fn):
        def run():
            with torch.no_grad():
                return fn(logits, labels)
        return run

    def fwd_bwd(fn, x):
        def run():
            out = fn(x, labels)
            return out, torch.autograd.grad(out.sum(), x)[0]
        return run

    for impl, fn, note in impls:
        params = dict(base, op="logps")
        if impl == "liger":
            fwd_fn, total_fn = fn
            rows.append(measure("", impl, case, params, fwd_only(fwd_fn),
                                lambda: check(fwd_only(fwd_fn)(), ref), fwd_bytes, copy_gbps,
                                "fwd", note))
            # liger writes the gradient into its input during the forward: fresh copy to check
            def liger_check(total_fn=total_fn):
                x = logits.clone().requires_grad_(True)
                out = total_fn(x, labels)
                g = torch.autograd.grad(out, x)[0]
                return check(out[None], ref.sum()[None], g, grads_ref)
            x = logits.clone().requires_grad_(True)
            rows.append(measure("", impl, case, params, fwd_bwd(lambda a, b: total_fn(a, b)[None],
                                                                 x),
                                liger_check, fb_bytes, copy_gbps, "fwd+bwd", note))
            del x
            continue
        rows.append(measure("", impl, case, params, fwd_only(fn),
                            lambda: check(fwd_only(fn)(), ref), fwd_bytes, copy_gbps, "fwd",
                            note))
        x = logits.detach().requires_grad_(True)
        run = fwd_bwd(fn, x)
        rows.append(measure("", impl, case, params, run,
                            lambda run=run: check_run(run, ref, grads_ref), fb_bytes,
                            copy_gbps, "fwd+bwd", note))
        del x, run
    if inplace:
        # the in-place backward destroys its input: check on a copy, then time on the logits
        # (their values become gradients; the cost does not depend on the values)
        fn = ours(inplace=True)

        def ip_check():
            x = logits.clone().requires_grad_(True)
            out, g = fwd_bwd(fn, x)()
            return check(out, ref, g, grads_ref)
        x = logits.detach().requires_grad_(True)
        rows.append(measure("", "bpo_fast", case, dict(base, op="logps", inplace=True),
                            fwd_bwd(fn, x), ip_check, fb_bytes, copy_gbps, "fwd+bwd"))
        del x
    if dpo:
        logits, labels = make_inputs(N, T, V, dtype, device)   # fresh (in-place above)
        dimpls = [("bpo_fast", ours_dpo(), None)] + [
            (name, compose_dpo(fn), note) for name, fn, note in impls
            if name in ("torch", "trl")]
        for impl, fn, note in dimpls:
            params = dict(base, op="dpo", loss_type="sigmoid", B=N // 2)
            x = logits.detach().requires_grad_(True)

            def run(fn=fn, x=x):
                loss = fn(x, labels, rc, rr)
                return loss, torch.autograd.grad(loss, x)[0]

            def dcheck(run=run):
                loss, g = run()
                return check(loss[None], ref_loss[None], g, dgrads_ref)
            rows.append(measure("", impl, case, params, run, dcheck, fb_bytes, copy_gbps,
                                "fwd+bwd", note))
            del x, run
        if inplace:
            fn = ours_dpo(inplace=True)

            def run_ip(x):
                loss = fn(x, labels, rc, rr)
                return loss, torch.autograd.grad(loss, x)[0]

            def dcheck_ip():
                loss, g = run_ip(logits.clone().requires_grad_(True))
                return check(loss[None], ref_loss[None], g, dgrads_ref)
            x = logits.detach().requires_grad_(True)
            rows.append(measure("", "bpo_fast", case,
                                dict(base, op="dpo", loss_type="sigmoid", B=N // 2,
                                     inplace=True),
                                lambda: run_ip(x), dcheck_ip, fb_bytes, copy_gbps, "fwd+bwd"))
            del x
    del logits, labels
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def baselines(args):
    impls = [("bpo_fast", ours(), None), ("torch", naive_torch, None)]
    try:
        fn, note = load_trl(args.trl_wheel)
        impls.append(("trl", fn, note))
    except Exception as exc:
        impls.append(("trl", None, f"{type(exc).__name__}: {exc}"))
    try:
        impls.append(("liger", load_liger(args.liger_wheel), None))
    except Exception as exc:
        impls.append(("liger", None, f"{type(exc).__name__}: {exc}"))
    return impls


def unavailable_rows(impls, cases):
    rows = []
    for name, fn, err in impls:
        if fn is None:
            for case, params in cases:
                for p in ("fwd", "fwd+bwd"):
                    rows.append(common.row(case, name, params=params, pass_=p, error=err))
    return rows


@contextlib.contextmanager
def env(**kw):
    old = {k: os.environ.get(k) for k in kw}
    os.environ.update({k: str(v) for k, v in kw.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def sweep(device, copy_gbps, N, T, V, dtype):
    rows = []
    case = f"N*T={N * T} (N={N} T={T}) V={V} {str(dtype).replace('torch.', '')}"
    print("sweep", case, flush=True)
    logits, labels = make_inputs(N, T, V, dtype, device)
    ref, grads_ref = reference(logits, labels, [0, N - 1])
    fwd_bytes = N * T * V * logits.element_size()
    fn = ours()
    for block, warps in SWEEP:
        params = dict(tokens=N * T, N=N, T=T, V=V, block_v=block, num_warps=warps)
        with env(BPO_FAST_LOGPROBS_BLOCK_V=block, BPO_FAST_LOGPROBS_WARPS=warps):
            def f():
                with torch.no_grad():
                    return fn(logits, labels)
            rows.append(measure("", "bpo_fast", case, params, f, lambda: check(f(), ref),
                                fwd_bytes, copy_gbps, "fwd"))
            x = logits.detach().requires_grad_(True)

            def fb(x=x):
                out = fn(x, labels)
                return out, torch.autograd.grad(out.sum(), x)[0]
            rows.append(measure("", "bpo_fast", case, params, fb,
                                lambda: check_run(fb, ref, grads_ref),
                                3 * fwd_bytes, copy_gbps, "fwd+bwd"))
            del x
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all", action="store_true", help="the full grid (GPU)")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run; writes nothing")
    ap.add_argument("--sweep", action="store_true", help="time (BLOCK_V, warps) alternatives")
    ap.add_argument("--tokens", type=int, nargs="*", default=None)
    ap.add_argument("--vocab", type=int, nargs="*", default=None)
    ap.add_argument("--no-dpo", action="store_true", help="skip the fused DPO rows")
    ap.add_argument("--trl-wheel", default=os.environ.get("TRL_WHEEL"),
                    help="import trl from this wheel file (pure Python)")
    ap.add_argument("--liger-wheel", default=os.environ.get("LIGER_WHEEL"),
                    help="import liger_kernel from this wheel file (pure Python)")
    ap.add_argument("--out", default=None, help="results path (default bench/results/...)")
    ap.add_argument("--append", action="store_true",
                    help="merge into an existing results file (split the grid over commands)")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    if args.smoke:
        device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
        shapes = [(2, 16, 300), (4, 8, 257)]
    else:
        if not cuda:
            ap.error("the full benchmark needs a CUDA GPU (use --smoke on CPU)")
        device, dtype = "cuda", torch.bfloat16
        toks = args.tokens or TOKENS
        vocs = args.vocab or VOCABS
        shapes = [(t // T_SEQ, T_SEQ, v) for v in vocs for t in toks]
    if not (args.all or args.smoke or args.sweep or args.tokens or args.vocab):
        ap.error("choose --all, --sweep, --smoke, or --tokens/--vocab")

    copy_gbps = common.copy_bandwidth_gbps() if cuda else None
    ceilings = {"copy_gbps": copy_gbps}
    print(f"device {common.gpu_name()}  copy bandwidth {copy_gbps} GB/s", flush=True)
    rows = []
    if args.sweep and not args.smoke:
        rows += sweep(device, copy_gbps, 16, T_SEQ, 152064, dtype)
    if args.all or args.smoke or args.tokens or args.vocab:
        impls = baselines(args)
        runnable = [i for i in impls if i[1] is not None]
        rows += unavailable_rows(impls, [
            (f"N*T={n * t} (N={n} T={t}) V={v} {str(dtype).replace('torch.', '')}",
             dict(tokens=n * t, N=n, T=t, V=v)) for n, t, v in shapes])
        for N, T, V in shapes:
            rows += run_shape(N, T, V, dtype, device, copy_gbps, runnable, dpo=not args.no_dpo)
    common.print_table(rows, cols=("case", "impl", "variant", "pass", "median_ms", "gbps",
                                   "floor_ms",
                                   "peak_mem_bytes", "error"))
    bad = [r for r in rows if r["impl"] == "bpo_fast" and r.get("error")]
    if (args.smoke or not (args.all or args.tokens or args.vocab)) and not args.out:
        print("smoke or sweep-only run: nothing written (use --out, or --all --sweep)")
    else:
        path = args.out or os.path.join(common.RESULTS, f"logprobs-{common.gpu_slug()}.json")
        if args.append and os.path.exists(path):
            rows = merge_rows(path, rows)
        path = common.write_results("logprobs", rows, ceilings, path=path)
        print("wrote", path)
    return 1 if bad else 0


def _row_key(r):
    return (r["case"], r["impl"], r.get("pass"), r.get("variant"),
            r["params"].get("block_v"), r["params"].get("num_warps"))


def merge_rows(path, rows):
    """Rows of an earlier run at ``path`` that this run did not redo, then this run's rows (so
    that the grid can be split over several commands)."""
    import json

    with open(path) as f:
        old = json.load(f).get("rows", [])
    new_keys = {_row_key(r) for r in rows}
    return [r for r in old if _row_key(r) not in new_keys] + rows


if __name__ == "__main__":
    sys.exit(main())
