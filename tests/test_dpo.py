"""DPO losses: every loss type against an independent scalar formula (TRL 1.16 DPOTrainer),
the Triton pair kernel (interpreter on CPU) against the reference, dpo_loss_and_grad, the
fused logits -> loss path, gradcheck of the reference, and bad input."""

import math
import os

import pytest
import torch

from bpo_fast.ops.dpo import (LOSS_TYPES, DPOLoss, DPOOutput, dpo_loss, dpo_loss_and_grad,
                              dpo_loss_reference, fused_dpo_loss, validate_dpo_params)
from bpo_fast.ops.logprobs import sequence_logprobs_reference

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# compiled kernels use the GPU's approximate exp2/log2 (~1e-7 relative, amplified by |argument|);
# the interpreter computes them exactly in numpy
RTOL_K = 1e-4 if torch.cuda.is_available() else 1e-5
needs_kernels = pytest.mark.skipif(not (INTERP or torch.cuda.is_available()),
                                   reason="needs TRITON_INTERPRET=1 or CUDA")


# ----------------------------------------------------------------------------------------------
# independent formulas: python floats, written from TRL 1.16 DPOTrainer._compute_loss
# ----------------------------------------------------------------------------------------------


def _ls(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _s(x):
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def trl_loss(lt, pc, pr, rc, rr, nc, nr, beta, eps, tau):
    c, r = pc - rc, pr - rr
    d = c - r
    if lt == "sigmoid":
        return -_ls(beta * d)
    if lt == "cdpo":  # not a TRL 1.16 type: conservative DPO (Mitchell 2023), TRL < 1.0 "sigmoid"
        return -_ls(beta * d) * (1 - eps) - _ls(-beta * d) * eps
    if lt == "robust":
        return (-(1 - eps) * _ls(beta * d) + eps * _ls(-beta * d)) / (1 - 2 * eps)
    if lt == "hinge":
        return max(0.0, 1 - beta * d)
    if lt == "ipo":
        return (c / max(nc, 1) - r / max(nr, 1) - 1 / (2 * beta)) ** 2
    if lt == "exo_pair":
        z = beta * d
        return (_s(z) * (_ls(z) - math.log1p(-eps)) + _s(-z) * (_ls(-z) - math.log(eps)))
    if lt == "nca_pair":
        return -_ls(beta * c) - 0.5 * _ls(-beta * c) - 0.5 * _ls(-beta * r)
    if lt == "bco_pair":
        return -_ls(beta * c) - _ls(-beta * r)
    if lt == "sppo_hard":
        return (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2
    if lt == "apo_zero":
        return (1 - _s(beta * c)) + _s(beta * r)
    if lt == "apo_down":
        return _s(beta * c) + (1 - _s(beta * (c - r)))
    if lt == "discopop":
        z = d * beta
        m = _s(z / tau)
        return -_ls(z) * (1 - m) + math.exp(-z) * m
    if lt == "sigmoid_norm":
        return -_ls(beta * (c / max(nc, 1) - r / max(nr, 1)))
    raise AssertionError(lt)


def make_pairs(B=5, seed=0, scale=20.0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    pc = -torch.rand(B, generator=g) * scale * 5
    pr = -torch.rand(B, generator=g) * scale * 5
    rc = pc + torch.randn(B, generator=g) * scale
    rr = pr + torch.randn(B, generator=g) * scale
    nc = torch.randint(0, 40, (B,), generator=g)
    nr = torch.randint(1, 40, (B,), generator=g)
    nc[0] = 0  # an empty chosen answer: counts clamp to 1
    return [t.to(device, dtype) for t in (pc, pr, rc, rr)] + [nc.to(device), nr.to(device)]


def kwargs_for(lt, beta=0.3):
    eps = {"robust": 0.2, "exo_pair": 1e-3, "cdpo": 0.1}.get(lt, 0.0)
    return dict(beta=beta, loss_type=lt, label_smoothing=eps, discopop_tau=0.05)


def expected(lt, pc, pr, rc, rr, nc, nr, kw):
    return torch.tensor([trl_loss(lt, *(float(t[i]) for t in (pc, pr, rc, rr)), int(nc[i]),
                                  int(nr[i]), kw["beta"], kw["label_smoothing"],
                                  kw["discopop_tau"]) for i in range(pc.shape[0])],
                        dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
# reference and kernel against the independent formulas
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lt", LOSS_TYPES)
@pytest.mark.parametrize("impl", ["reference", "kernel"])
def test_loss_types_match_trl_formulas(lt, impl):
    if impl == "kernel" and not (INTERP or torch.cuda.is_available()):
        pytest.skip("needs TRITON_INTERPRET=1 or CUDA")
    # small log-ratios so that every loss is in its interesting range (and discopop's
    # exp(-z) * m is finite in the literal formula)
    pc, pr, rc, rr, nc, nr = make_pairs(scale=2.0, device=DEV if impl == "kernel" else "cpu")
    kw = kwargs_for(lt)
    fn = dpo_loss if impl == "kernel" else dpo_loss_reference
    out = fn(pc, pr, rc, rr, chosen_lengths=nc, rejected_lengths=nr, **kw)
    want = expected(lt, pc.cpu(), pr.cpu(), rc.cpu(), rr.cpu(), nc.cpu(), nr.cpu(), kw)
    assert isinstance(out, DPOOutput)
    assert out.losses.dtype == torch.float32 and out.losses.shape == (5,)
    rtol = 2 * RTOL_K if impl == "kernel" else 2e-5
    torch.testing.assert_close(out.losses.cpu().double(), want, rtol=rtol, atol=2e-6)
    torch.testing.assert_close(out.loss.cpu().double(), want.mean(), rtol=rtol, atol=2e-6)
    cr = kw["beta"] * (pc - rc)
    rj = kw["beta"] * (pr - rr)
    torch.testing.assert_close(out.chosen_rewards, cr)
    torch.testing.assert_close(out.rejected_rewards, rj)
    torch.testing.assert_close(out.reward_margins, cr - rj)
    assert out.reward_accuracy.item() == pytest.approx((cr > rj).float().mean().item())
    assert out.policy_chosen_logps is None and out.policy_rejected_logps is None


@needs_kernels
@pytest.mark.parametrize("lt", LOSS_TYPES)
def test_kernel_gradients_match_autograd(lt):
    pc, pr, rc, rr, nc, nr = make_pairs(seed=3, device=DEV)
    kw = kwargs_for(lt)
    w = torch.randn(5, generator=torch.Generator().manual_seed(4)).to(DEV)
    grads = []
    for fn in (dpo_loss, dpo_loss_reference):
        a, b = pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)
        out = fn(a, b, rc, rr, chosen_lengths=nc, rejected_lengths=nr, **kw)
        assert not out.chosen_rewards.requires_grad
        (out.loss * 3 + (out.losses * w).sum()).backward()
        grads.append((a.grad, b.grad, out.losses.detach()))
    for k, r in zip(grads[0], grads[1]):
        torch.testing.assert_close(k, r, rtol=RTOL_K, atol=1e-7)


@pytest.mark.parametrize("lt", LOSS_TYPES)
def test_reference_gradcheck_float64(lt):
    pc, pr, rc, rr, nc, nr = make_pairs(B=3, seed=1, scale=2.0, dtype=torch.float64)
    kw = kwargs_for(lt)
    if lt == "hinge":  # keep away from the kink
        kw["beta"] = 0.01
    a, b = pc.requires_grad_(True), pr.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, y: dpo_loss(x, y, rc, rr, chosen_lengths=nc, rejected_lengths=nr, **kw).losses,
        (a, b), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("impl", ["reference", "kernel"])
@pytest.mark.parametrize("lt", LOSS_TYPES)
def test_dpo_loss_and_grad(lt, impl, monkeypatch):
    if impl == "kernel" and not (INTERP or torch.cuda.is_available()):
        pytest.skip("needs TRITON_INTERPRET=1 or CUDA")
    dev = DEV if impl == "kernel" else torch.device("cpu")
    if impl == "reference":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    pc, pr, rc, rr, nc, nr = make_pairs(seed=5, device=dev)
    kw = kwargs_for(lt)
    out, dl = dpo_loss_and_grad(torch.cat([pc, pr]), rc, rr, lengths=torch.cat([nc, nr]), **kw)
    a, b = pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)
    ref = dpo_loss_reference(a, b, rc, rr, chosen_lengths=nc, rejected_lengths=nr, **kw)
    ref.losses.sum().backward()
    torch.testing.assert_close(dl, torch.cat([a.grad, b.grad]), rtol=RTOL_K, atol=1e-7)
    torch.testing.assert_close(out.losses, ref.losses.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, ref.loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.policy_chosen_logps, pc)
    torch.testing.assert_close(out.policy_rejected_logps, pr)
    assert not out.loss.requires_grad


@needs_kernels
@pytest.mark.parametrize("lt", ["sigmoid", "hinge", "discopop", "exo_pair", "apo_down",
                                "sigmoid_norm"])
def test_extreme_log_ratios_stay_finite(lt):
    # |beta * d| up to ~1e3: losses and gradients finite in the kernel and the reference
    pc = torch.tensor([-10.0, -5000.0, -1.0, -3000.0], device=DEV)
    pr = torch.tensor([-5000.0, -10.0, -1.0, -3000.0], device=DEV)
    rc = torch.tensor([-10.0, -10.0, -1.0, -1.0], device=DEV)
    rr = torch.tensor([-10.0, -10.0, -1.0, -1.0], device=DEV)
    n = torch.tensor([7, 7, 7, 7], device=DEV)
    kw = kwargs_for(lt, beta=0.5)
    for fn in (dpo_loss, dpo_loss_reference):
        a, b = pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)
        out = fn(a, b, rc, rr, chosen_lengths=n, rejected_lengths=n, **kw)
        out.loss.backward()
        assert torch.isfinite(out.losses).all(), (fn.__name__, out.losses)
        assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


# ----------------------------------------------------------------------------------------------
# fused logits -> loss
# ----------------------------------------------------------------------------------------------


def make_batch(B=2, T=6, V=130, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2 * B, T, V, generator=g) * 2
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[:, :2] = -100
    if T > 4:
        labels[1, 4] = -100
    rc = -torch.rand(B, generator=g) * 30
    rr = -torch.rand(B, generator=g) * 30
    return logits.to(device), labels.to(device), rc.to(device), rr.to(device)


def fused_reference(logits, labels, rc, rr, temperature=1.0, **kw):
    """The definition by composition, in float64."""
    logps, n = sequence_logprobs_reference(logits.double(), labels, temperature=temperature)
    B = rc.shape[0]
    out = dpo_loss_reference(logps[:B], logps[B:], rc.double(), rr.double(),
                             chosen_lengths=n[:B], rejected_lengths=n[B:], **kw)
    out.policy_chosen_logps, out.policy_rejected_logps = logps[:B], logps[B:]
    return out


@needs_kernels
@pytest.mark.parametrize("lt,temperature,masked", [
    ("sigmoid", 1.0, False), ("ipo", 0.8, True), ("sigmoid_norm", 1.0, True),
    ("discopop", 1.3, False), ("nca_pair", 1.0, True), ("hinge", 1.0, False),
])
def test_fused_dpo_matches_composition(lt, temperature, masked, monkeypatch):
    monkeypatch.setenv("BPO_FAST_LOGPROBS_BLOCK_V", "64")   # several V chunks, V % 64 != 0
    logits, labels, rc, rr = make_batch(device=DEV)
    if masked:
        labels[2] = -100                                    # an all-masked rejected answer
    kw = kwargs_for(lt, beta=0.05)
    gw = torch.randn(2, generator=torch.Generator().manual_seed(9)).to(DEV)
    res = []
    for fn in (fused_dpo_loss, fused_reference):
        x = logits.clone().double().requires_grad_(True) if fn is fused_reference \
            else logits.clone().requires_grad_(True)
        out = fn(x, labels, rc, rr, temperature=temperature, **kw)
        # gradients through all three differentiable outputs
        (out.loss + (out.losses * gw).sum() + 0.1 * out.policy_chosen_logps.sum()
         - 0.2 * out.policy_rejected_logps[1]).backward()
        res.append((out, x.grad))
    (out, grad), (ref, ref_grad) = res
    for f in ("loss", "losses", "chosen_rewards", "rejected_rewards", "reward_margins",
              "reward_accuracy", "policy_chosen_logps", "policy_rejected_logps"):
        a, b = getattr(out, f), getattr(ref, f)
        assert a.dtype == torch.float32, f
        torch.testing.assert_close(a.double(), b.detach(), rtol=1e-5, atol=2e-5, msg=f)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)
    if masked:
        assert out.policy_rejected_logps[0].item() == 0.0
        assert torch.all(grad[2] == 0)


