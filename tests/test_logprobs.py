"""token_logprobs / sequence_logprobs: Triton kernels (interpreter on CPU) vs the references.

Small fp32 shapes here (the interpreter is slow and gets bf16 wrong); bf16/fp16 and the large
shapes run on a GPU (``cuda`` marks).
"""

import os

import pytest
import torch

from bpo_fast.kernels import logprobs as K
from bpo_fast.ops import logprobs as L
from bpo_fast.ops.logprobs import (sequence_logprobs, sequence_logprobs_reference,
                                   token_logprobs, token_logprobs_reference)

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make(N=3, T=7, V=150, scale=3.0, seed=0, mask_frac=0.25, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, T, V, generator=g) * scale
    labels = torch.randint(0, V, (N, T), generator=g)
    labels[torch.rand(N, T, generator=g) < mask_frac] = -100
    labels[:, 0] = -100  # a prompt position (never scored anyway: it is labels[:, 0])
    return logits.to(device, dtype), labels.to(device)


def run(fn, logits, labels, gout=None, **kw):
    """(output, grad wrt logits) of fn on a fresh leaf copy of the logits."""
    x = logits.detach().clone().requires_grad_(True)
    out = fn(x, labels, **kw)
    val = out[0] if isinstance(out, tuple) else out
    if gout is None:
        gout = torch.randn(val.shape, generator=torch.Generator().manual_seed(1),
                           dtype=torch.float32).to(val.device)
    (val * gout.to(val.dtype)).sum().backward()
    return out, x.grad, gout


def ref64(fn_ref, logits, labels, gout, **kw):
    x = logits.detach().double().requires_grad_(True)
    out = fn_ref(x, labels, **kw)
    val = out[0] if isinstance(out, tuple) else out
    (val * gout.double()).sum().backward()
    return out, x.grad


def uses_kernel(out):
    name = type(out.grad_fn).__name__ if out.grad_fn is not None else ""
    return "LogprobsFn" in name


pytestmark = pytest.mark.skipif(not (INTERP or torch.cuda.is_available()),
                                reason="needs TRITON_INTERPRET=1 or CUDA")


# ----------------------------------------------------------------------------------------------
# kernels vs reference
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [
    dict(),                                           # one chunk (block > V)
    dict(V=257, block=64),                            # several chunks, V not a block multiple
    dict(T=1),                                        # nothing to score
    dict(T=2, V=100, block=32),
    dict(temperature=0.7, block=64),
    dict(temperature=1.9, N=2, T=5),
    dict(scale=1e4, block=64),                        # +-1e4 logits: no overflow
    dict(ignore_index=-1, block=64),
])
@pytest.mark.parametrize("sequence", [False, True])
def test_kernels_match_reference(case, sequence, monkeypatch):
    case = dict(case)
    block = case.pop("block", None)
    if block:
        monkeypatch.setenv("BPO_FAST_LOGPROBS_BLOCK_V", str(block))
    temperature = case.pop("temperature", 1.0)
    ignore_index = case.pop("ignore_index", -100)
    logits, labels = make(**case, device=DEV)
    if ignore_index != -100:
        labels[labels == -100] = ignore_index
    kw = dict(temperature=temperature, ignore_index=ignore_index)
    fn, fn_ref = ((sequence_logprobs, sequence_logprobs_reference) if sequence
                  else (token_logprobs, token_logprobs_reference))
    out, grad, gout = run(fn, logits, labels, **kw)
    ref, ref_grad = ref64(fn_ref, logits, labels, gout, **kw)
    val, rval = (out[0], ref[0]) if sequence else (out, ref)
    assert val.dtype == torch.float32
    assert val.shape == rval.shape
    assert torch.isfinite(val).all() and torch.isfinite(grad).all()
    scale = max(1.0, case.get("scale", 3.0) / 100)
    torch.testing.assert_close(val.double(), rval, rtol=1e-5, atol=2e-5 * scale)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)
    if sequence:
        assert out[1].dtype == torch.int64
        assert torch.equal(out[1], ref[1])
    if logits.shape[1] > 1:
        assert uses_kernel(val)


