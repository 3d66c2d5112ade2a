"""Logit soft-capping in the fused LM head (Gemma 2 / PaliGemma 2 ``final_logit_softcapping``).

Every implementation (the torch reducer, the cuBLAS strategy's Triton row kernels, the fused
Triton kernels; under TRITON_INTERPRET=1 here, fp32) against the plain-PyTorch reference
:func:`bpo_fast.ops.linear.linear_token_logprobs_reference` (materialised logits,
``cap * tanh(z / cap)``, then the temperature, as HF then TRL apply them), values and
gradients, including logits deep in tanh's saturation.
"""

import math

import pytest
import torch

from bpo_fast.ops.dpo import dpo_loss
from bpo_fast.ops.linear import (fused_linear_dpo_loss, linear_sequence_logprobs,
                                 linear_token_logprobs, linear_token_logprobs_reference)
from bpo_fast.ops.preference import PreferenceLoss, preference_loss

from test_linear import IMPLS, grads_of, make

TOL = dict(rtol=1e-5, atol=1e-5)


def _inputs(scale=1.0, **kw):
    hidden, weight, labels, bias = make(**kw)
    hidden = hidden * scale
    params = [hidden, weight] + ([bias] if bias is not None else [])
    for p in params:
        p.requires_grad_(True)
    return hidden, weight, labels, bias, params


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", [
    dict(cap=2.0),                                            # |z / cap| up to ~5
    dict(cap=30.0, bias=True, temperature=0.7),               # Gemma 2's cap, barely bent
    dict(cap=0.5, chunk_sizes=(5, 64)),                       # several tiles, saturated
    dict(cap=1.5, chunk_sizes=(12, 16), N=2, T=40, V=37, temperature=1.9),  # token-outer
    dict(cap=30.0, scale=60.0, bias=True),                    # |z| ~ 500: tanh == +-1 in fp32
])
def test_capped_logprobs_and_grads_match_the_reference(impl, case):
    case = dict(case)
    cap, temperature = case.pop("cap"), case.pop("temperature", 1.0)
    chunk_sizes, scale = case.pop("chunk_sizes", None), case.pop("scale", 1.0)
    hidden, weight, labels, bias, params = _inputs(scale, **case)
    gout = torch.randn(labels.shape[0], labels.shape[1] - 1,
                       generator=torch.Generator().manual_seed(1))
    out, g = grads_of(lambda: linear_token_logprobs(
        hidden, weight, labels, bias=bias, temperature=temperature, impl=impl,
        chunk_sizes=chunk_sizes, logit_softcap=cap), params, gout)
    ref, g_ref = grads_of(lambda: linear_token_logprobs_reference(
        hidden, weight, labels, bias=bias, temperature=temperature, logit_softcap=cap),
        params, gout)
    # the cap matters on these inputs (the un-capped log-probs are far off)
    plain = linear_token_logprobs_reference(hidden, weight, labels, bias=bias,
                                            temperature=temperature)
    assert (plain - ref).abs().max() > 1e-2
    torch.testing.assert_close(out, ref, **TOL)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, scale))