@needs_kernels
def test_fused_dpo_inplace_backward_and_module():
    logits, labels, rc, rr = make_batch(B=1, T=5, V=90, device=DEV)
    loss_fn = DPOLoss(beta=0.2, loss_type="robust", label_smoothing=0.1)
    x = logits.clone().requires_grad_(True)
    loss_fn(x, labels, rc, rr).loss.backward()
    x2 = logits.clone().requires_grad_(True)
    y = x2 * 1.0
    out = DPOLoss(beta=0.2, loss_type="robust", label_smoothing=0.1,
                  inplace_backward=True)(y, labels, rc, rr)
    out.loss.backward()
    torch.testing.assert_close(x2.grad, x.grad)
    torch.testing.assert_close(y.detach(), x.grad)
    # the [B]-tensor form of the module
    pc, pr = out.policy_chosen_logps.detach(), out.policy_rejected_logps.detach()
    out2 = loss_fn(pc, pr, rc, rr)
    torch.testing.assert_close(out2.loss, out.loss.detach())
    assert "robust" in repr(loss_fn)


@needs_kernels
@pytest.mark.parametrize("T", [1, 2])
def test_fused_dpo_short_sequences_and_int32_labels(T):
    logits, labels, rc, rr = make_batch(T=T, V=40, device=DEV)
    labels = labels.int()
    labels[:, -1] = 3                      # T = 2: one scored token per row
    for lt in ("sigmoid", "ipo"):
        x = logits.clone().requires_grad_(True)
        out = fused_dpo_loss(x, labels, rc, rr, loss_type=lt)
        out.loss.backward()
        z = logits.clone().double().requires_grad_(True)
        ref = fused_reference(z, labels.long(), rc, rr, loss_type=lt)
        ref.loss.backward()
        torch.testing.assert_close(out.loss.double(), ref.loss.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x.grad.double(), z.grad, rtol=1e-4, atol=1e-7)
        if T == 1:
            assert torch.all(out.policy_chosen_logps == 0) and torch.all(x.grad == 0)