def test_all_masked_rows_and_all_ignored():
    logits, labels = make(N=3, T=6, V=90, device=DEV)
    labels[1] = -100
    out, grad, _ = run(sequence_logprobs, logits, labels)
    logps, n = out
    assert logps[1].item() == 0.0 and n[1].item() == 0
    assert torch.all(grad[1] == 0)
    assert torch.isfinite(logps).all() and torch.isfinite(grad).all()
    labels[:] = -100
    out, grad, _ = run(sequence_logprobs, logits, labels)
    assert torch.all(out[0] == 0) and torch.all(out[1] == 0)
    assert torch.all(grad == 0)
    tok, grad, _ = run(token_logprobs, logits, labels)
    assert torch.all(tok == 0) and torch.all(grad == 0)


def test_last_position_and_ignored_rows_get_zero_grad_even_when_poisoned():
    # the backward writes zeros (it does not rely on a zero-initialised buffer): check with
    # the in-place backward, whose buffer starts out holding the logits
    logits, labels = make(N=2, T=5, V=70, device=DEV)
    labels[0, 2] = -100
    x = logits.clone().requires_grad_(True)
    y = x * 1.0
    token_logprobs(y, labels, inplace_backward=True).sum().backward()
    assert torch.all(x.grad[:, -1] == 0)
    assert torch.all(x.grad[0, 1] == 0)