def test_reference_is_hf_then_trl_order():
    """cap(z) first (HF Gemma 2's lm_head + final_logit_softcapping), then / temperature (TRL)."""
    hidden, weight, labels, _ = make(N=2, T=6, V=50)
    cap, temp = 3.0, 0.6
    ref = linear_token_logprobs_reference(hidden, weight, labels, temperature=temp,
                                          logit_softcap=cap)
    logits = hidden @ weight.t()
    logits = torch.tanh(logits / cap) * cap  # modeling_gemma2 / modeling_paligemma
    lp = torch.log_softmax(logits[:, :-1] / temp, -1)
    scored = labels[:, 1:] != -100
    want = lp.gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0] * scored
    torch.testing.assert_close(ref, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_capped_sequence_logprobs(impl):
    hidden, weight, labels, bias = make(N=4, T=11, V=101, bias=True, seed=3)
    labels[1] = -100
    logps, n_tok = linear_sequence_logprobs(hidden, weight, labels, bias=bias, impl=impl,
                                            chunk_sizes=(6, 48), logit_softcap=1.0)
    ref = linear_token_logprobs_reference(hidden, weight, labels, bias=bias, logit_softcap=1.0)
    torch.testing.assert_close(logps, ref.sum(1), **TOL)
    assert logps[1].item() == 0.0 and n_tok[1].item() == 0


def _pairs(B=3, T=9, V=83, H=24, seed=5, scale=1.0):
    hidden, weight, labels, bias = make(N=2 * B, T=T, V=V, H=H, bias=True, seed=seed)
    hidden = hidden * scale
    g = torch.Generator().manual_seed(seed + 1)
    ref_c, ref_r = torch.randn(B, generator=g) * 5 - 20, torch.randn(B, generator=g) * 5 - 20
    return hidden, weight, labels, bias, ref_c, ref_r


@pytest.mark.parametrize("impl,gif", [("torch", True), ("torch", False), ("cublas", True),
                                      ("cublas", False), ("triton", False), ("hybrid", False)])
@pytest.mark.parametrize("scale", [1.0, 40.0])
def test_capped_preference_loss_matches_reference(impl, gif, scale):
    """The 3-GEMM path (gradients formed in the forward) and the composed path, with the RPO
    term, against the reference log-probs through the DPO loss, in and out of saturation."""
    hidden, weight, labels, bias, ref_c, ref_r = _pairs(scale=scale)
    params = [hidden, weight, bias]
    for p in params:
        p.requires_grad_(True)
    cap, temp, B = 2.5, 0.8, 3
    out = preference_loss(hidden, weight, labels, ref_c, ref_r, bias=bias, impl=impl,
                          grad_in_forward=gif, chunk_sizes=(10, 32), temperature=temp,
                          rpo_alpha=0.3, logit_softcap=cap)
    g = torch.autograd.grad(out.loss, params)
    tok = linear_token_logprobs_reference(hidden, weight, labels, bias=bias, temperature=temp,
                                          logit_softcap=cap)
    lp = tok.sum(1)
    ref = dpo_loss(lp[:B], lp[B:], ref_c, ref_r)
    n_chosen = (labels[:B, 1:] != -100).sum()
    loss = ref.loss + 0.3 * (-lp[:B].sum() / n_chosen)
    g_ref = torch.autograd.grad(loss, params)
    torch.testing.assert_close(out.loss, loss, **TOL)
    torch.testing.assert_close(out.policy_chosen_logps, lp[:B].detach(), **TOL)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * scale)


def test_module_and_dpo_wrapper_pass_the_cap():
    hidden, weight, labels, bias, ref_c, ref_r = _pairs()
    m = PreferenceLoss(logit_softcap=2.0)
    assert "logit_softcap=2.0" in repr(m)
    a = m(hidden, weight, labels, ref_c, ref_r, bias=bias)
    b = fused_linear_dpo_loss(hidden, weight, labels, ref_c, ref_r, bias=bias, logit_softcap=2.0)
    c = fused_linear_dpo_loss(hidden, weight, labels, ref_c, ref_r, bias=bias)
    torch.testing.assert_close(a.dpo.loss, b.loss)
    assert not torch.allclose(b.policy_chosen_logps, c.policy_chosen_logps)


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, math.inf, math.nan, True, "30", [30.0]])
def test_invalid_cap_is_a_clear_error(bad):
    hidden, weight, labels, bias, ref_c, ref_r = _pairs()
    for call in (
            lambda: linear_token_logprobs(hidden, weight, labels, logit_softcap=bad),
            lambda: linear_sequence_logprobs(hidden, weight, labels, logit_softcap=bad),
            lambda: preference_loss(hidden, weight, labels, ref_c, ref_r, logit_softcap=bad),
            lambda: fused_linear_dpo_loss(hidden, weight, labels, ref_c, ref_r,
                                          logit_softcap=bad),
            lambda: PreferenceLoss(logit_softcap=bad)):
        with pytest.raises(ValueError, match="logit_softcap must be None or a finite number > 0"):
            call()


# ----------------------------------------------------------------------------------------------
# GPU: the compiled capped kernels (bf16 / fp32, several tiles, deterministic backward)
# ----------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", IMPLS)
def test_cuda_capped_matches_fp32_reference(impl, dtype, deterministic):
    dev = torch.device("cuda")
    hidden, weight, labels, bias = make(N=8, T=257, H=200, V=5003, device=dev, bias=True)
    hidden, weight, bias = (hidden * 4).to(dtype), weight.to(dtype), bias.to(dtype)
    params = [hidden, weight, bias]
    for p in params:
        p.requires_grad_(True)
    gout = torch.randn(labels.shape[0], labels.shape[1] - 1, device=dev)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    try:
        out, g = grads_of(lambda: linear_token_logprobs(
            hidden, weight, labels, bias=bias, impl=impl, chunk_sizes=(300, 1024),
            temperature=0.9, logit_softcap=5.0), params, gout)
    finally:
        torch.use_deterministic_algorithms(prev)
    ref, g_ref = grads_of(lambda: linear_token_logprobs_reference(
        hidden, weight, labels, bias=bias, temperature=0.9, logit_softcap=5.0), params, gout)
    half = dtype != torch.float32
    torch.testing.assert_close(out, ref, atol=2e-3 if half else 1e-4, rtol=1e-3 if half else 1e-4)
    for a, b in zip(g, g_ref):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2 if half else 1e-4,
                                   rtol=2e-2 if half else 1e-3)