def test_fused_dpo_reference_path_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    logits, labels, rc, rr = make_batch()
    out = fused_dpo_loss(logits, labels, rc, rr, loss_type="ipo")
    ref = fused_reference(logits, labels, rc, rr, loss_type="ipo")
    torch.testing.assert_close(out.loss.double(), ref.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.policy_chosen_logps.double(), ref.policy_chosen_logps,
                               rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------


def test_bad_hyper_parameters():
    pc, pr, rc, rr, nc, nr = make_pairs()
    with pytest.raises(ValueError, match="loss_type must be one of .*sigmoid_norm"):
        dpo_loss(pc, pr, rc, rr, loss_type="kto")
    for beta in (0.0, -1.0, 1e300, 1e-300):
        with pytest.raises(ValueError, match=r"beta must be in \[1e-06, 1e\+06\]"):
            dpo_loss(pc, pr, rc, rr, beta=beta)
    for eps in (-0.1, 0.5, 0.7):
        with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\)"):
            dpo_loss(pc, pr, rc, rr, loss_type="robust", label_smoothing=eps)
    with pytest.raises(ValueError, match="exo_pair"):
        dpo_loss(pc, pr, rc, rr, loss_type="exo_pair")
    with pytest.raises(ValueError, match="label_smoothing must be >= 1e-06"):
        dpo_loss(pc, pr, rc, rr, loss_type="exo_pair", label_smoothing=1e-300)
    # sigmoid does not read label smoothing (TRL 1.16 ignores it): refused, pointing to cdpo
    with pytest.raises(ValueError, match="label_smoothing is not read by loss_type='sigmoid'.*cdpo"):
        dpo_loss(pc, pr, rc, rr, label_smoothing=0.1)
    with pytest.raises(ValueError, match="discopop_tau is not read by loss_type='hinge'"):
        validate_dpo_params(1, "hinge", 0, 1)
    for tau in (0.0, 1e-30, 1e30):
        with pytest.raises(ValueError, match="discopop_tau must be in"):
            dpo_loss(pc, pr, rc, rr, loss_type="discopop", discopop_tau=tau)
    with pytest.raises(TypeError, match="beta must be a number"):
        dpo_loss(pc, pr, rc, rr, beta="0.1")
    with pytest.raises(ValueError, match="beta must be finite"):
        validate_dpo_params(beta=float("nan"))
    with pytest.raises(ValueError, match="loss_type"):
        DPOLoss(loss_type="simpo")
    with pytest.raises(ValueError, match="label_smoothing"):
        DPOLoss(loss_type="exo_pair")
    with pytest.raises(ValueError, match="temperature must be"):
        DPOLoss(temperature=0.0)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        DPOLoss(ignore_index=-100.0)
    with pytest.raises(TypeError, match="inplace_backward"):
        DPOLoss(inplace_backward=1)
    assert validate_dpo_params(1, "discopop", 0, 1) == (1.0, "discopop", 0.0, 1.0)
    assert validate_dpo_params(1, "cdpo", 0.2) == (1.0, "cdpo", 0.2, 0.05)
    # ipo / sigmoid_norm token counts: integer tensors of counts >= 0 (0 is clamped to 1)
    with pytest.raises(ValueError, match="chosen_lengths must be an integer tensor"):
        dpo_loss(pc, pr, rc, rr, loss_type="ipo", chosen_lengths=nc.float(), rejected_lengths=nr)
    with pytest.raises(ValueError, match="rejected_lengths must hold token counts >= 0"):
        dpo_loss(pc, pr, rc, rr, loss_type="ipo", chosen_lengths=nc, rejected_lengths=-nr)