def test_non_contiguous_logits_no_copy():
    logits, labels = make(N=3, T=6, V=120, device=DEV)
    big = torch.randn(3, 9, 150, device=DEV)
    big[:, 1:7, 10:130] = logits
    view = big[:, 1:7, 10:130]          # unit stride over V, padded rows
    assert not view.is_contiguous()
    out, grad, gout = run(lambda x, y: token_logprobs(x[:, 1:7, 10:130], y), big, labels)
    ref, ref_grad = ref64(token_logprobs_reference, logits, labels, gout)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad[:, 1:7, 10:130].double(), ref_grad, rtol=1e-4, atol=1e-6)
    assert torch.all(grad[:, :1] == 0) and torch.all(grad[:, :, :10] == 0)
    # [T, N, V] storage seen as [N, T, V]: swapped row strides
    tnv = logits.transpose(0, 1).contiguous().transpose(0, 1)
    out, grad, gout = run(token_logprobs, tnv, labels)
    ref, ref_grad = ref64(token_logprobs_reference, logits, labels, gout)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)
    # no unit stride over V: copied, still right
    vmajor = logits.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    out, grad, gout = run(token_logprobs, vmajor, labels)
    torch.testing.assert_close(out.double(), ref64(token_logprobs_reference, logits, labels,
                                                   gout)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sequence", [False, True])
def test_inplace_backward(sequence):
    logits, labels = make(N=2, T=6, V=110, device=DEV)
    fn = sequence_logprobs if sequence else token_logprobs
    _, grad_ref, gout = run(fn, logits, labels)
    x = logits.clone().requires_grad_(True)
    y = x * 1.0                      # the tensor whose storage gets the gradient
    out = fn(y, labels, inplace_backward=True)
    val = out[0] if sequence else out
    (val * gout).sum().backward()
    torch.testing.assert_close(x.grad, grad_ref)
    torch.testing.assert_close(y.detach(), grad_ref)   # the logits were overwritten


def test_inplace_backward_refuses_a_consumer_that_saved_the_logits():
    logits, labels = make(N=2, T=4, V=60, device=DEV)
    x = logits.clone().requires_grad_(True)
    y = torch.tanh(x)                # tanh saves its output (y) for backward
    out = token_logprobs(y, labels, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_out_of_range_label_poisons_without_reading_out_of_bounds():
    # the kernel itself (the CUDA hot path without BPO_FAST_DEBUG skips the host-side check)
    logits, labels = make(N=2, T=4, V=50, mask_frac=0.0, device=DEV)
    labels[0, 2] = 50
    labels[1, 3] = -7
    lp, lse = K.forward(logits, labels, -100, 1.0)
    assert torch.isnan(lp[0, 1]) and torch.isnan(lp[1, 2])
    ok = ~torch.isnan(lp)
    assert ok.sum() == lp.numel() - 2
    ref = token_logprobs_reference(logits, labels.clamp(0, 49))
    torch.testing.assert_close(lp[ok], ref[ok], rtol=1e-5, atol=1e-5)
    g = torch.ones_like(lp)
    grad = K.backward(logits, labels, lse, -100, 1.0, mode=K.MODE_TOKEN, g=g)
    assert torch.all(grad[0, 1] == 0) and torch.all(grad[1, 2] == 0)
    assert torch.isfinite(grad).all()


def test_cpu_without_interpreter_uses_reference(monkeypatch):
    logits, labels = make(N=2, T=5, V=40)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = logits.clone().requires_grad_(True)
    out = token_logprobs(x, labels)
    assert not uses_kernel(out)
    assert torch.equal(out, token_logprobs_reference(logits, labels))


def test_float64_uses_reference_and_gradcheck():
    logits, labels = make(N=2, T=4, V=7, mask_frac=0.3)
    labels[1, 2] = -100
    x = logits.double().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda z: token_logprobs(z, labels, temperature=0.8), (x,), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(
        lambda z: sequence_logprobs(z, labels)[0], (x,), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(
        lambda z: token_logprobs_reference(z, labels), (x,), eps=1e-6, atol=1e-6)


def test_debug_flag_checks_labels(monkeypatch):
    logits, labels = make(N=2, T=4, V=30)
    labels[1, 1] = 30
    # on CPU the range check is always on (no sync to avoid)
    with pytest.raises(ValueError, match=r"labels must be in \[0, V=30\)"):
        token_logprobs(logits, labels)
    monkeypatch.setenv("BPO_FAST_DEBUG", "1")
    assert L.debug_checks()
    with pytest.raises(ValueError, match="labels"):
        sequence_logprobs(logits, labels)


def test_bad_inputs():
    logits, labels = make(N=2, T=4, V=30)
    with pytest.raises(ValueError, match="logits must be"):
        token_logprobs(logits[0], labels)                      # rank
    with pytest.raises(ValueError, match="labels must be"):
        token_logprobs(logits, labels[:, :-1])                 # shape
    with pytest.raises(ValueError, match="labels must be"):
        token_logprobs(logits, labels[0])                      # rank
    with pytest.raises(ValueError, match="logits must be a floating"):
        token_logprobs(logits.long(), labels)
    with pytest.raises(ValueError, match="labels must be an int64"):
        token_logprobs(logits, labels.float())
    bad = labels.clone()
    bad[0, 3] = -5
    with pytest.raises(ValueError, match=r"\[0, V=30\)"):
        sequence_logprobs(logits, bad)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(logits, labels, temperature=0.0)
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        token_logprobs(logits.numpy(), labels)
    with pytest.raises(TypeError, match="inplace_backward"):
        token_logprobs(logits, labels, inplace_backward="yes")
    with pytest.raises(TypeError, match="ignore_index"):
        token_logprobs(logits, labels, ignore_index=1.5)


# ----------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------

TOL = {torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float32: 1e-5}


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("V", [32000, 32001])
def test_cuda_dtypes_vs_fp32_reference(dtype, V):
    logits, labels = make(N=4, T=129, V=V, scale=4.0, device="cuda", dtype=dtype)
    labels[2] = -100
    out, grad, gout = run(sequence_logprobs, logits, labels, temperature=0.9)
    ref, ref_grad = ref64(sequence_logprobs_reference, logits.float(), labels, gout,
                          temperature=0.9)
    # the kernel reads the same rounded logits: differences are float32 accumulation only
    torch.testing.assert_close(out[0].double(), ref[0], rtol=1e-5, atol=1e-3)
    assert grad.dtype == dtype
    err = (grad.double() - ref_grad).abs().max() / ref_grad.abs().max()
    assert err < TOL[dtype]
    tok, _, _ = run(token_logprobs, logits, labels)
    tref = token_logprobs_reference(logits.float(), labels)
    torch.testing.assert_close(tok, tref, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
def test_cuda_large_shape_qwen_vocab():
    """N*T = 32k tokens, V = 152064, bf16 (10 GB of logits): forward and in-place backward,
    checked chunk-wise against the float32 reference."""
    torch.cuda.empty_cache()
    N, T, V = 16, 2048, 152064
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(N, T, V, device="cuda", generator=g, dtype=torch.bfloat16) * 3)
    labels = torch.randint(0, V, (N, T), device="cuda", generator=g)
    labels[:, :100] = -100
    labels[5] = -100
    x = logits.clone().requires_grad_(True)
    logps, n = sequence_logprobs(x, labels)
    rows = [0, 5, 11]
    for r in rows:
        ref, rn = sequence_logprobs_reference(logits[r:r + 1].float(), labels[r:r + 1])
        torch.testing.assert_close(logps[r:r + 1], ref, rtol=1e-5, atol=1e-2)
        assert torch.equal(n[r:r + 1], rn)
    gout = torch.randn(N, device="cuda")
    y = x * 1
    logps, _ = sequence_logprobs(y, labels, inplace_backward=True)
    (logps * gout).sum().backward()
    del y
    for r in rows:
        z = logits[r:r + 1].float().requires_grad_(True)
        ref, _ = sequence_logprobs_reference(z, labels[r:r + 1])
        (ref * gout[r]).sum().backward()
        err = (x.grad[r:r + 1].float() - z.grad).abs().max() / z.grad.abs().max().clamp_min(1e-30)
        assert err < TOL[torch.bfloat16] or z.grad.abs().max() == 0
    assert torch.all(x.grad[5] == 0)


# ----------------------------------------------------------------------------------------------
# compiled code (no GPU needed): the interpreter accepts things the compiler refuses
# ----------------------------------------------------------------------------------------------

_COMPILE_SCRIPT = r'''
import json, re
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from bpo_fast.kernels import logprobs as KL, dpo as KD

target = GPUTarget("cuda", 90, 32)
DIV = {"sxn", "sxt", "sgn", "sgt", "V"}   # what the JIT specialises for aligned real shapes

def comp(fn, types, consts, num_warps):
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if n not in consts and (n.endswith("_ptr") or n in DIV)}
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                    attrs=attrs)
    return triton.compile(src, target=target, options={"num_warps": num_warps})

res = {}
blk, warps = KL.block_config(152064, 2)
t = {"x_ptr": "*bf16", "lab_ptr": "*i64", "lp_ptr": "*fp32", "lse_ptr": "*fp32", "scale2": "fp32",
     "sxn": "i64", "sxt": "i64", "sln": "i64", "slt": "i64"}
res["fwd"] = comp(KL._fwd_kernel, t, {"BLOCK_V": blk}, warps).asm["ptx"]
t2 = dict(t, gx_ptr="*bf16", g_ptr="*fp32", gl_ptr="*fp32", gls_ptr="*fp32", dl_ptr="*fp32",
          sgn="i64", sgt="i64", inv_temp="fp32", inv_B="fp32")
for mode in (0, 1, 2):
    res[f"bwd{mode}"] = comp(KL._bwd_kernel, t2, {"MODE": mode, "BLOCK_V": blk},
                             warps).asm["ptx"]
res["seq"] = comp(KL._seq_sum_kernel, {"lp_ptr": "*fp32", "lab_ptr": "*i64", "out_ptr": "*fp32",
                  "cnt_ptr": "*i64", "sln": "i64", "slt": "i64"}, {"BLOCK_T": 1024}, 4).asm["ptx"]
tp = {n: "*fp32" for n in KD._dpo_pairs_kernel.arg_names if n.endswith("_ptr")}
tp.update(lab_ptr="*i64", ntok_ptr="*i64", lc_ptr="*i64", lr_ptr="*i64", sln="i64", slt="i64",
          beta="fp32", eps="fp32", tau="fp32", log1m_eps="fp32", log_eps="fp32")
for loss in range(12):   # every loss branch; both reduction modes (alternating, for time)
    tokens = loss % 2 == 0
    if True:
        res[f"dpo{loss}{tokens}"] = comp(KD._dpo_pairs_kernel, tp, {
            "LOSS": loss, "TOKENS": tokens, "HAS_LEN": not tokens, "BLOCK_B": 16,
            "BLOCK_T": 256}, 4).asm["ptx"]
print(json.dumps({k: {"v4_loads": "ld.global.v4" in v, "v4_stores": "st.global.v4" in v,
                      "ex2": v.count("ex2.approx")} for k, v in res.items()}))
'''


def test_kernels_compile_for_sm90():
    """Compile every kernel specialisation for an H100 (AST -> PTX -> cubin, no GPU needed) in a
    subprocess without TRITON_INTERPRET; the hot loops must use 16-byte vector accesses."""
    import json
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True,
                          text=True, env=env, timeout=600)
    if proc.returncode != 0 and ("ptxas" in proc.stderr and "not found" in proc.stderr):
        pytest.skip("no ptxas for sm_90 in this triton")
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(info) == 5 + 12
    assert info["fwd"]["v4_loads"]
    for mode in (0, 1, 2):
        assert info[f"bwd{mode}"]["v4_loads"] and info[f"bwd{mode}"]["v4_stores"]
    # one exp2 per logit in the forward (16 per thread with the default block) plus a rescale
    blk, warps = K.block_config(152064, 2)
    assert info["fwd"]["ex2"] <= blk // (32 * warps) + 2
