"""Fused LM head (bpo_fast.ops.linear) against materialised logits + the reference log-probs.

The Triton implementations run under TRITON_INTERPRET=1 here (small fp32 shapes, V and H not
multiples of any block); bf16/fp16 and large shapes are checked on a GPU (``cuda`` marks).
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bpo_fast.ops import linear as L
from bpo_fast.ops.dpo import LOSS_TYPES, DPOOutput, fused_dpo_loss
from bpo_fast.ops.linear import (LinearDPOLoss, fused_linear_dpo_loss, linear_sequence_logprobs,
                                 linear_token_logprobs)
from bpo_fast.ops.logprobs import sequence_logprobs, token_logprobs

IMPLS = ["torch", "cublas", "triton", "hybrid"]
CPU = torch.device("cpu")


def make(N=3, T=9, H=40, V=150, dtype=torch.float32, device=CPU, bias=False, seed=0,
         mask_frac=0.3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H ** 0.5 * 3
    b = torch.randn(V, generator=g) if bias else None
    labels = torch.randint(0, V, (N, T), generator=g)
    labels[torch.rand(N, T, generator=g) < mask_frac] = -100
    labels[:, :2] = -100  # a prompt
    out = [hidden.to(device, dtype), weight.to(device, dtype), labels.to(device)]
    out.append(None if b is None else b.to(device, dtype))
    return out


def ref_tokens(hidden, weight, labels, bias=None, temperature=1.0, ignore_index=-100):
    """The definition: materialised float32 logits through the reference token_logprobs."""
    logits = hidden.float() @ weight.float().t()
    if bias is not None:
        logits = logits + bias.float()
    return token_logprobs(logits / temperature, labels, ignore_index=ignore_index)


def grads_of(fn, tensors, gout):
    for t in tensors:
        t.grad = None
    out = fn()
    (out * gout).sum().backward()
    gs = [None if t.grad is None else t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    return out.detach(), gs


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", [
    dict(),                                        # single tile
    dict(bias=True, temperature=0.7),
    dict(chunk_sizes=(5, 64)),                     # several token and vocab tiles, vocab-outer
    dict(chunk_sizes=(12, 16), N=2, T=40, V=37),   # S > V: token-outer loop order
    dict(bias=True, chunk_sizes=(7, 100), H=80, V=257, temperature=1.9),
])
def test_token_logprobs_and_grads_match_materialised_logits(impl, case):
    case = dict(case)
    temperature = case.pop("temperature", 1.0)
    chunk_sizes = case.pop("chunk_sizes", None)
    hidden, weight, labels, bias = make(**case)
    params = [hidden, weight] + ([bias] if bias is not None else [])
    for p in params:
        p.requires_grad_(True)
    gout = torch.randn(labels.shape[0], labels.shape[1] - 1)
    out, g = grads_of(lambda: linear_token_logprobs(
        hidden, weight, labels, bias=bias, temperature=temperature, impl=impl,
        chunk_sizes=chunk_sizes), params, gout)
    ref, g_ref = grads_of(lambda: ref_tokens(hidden, weight, labels, bias, temperature),
                          params, gout)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_sequence_logprobs_match_reference(impl):
    hidden, weight, labels, bias = make(N=4, T=11, V=101, bias=True, seed=3)
    labels[1] = -100  # an all-masked row
    logps, n_tok = linear_sequence_logprobs(hidden, weight, labels, bias=bias, impl=impl,
                                            chunk_sizes=(6, 48))
    logits = hidden @ weight.t() + bias
    ref_logps, ref_n = sequence_logprobs(logits, labels)
    torch.testing.assert_close(logps, ref_logps.float(), atol=5e-5, rtol=1e-5)
    assert n_tok.dtype == torch.int64 and torch.equal(n_tok, ref_n.to(torch.int64))
    assert logps[1].item() == 0.0 and n_tok[1].item() == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_all_masked_gives_zeros_and_zero_grads(impl):
    hidden, weight, labels, bias = make(bias=True)
    labels.fill_(-100)
    for p in (hidden, weight, bias):
        p.requires_grad_(True)
    logps, n_tok = linear_sequence_logprobs(hidden, weight, labels, bias=bias, impl=impl)
    assert torch.equal(logps, torch.zeros(3))
    assert torch.equal(n_tok, torch.zeros(3, dtype=torch.long))
    logps.sum().backward()
    for p in (hidden, weight, bias):
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p))


@pytest.mark.parametrize("impl", IMPLS)
def test_single_scored_token(impl):
    hidden, weight, labels, _ = make(N=2, T=5, V=77)
    labels.fill_(-100)
    labels[1, 3] = 42  # scored by position (1, 2)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    out = linear_token_logprobs(hidden, weight, labels, impl=impl)
    ref = torch.log_softmax(hidden[1, 2] @ weight.t(), -1)[42]
    assert out.count_nonzero() == 1
    torch.testing.assert_close(out[1, 2], ref)
    out.sum().backward()
    p = torch.softmax(hidden[1, 2] @ weight.t(), -1).detach()
    onehot = torch.zeros(77)
    onehot[42] = 1
    torch.testing.assert_close(hidden.grad[1, 2], (onehot - p) @ weight.detach())
    assert hidden.grad.count_nonzero() == hidden.grad[1, 2].count_nonzero()
    torch.testing.assert_close(weight.grad, torch.outer(onehot - p, hidden[1, 2].detach()))


def test_t_equal_one_scores_nothing():
    hidden, weight, labels, _ = make(N=2, T=1)
    logps, n_tok = linear_sequence_logprobs(hidden, weight, labels)
    assert torch.equal(logps, torch.zeros(2))
    assert torch.equal(n_tok, torch.zeros(2, dtype=torch.long))


class _CountMatmuls(TorchDispatchMode):
    OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::addmm_"}

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.OPS:
            self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("frozen", ["weight", "hidden", "none"])
def test_frozen_inputs_cost_no_work(frozen):
    """One tile: backward = recompute + one GEMM per input that needs a gradient."""
    hidden, weight, labels, _ = make()
    hidden.requires_grad_(frozen != "hidden")
    weight.requires_grad_(frozen != "weight")
    out = linear_token_logprobs(hidden, weight, labels, impl="torch")
    with _CountMatmuls() as counter:
        out.sum().backward()
    assert counter.n == (3 if frozen == "none" else 2)
    assert (weight.grad is None) == (frozen == "weight")
    assert (hidden.grad is None) == (frozen == "hidden")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("frozen", ["weight", "hidden"])
def test_frozen_input_gradients(impl, frozen):
    hidden, weight, labels, bias = make(bias=True, V=123, seed=5)
    train = [t for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias))
             if name != frozen]
    for t in train:
        t.requires_grad_(True)
    gout = torch.randn(labels.shape[0], labels.shape[1] - 1)
    _, g = grads_of(lambda: linear_token_logprobs(hidden, weight, labels, bias=bias, impl=impl,
                                                  chunk_sizes=(8, 60)), train, gout)
    _, g_ref = grads_of(lambda: ref_tokens(hidden, weight, labels, bias), train, gout)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_hidden(impl):
    hidden, weight, labels, _ = make(N=3, T=8, H=40)
    # [T, N, 2H] storage, viewed as [N, T, H] with a stride-2 hidden dim
    base = torch.randn(8, 3, 80, requires_grad=True)
    hid = base.transpose(0, 1)[:, :, ::2]
    assert not hid.is_contiguous()
    gout = torch.randn(labels.shape[0], labels.shape[1] - 1)
    _, (g,) = grads_of(lambda: linear_token_logprobs(hid, weight, labels, impl=impl), [base], gout)
    out = linear_token_logprobs(hid, weight, labels, impl=impl)
    ref, (g_ref,) = grads_of(lambda: ref_tokens(hid, weight, labels), [base], gout)
    torch.testing.assert_close(out.detach(), ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(g, g_ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_weight(impl):
    """An LM head tied to an [H, V] matrix: weight is a transposed view (k-stride V). The fused
    kernels get it contiguous (one copy per op; 32-bit offsets could not hold (H-1) * V at
    H 8192, V 262208)."""
    hidden, weight, labels, _ = make(N=3, T=8, H=40, V=75)
    base = weight.t().contiguous().requires_grad_(True)  # [H, V] storage
    w = base.t()
    assert w.stride() == (1, 75)
    gout = torch.randn(labels.shape[0], labels.shape[1] - 1)
    out, (g,) = grads_of(lambda: linear_token_logprobs(hidden, w, labels, impl=impl), [base],
                         gout)
    ref, (g_ref,) = grads_of(lambda: ref_tokens(hidden, w, labels), [base], gout)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(g, g_ref, atol=2e-5, rtol=1e-4)


def test_custom_ignore_index_and_int32_labels():
    hidden, weight, labels, _ = make(V=90)
    labels = torch.where(labels == -100, torch.full_like(labels, 7), labels)
    out = linear_token_logprobs(hidden, weight, labels.int(), ignore_index=7)
    ref = ref_tokens(hidden, weight, labels, ignore_index=7)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


def test_bf16_logits_are_not_rounded_before_the_lse():
    """bf16 inputs: the products accumulate and stay float32, so the result equals the fp32
    computation on the bf16-rounded inputs far more closely than bf16 logits could."""
    hidden, weight, labels, _ = make(H=64, V=300, seed=2)
    hidden = (hidden * 4).bfloat16()
    weight = weight.bfloat16()
    out = linear_token_logprobs(hidden, weight, labels, impl="torch")
    ref32 = ref_tokens(hidden.float(), weight.float(), labels)
    ref_bf16_logits = token_logprobs((hidden @ weight.t()).float(), labels)
    err = (out - ref32).abs().max().item()
    assert err < 1e-4
    assert (ref_bf16_logits - ref32).abs().max().item() > 10 * err


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dlogits_of_the_float32_tile(dtype, bias):
    """The cublas path's d: in place over a float32 tile, a buffer of its own for 2-byte dtypes
    (never over the float32 bytes it reads: no write-after-read race between warps), leaving
    the tile intact."""
    from bpo_fast.kernels import linear as K

    g = torch.Generator().manual_seed(1)
    C, V, v0, inv_t = 7, 300, 100, 0.5
    z = torch.randn(C, V, generator=g) * 3
    b = torch.randn(V, generator=g)
    tgt = torch.randint(v0, v0 + V, (C,), generator=g)
    tgt[2] = 3  # a target in another vocabulary chunk
    if not bias:
        b = torch.zeros(V)
    lse = torch.logsumexp((z + b) * inv_t, 1) + 0.3  # as if other chunks held mass too
    gs = torch.randn(C, generator=g)
    onehot = torch.zeros(C, V)
    hit = tgt >= v0
    onehot[hit, tgt[hit] - v0] = 1
    ref = (onehot - torch.exp((z + b) * inv_t - lse[:, None])) * gs[:, None]
    zz = z.clone()
    d = K.dlogits(zz, b if bias else None, tgt, lse, gs, v0, inv_t, dtype)
    assert d.dtype == dtype and d.shape == (C, V)
    if dtype == torch.float32:
        assert d.data_ptr() == zz.data_ptr()
        torch.testing.assert_close(d, ref, atol=1e-5, rtol=1e-5)
    else:
        assert d.data_ptr() != zz.data_ptr() and torch.equal(zz, z)
        torch.testing.assert_close(d.float(), ref,
                                   atol=1e-2 if dtype == torch.bfloat16 else 1e-3, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cublas_path_half_precision_matches_reference_path(dtype):
    hidden, weight, labels, bias = make(N=2, T=12, H=48, V=203, bias=True, seed=9)
    params = [t.to(dtype).requires_grad_(True) for t in (hidden, weight, bias)]
    gout = torch.randn(2, 11)
    res = [grads_of(lambda: linear_token_logprobs(params[0], params[1], labels, bias=params[2],
                                                  impl=impl, chunk_sizes=(8, 64)), params, gout)
           for impl in ("cublas", "torch")]
    (a, ga), (b, gb) = res
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)  # both float32 from the same tiles
    for x, y in zip(ga, gb):
        assert x.dtype == dtype
        torch.testing.assert_close(x.float(), y.float(), atol=1e-2, rtol=1e-2)


def test_chunk_plan_bounds_the_tile():
    for S, V, budget in [(16384, 152064, 512 << 20), (4096, 32000, 512 << 20),
                         (100000, 1000, 1 << 20), (3, 5, 4), (7000, 128256, 64 << 20)]:
        tc, vc = L._plan(S, V, budget)
        assert tc[0][0] == 0 and tc[-1][1] == S and vc[0][0] == 0 and vc[-1][1] == V
        assert all(a[1] == b[0] for a, b in zip(tc, tc[1:]))
        assert all(a[1] == b[0] for a, b in zip(vc, vc[1:]))
        ct = max(b - a for a, b in tc)
        cv = max(b - a for a, b in vc)
        # within the budget unless a side had to stay at its efficiency minimum
        assert ct * cv * 4 <= max(budget, L._MIN_TILE * L._ALIGN * 4)


def test_bad_inputs_raise_clear_errors():
    hidden, weight, labels, _ = make()
    with pytest.raises(ValueError, match="weight must be \\[V, H\\]"):
        linear_token_logprobs(hidden, weight[:, :-1], labels)
    with pytest.raises(TypeError, match="same dtype"):
        linear_token_logprobs(hidden, weight.double(), labels)
    with pytest.raises(TypeError, match="same dtype"):
        linear_token_logprobs(hidden.bfloat16(), weight, labels)
    with pytest.raises(TypeError, match="hidden must be float32"):
        linear_token_logprobs(hidden.double(), weight.double(), labels)
    with pytest.raises(ValueError, match="hidden must be \\[N, T, H\\]"):
        linear_token_logprobs(hidden[0], weight, labels)
    with pytest.raises(ValueError, match="labels must be \\[N, T\\]"):
        linear_token_logprobs(hidden, weight, labels[:, :-1])
    with pytest.raises(TypeError, match="labels must be an integer"):
        linear_token_logprobs(hidden, weight, labels.float())
    with pytest.raises(ValueError, match="bias must be \\[V\\]"):
        linear_token_logprobs(hidden, weight, labels, bias=torch.zeros(3))
    with pytest.raises(TypeError, match="bias must have weight's dtype"):
        linear_token_logprobs(hidden, weight, labels, bias=torch.zeros(150, dtype=torch.float16))
    with pytest.raises(ValueError, match="temperature"):
        linear_token_logprobs(hidden, weight, labels, temperature=0.0)
    with pytest.raises(ValueError, match="impl must be one of"):
        linear_token_logprobs(hidden, weight, labels, impl="cuda")
    with pytest.raises(ValueError, match="chunk_sizes"):
        linear_token_logprobs(hidden, weight, labels, chunk_sizes=(0, 4))
    with pytest.raises(ValueError, match="chunk_bytes"):
        linear_token_logprobs(hidden, weight, labels, chunk_bytes=-1)
    with pytest.raises(TypeError, match="hidden must be a torch.Tensor"):
        linear_token_logprobs(hidden.numpy(), weight, labels)
    bad = labels.clone()
    bad[0, 5] = 150  # == V
    with pytest.raises(ValueError, match="labels must be in \\[0, V=150\\)"):
        linear_token_logprobs(hidden, weight, bad)
    bad[0, 5] = -3
    with pytest.raises(ValueError, match="labels must be in"):
        linear_token_logprobs(hidden, weight, bad)
    # an out-of-range id at an unscored position (position 0 is never scored) is fine
    ok = labels.clone()
    ok[0, 0] = 10 ** 6
    linear_token_logprobs(hidden, weight, ok)


# ----------------------------------------------------------------------------------------------
# DPO loss from hidden states
# ----------------------------------------------------------------------------------------------


def dpo_inputs(B=3, T=10, H=48, V=130, seed=11, bias=True):
    hidden, weight, labels, b = make(N=2 * B, T=T, H=H, V=V, bias=bias, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    ref_c = -torch.rand(B, generator=g) * 30 - 20
    ref_r = -torch.rand(B, generator=g) * 30 - 20
    return hidden, weight, labels, b, ref_c, ref_r


def _loss_kwargs(loss_type):
    return dict(beta=0.3, loss_type=loss_type,
                label_smoothing=0.1 if loss_type in ("exo_pair", "robust", "cdpo") else 0.0)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_dpo_loss_matches_fused_dpo_loss_on_logits(loss_type):
    hidden, weight, labels, bias, ref_c, ref_r = dpo_inputs()
    labels[1] = -100  # a chosen row with no scored token (its log-prob and count are 0)
    params = [hidden, weight, bias]
    for p in params:
        p.requires_grad_(True)
    kw = _loss_kwargs(loss_type)
    out = fused_linear_dpo_loss(hidden, weight, labels, ref_c, ref_r, bias=bias,
                                temperature=0.8, impl="torch", chunk_sizes=(9, 64), **kw)
    assert isinstance(out, DPOOutput)
    g = torch.autograd.grad(out.loss, params)
    ref = fused_dpo_loss((hidden @ weight.t() + bias) / 0.8, labels, ref_c, ref_r, **kw)
    g_ref = torch.autograd.grad(ref.loss, params)
    for name in ("loss", "losses", "chosen_rewards", "rejected_rewards", "reward_margins",
                 "reward_accuracy", "policy_chosen_logps", "policy_rejected_logps"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), atol=1e-4, rtol=1e-5)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", ["cublas", "triton"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_loss_triton_impls(impl, loss_type):
    hidden, weight, labels, bias, ref_c, ref_r = dpo_inputs(V=157, H=40, seed=4)
    params = [hidden, weight, bias]
    for p in params:
        p.requires_grad_(True)
    kw = _loss_kwargs(loss_type)
    out = fused_linear_dpo_loss(hidden, weight, labels, ref_c, ref_r, bias=bias, impl=impl, **kw)
    g = torch.autograd.grad(out.loss, params)
    ref = fused_dpo_loss(hidden @ weight.t() + bias, labels, ref_c, ref_r, **kw)
    g_ref = torch.autograd.grad(ref.loss, params)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", ["torch", "cublas"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "discopop"])
def test_dpo_grad_in_forward_equals_composed_path(impl, loss_type):
    """Gradients formed in the forward pass (group by group of pairs) equal the composed path,
    for d loss, for weights on the per-pair losses and for an extra term on the log-probs."""
    hidden, weight, labels, bias, ref_c, ref_r = dpo_inputs(B=4, V=111, H=40, seed=8)
    labels[5] = -100  # a rejected row with no scored token
    params = [hidden, weight, bias]
    for p in params:
        p.requires_grad_(True)
    kw = _loss_kwargs(loss_type)
    wl = torch.tensor([0.5, -1.0, 2.0, 0.25])
    res = []
    for gif in (True, False):
        out = fused_linear_dpo_loss(hidden, weight, labels, ref_c, ref_r, bias=bias, impl=impl,
                                    grad_in_forward=gif, chunk_sizes=(12, 64), temperature=1.3,
                                    **kw)
        obj = out.loss + (wl * out.losses).sum() + 0.01 * out.policy_rejected_logps.sum()
        res.append((out, torch.autograd.grad(out.loss, params, retain_graph=True),
                    torch.autograd.grad(obj, params)))
    (a, ga, ga2), (b, gb, gb2) = res
    for name in ("loss", "losses", "chosen_rewards", "rejected_rewards", "reward_margins",
                 "reward_accuracy", "policy_chosen_logps", "policy_rejected_logps"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-5, rtol=1e-5)
    for x, y in zip(ga + ga2, gb + gb2):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("gif,expected", [(True, 3), (False, 4)])
def test_dpo_grad_in_forward_saves_the_recompute(gif, expected):
    """Forward + backward GEMMs: logits, grad_hidden, grad_weight (+ the recompute without)."""
    hidden, weight, labels, _, ref_c, ref_r = dpo_inputs(bias=False)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    with _CountMatmuls() as counter:
        out = fused_linear_dpo_loss(hidden, weight, labels, ref_c, ref_r, impl="torch",
                                    grad_in_forward=gif)
        out.loss.backward()
    assert counter.n == expected


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gif", [True, False])
def test_dpo_half_precision_on_cpu(dtype, gif):
    """The reference path with bf16/fp16 inputs: float32 logits and log-probs, gradients in the
    input dtype within its rounding of the float32 gradients."""
    hidden, weight, labels, _, ref_c, ref_r = dpo_inputs(B=2, T=16, H=64, V=211, bias=False)
    hidden, weight = hidden.to(dtype).requires_grad_(True), weight.to(dtype).requires_grad_(True)
    out = fused_linear_dpo_loss(hidden, weight, labels, ref_c, ref_r, impl="torch",
                                grad_in_forward=gif, chunk_sizes=(20, 64))
    g = torch.autograd.grad(out.loss, [hidden, weight])
    ref = fused_dpo_loss(hidden.float() @ weight.float().t(), labels, ref_c, ref_r)
    g_ref = torch.autograd.grad(ref.loss, [hidden, weight])
    torch.testing.assert_close(out.policy_chosen_logps, ref.policy_chosen_logps,
                               atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    for a, b in zip(g, g_ref):
        assert a.dtype == dtype
        assert ((a.float() - b).norm() / b.norm()).item() < 1e-2


def test_dpo_all_masked_and_no_grad():
    hidden, weight, labels, _, ref_c, ref_r = dpo_inputs(bias=False)
    labels.fill_(-100)
    weight.requires_grad_(True)
    out = fused_linear_dpo_loss(hidden, weight, labels, ref_c, ref_r, grad_in_forward=True)
    ref = fused_dpo_loss(hidden @ weight.t(), labels, ref_c, ref_r)
    torch.testing.assert_close(out.loss, ref.loss)
    out.loss.backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight))
    with torch.no_grad():  # evaluation: forward only, same numbers
        ev = fused_linear_dpo_loss(hidden, weight, labels, ref_c, ref_r)
    torch.testing.assert_close(ev.loss, ref.loss)
    assert not ev.loss.requires_grad


def test_dpo_policy_logps_are_differentiable():
    """An extra term on the policy log-probs (e.g. an NLL/RPO term) backpropagates too."""
    hidden, weight, labels, _, ref_c, ref_r = dpo_inputs(bias=False)
    weight.requires_grad_(True)
    out = fused_linear_dpo_loss(hidden, weight, labels, ref_c, ref_r)
    (gw,) = torch.autograd.grad(out.loss - 0.1 * out.policy_chosen_logps.sum(), [weight])
    ref = fused_dpo_loss(hidden @ weight.t(), labels, ref_c, ref_r)
    (gw_ref,) = torch.autograd.grad(ref.loss - 0.1 * ref.policy_chosen_logps.sum(), [weight])
    torch.testing.assert_close(gw, gw_ref, atol=1e-5, rtol=1e-4)


def test_linear_dpo_module_and_frozen_weight():
    hidden, weight, labels, _, ref_c, ref_r = dpo_inputs(bias=False)
    hidden.requires_grad_(True)
    mod = LinearDPOLoss(beta=0.2, loss_type="hinge")
    assert "hinge" in repr(mod)
    out = mod(hidden, weight, labels, ref_c, ref_r)
    out.loss.backward()
    ref = fused_dpo_loss(hidden @ weight.t(), labels, ref_c, ref_r, beta=0.2, loss_type="hinge")
    (gh_ref,) = torch.autograd.grad(ref.loss, [hidden])
    torch.testing.assert_close(out.loss, ref.loss)
    torch.testing.assert_close(hidden.grad, gh_ref, atol=1e-5, rtol=1e-4)
    assert weight.grad is None


def test_dpo_bad_inputs():
    hidden, weight, labels, _, ref_c, ref_r = dpo_inputs(bias=False)
    with pytest.raises(ValueError, match="even, non-zero number of rows"):
        fused_linear_dpo_loss(hidden[:5], weight, labels[:5], ref_c, ref_r)
    with pytest.raises(ValueError, match="hidden must hold an even, non-zero number of rows"):
        fused_linear_dpo_loss(hidden[:0], weight, labels[:0], ref_c[:0], ref_r[:0])
    with pytest.raises(ValueError, match="loss_type"):
        fused_linear_dpo_loss(hidden, weight, labels, ref_c, ref_r, loss_type="dpo")
    with pytest.raises(ValueError, match="beta"):
        fused_linear_dpo_loss(hidden, weight, labels, ref_c, ref_r, beta=0.0)
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        fused_linear_dpo_loss(hidden, weight, labels, ref_c[:2], ref_r)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        fused_linear_dpo_loss(hidden, None, labels, ref_c, ref_r)
    with pytest.raises(ValueError, match="weight must be \\[V, H\\]"):
        fused_linear_dpo_loss(hidden, weight[:, :-1], labels, ref_c, ref_r)
    with pytest.raises(ValueError, match="grad_in_forward=True needs impl"):
        fused_linear_dpo_loss(hidden, weight, labels, ref_c, ref_r, impl="triton",
                              grad_in_forward=True)
    with pytest.raises(ValueError, match="loss_type"):
        LinearDPOLoss(loss_type="nope")
    with pytest.raises(ValueError, match="impl"):
        LinearDPOLoss(impl="nope")
    with pytest.raises(ValueError, match="temperature"):
        LinearDPOLoss(temperature=0.0)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        LinearDPOLoss(ignore_index=-100.0)


# ----------------------------------------------------------------------------------------------
# GPU (bf16 / fp16 / larger shapes); skipped without CUDA
# ----------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_half_precision_matches_fp32_reference(impl, dtype):
    dev = torch.device("cuda")
    hidden, weight, labels, bias = make(N=4, T=300, H=512, V=32003, dtype=dtype, device=dev,
                                        bias=True, mask_frac=0.5)
    params = [hidden, weight, bias]
    for p in params:
        p.requires_grad_(True)
    gout = torch.randn(labels.shape[0], labels.shape[1] - 1, device=dev)
    out, g = grads_of(lambda: linear_token_logprobs(hidden, weight, labels, bias=bias, impl=impl,
                                                    temperature=0.9), params, gout)
    ref, g_ref = grads_of(lambda: ref_tokens(hidden, weight, labels, bias, 0.9), params, gout)
    # the logits are float32 in both: only the gradient GEMMs see bf16/fp16 rounding
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=1e-3)
    for a, b in zip(g, g_ref):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("impl", IMPLS)
def test_cuda_fp32_several_tiles(impl):
    dev = torch.device("cuda")
    hidden, weight, labels, bias = make(N=8, T=257, H=200, V=5003, device=dev, bias=True)
    params = [hidden, weight, bias]
    for p in params:
        p.requires_grad_(True)
    gout = torch.randn(labels.shape[0], labels.shape[1] - 1, device=dev)
    out, g = grads_of(lambda: linear_token_logprobs(hidden, weight, labels, bias=bias, impl=impl,
                                                    chunk_sizes=(300, 1024)), params, gout)
    ref, g_ref = grads_of(lambda: ref_tokens(hidden, weight, labels, bias), params, gout)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["cublas", "triton"])
def test_cuda_peak_memory_does_not_grow_with_unscored_tokens(impl):
    """Same number of scored tokens, 4x the positions: the extra peak stays the same."""
    dev = torch.device("cuda")
    H, V = 1024, 32000
    weight = (torch.randn(V, H, device=dev) / 32).bfloat16().requires_grad_(True)

    def peak(T):
        hidden = torch.randn(4, T, H, device=dev).bfloat16().requires_grad_(True)
        labels = torch.full((4, T), -100, device=dev)
        labels[:, 1:513] = torch.randint(0, V, (4, 512), device=dev)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        linear_sequence_logprobs(hidden, weight, labels, impl=impl,
                                 chunk_bytes=64 << 20)[0].sum().backward()
        torch.cuda.synchronize()
        # grad_hidden itself is an output the size of hidden: not "extra"
        return torch.cuda.max_memory_allocated() - base - hidden.numel() * 2

    p1, p4 = peak(1024), peak(4096)
    assert p4 <= p1 * 1.1 + (8 << 20)


@pytest.mark.cuda
@pytest.mark.parametrize("impl,gif", [("cublas", True), ("cublas", False), ("triton", False)])
def test_cuda_bf16_dpo_matches_reference(impl, gif):
    dev = torch.device("cuda")
    B, T, H, V = 4, 256, 512, 32003
    hidden, weight, labels, bias = make(N=2 * B, T=T, H=H, V=V, dtype=torch.bfloat16,
                                        device=dev, bias=True, mask_frac=0.5)
    ref_c = -torch.rand(B, device=dev) * 100 - 900
    ref_r = -torch.rand(B, device=dev) * 100 - 900
    params = [hidden, weight, bias]
    for p in params:
        p.requires_grad_(True)
    out = fused_linear_dpo_loss(hidden, weight, labels, ref_c, ref_r, bias=bias, impl=impl,
                                grad_in_forward=gif, loss_type="sigmoid", beta=0.1)
    g = torch.autograd.grad(out.loss, params)
    ref = fused_dpo_loss(hidden.float() @ weight.float().t() + bias.float(), labels, ref_c, ref_r,
                         loss_type="sigmoid", beta=0.1)
    g_ref = torch.autograd.grad(ref.loss, params)
    torch.testing.assert_close(out.policy_chosen_logps, ref.policy_chosen_logps.float(),
                               atol=0.05, rtol=1e-4)
    torch.testing.assert_close(out.loss, ref.loss.float(), atol=1e-3, rtol=1e-3)
    for a, b in zip(g, g_ref):
        assert a.dtype == torch.bfloat16
        err = (a.float() - b.float()).norm() / b.float().norm()
        assert err < 1e-2