def test_check_finite_names_the_input():
    pc, pr, rc, rr, nc, nr = make_pairs()
    bad = rr.clone()
    bad[2] = float("nan")
    dpo_loss(pc, pr, rc, bad)  # off by default: no sync, no check
    with pytest.raises(ValueError, match="ref_rejected_logps holds NaN or inf"):
        dpo_loss(pc, pr, rc, bad, check_finite=True)
    logits = torch.randn(4, 3, 7)
    logits[1, 1, 2] = float("inf")
    labels = torch.randint(0, 7, (4, 3))
    with pytest.raises(ValueError, match="logits holds NaN or inf"):
        fused_dpo_loss(logits, labels, rc[:2], rr[:2], check_finite=True)
    with pytest.raises(ValueError, match="policy_chosen_logps holds NaN or inf"):
        DPOLoss(check_finite=True)(pc.clone().fill_(float("-inf")), pr, rc, rr)


def test_bad_tensors():
    pc, pr, rc, rr, nc, nr = make_pairs()
    with pytest.raises(ValueError, match="ref_chosen_logps must be"):
        dpo_loss(pc, pr, rc[:3], rr)
    with pytest.raises(ValueError, match="ref_rejected_logps must be 1-D"):
        dpo_loss(pc, pr, rc, rr[None])
    with pytest.raises(ValueError, match="policy_rejected_logps"):
        dpo_loss(pc, pr[:-1], rc, rr)
    with pytest.raises(ValueError, match="floating"):
        dpo_loss(pc.long(), pr, rc, rr)
    with pytest.raises(ValueError, match="chosen_lengths is required"):
        dpo_loss(pc, pr, rc, rr, loss_type="ipo")
    with pytest.raises(ValueError, match="rejected_lengths"):
        dpo_loss(pc, pr, rc, rr, loss_type="sigmoid_norm", chosen_lengths=nc,
                 rejected_lengths=nr[:2])
    with pytest.raises(ValueError, match="at least one pair"):
        dpo_loss(pc[:0], pr[:0], rc[:0], rr[:0])
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        dpo_loss(pc.tolist(), pr, rc, rr)
    with pytest.raises(ValueError, match="policy_logps must be"):
        dpo_loss_and_grad(pc, rc[:2], rr[:2])   # odd 2B = 5


def test_fused_bad_inputs():
    logits, labels, rc, rr = make_batch()
    with pytest.raises(ValueError, match="even"):
        fused_dpo_loss(logits[:3], labels[:3], rc, rr)
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        fused_dpo_loss(logits, labels, rc[:1], rr)
    with pytest.raises(ValueError, match="labels must be"):
        fused_dpo_loss(logits, labels[:, :-1], rc, rr)
    with pytest.raises(ValueError, match="logits must be a floating"):
        fused_dpo_loss(logits.int(), labels, rc, rr)
    with pytest.raises(ValueError, match="beta"):
        fused_dpo_loss(logits, labels, rc, rr, beta=0)
    bad = labels.clone()
    bad[0, 5] = 130
    with pytest.raises(ValueError, match=r"\[0, V=130\)"):
        fused_dpo_loss(logits, bad, rc, rr)


# ----------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("lt", ["sigmoid", "ipo", "apo_zero"])
def test_cuda_fused_dpo_half_vs_fp32(dtype, tol, lt):
    B, T, V = 4, 257, 32000
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(2 * B, T, V, device="cuda", generator=g) * 3
    labels = torch.randint(0, V, (2 * B, T), device="cuda", generator=g)
    labels[:, :40] = -100
    rc = -torch.rand(B, device="cuda", generator=g) * 2000 - 1500
    rr = -torch.rand(B, device="cuda", generator=g) * 2000 - 1500
    kw = kwargs_for(lt, beta=0.01)
    x = logits.to(dtype).requires_grad_(True)
    out = fused_dpo_loss(x, labels, rc, rr, **kw)
    out.loss.backward()
    # the reference on the same rounded logits in float32
    z = logits.to(dtype).float().requires_grad_(True)
    logps, n = sequence_logprobs_reference(z, labels)
    ref = dpo_loss_reference(logps[:B], logps[B:], rc, rr, chosen_lengths=n[:B],
                             rejected_lengths=n[B:], **kw)
    ref.loss.backward()
    torch.testing.assert_close(out.policy_chosen_logps, logps[:B].detach(), rtol=1e-5,
                               atol=1e-2)
    torch.testing.assert_close(out.loss, ref.loss.detach(), rtol=1e-4, atol=1e-5)
    err = (x.grad.float() - z.grad).abs().max() / z.grad.abs().max()
    assert err < tol


@pytest.mark.cuda
@pytest.mark.parametrize("inplace", [False, True])
def test_cuda_fused_dpo_peak_memory(inplace):
    """Issue target: forward + backward hold at most one logits-sized buffer in the input dtype
    beyond the inputs (the gradient), and none with the in-place backward."""
    B, T, V = 4, 512, 32000
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(2 * B, T, V, device="cuda", generator=g, dtype=torch.bfloat16)
    labels = torch.randint(0, V, (2 * B, T), device="cuda", generator=g)
    rc = torch.full((B,), -5000.0, device="cuda")
    rr = torch.full((B,), -5000.0, device="cuda")
    x = logits.requires_grad_(True)
    fused_dpo_loss(x.detach().clone(), labels, rc, rr)      # compile outside the measurement
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fused_dpo_loss(x, labels, rc, rr, inplace_backward=inplace)
    (grad,) = torch.autograd.grad(out.loss, x)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    small = 4 << 20          # float32 per-token buffers (8 bytes/token) and the pair outputs
    assert extra <= (0 if inplace else logits.numel() * logits.element_size()) + small, extra
    assert grad.dtype == torch.bfloat16 and torch.isfinite(grad.float()).all()
    if inplace:
        assert grad.data_ptr() == x.data_ptr()
