"""Every kernel specialisation the GPU-readiness gate compiles (bpo_fast.tools.gpu_check), run
under the Triton interpreter in float32 at small shapes against the PyTorch reference: the
compiler accepts code that is numerically wrong, the interpreter code the compiler refuses, so
both checks are needed. The gate's own recording of launches is tested here too."""

import os

import pytest
import torch

from bpo_fast.ops.dpo import _reference_loss_and_grad
from bpo_fast.ops.losses import LOSS_TYPES, REGISTRY

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("needs the Triton interpreter or a GPU", allow_module_level=True)

from bpo_fast.kernels import dpo as KD  # noqa: E402
from bpo_fast.kernels import linear as KL  # noqa: E402
from bpo_fast.kernels import logprobs as KP  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------------------------
# DPO pair kernels: each loss type x TOKENS x HAS_LEN
# ----------------------------------------------------------------------------------------------


def _pairs(B, seed):
    g = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = (-20 * torch.rand(B, generator=g) for _ in range(4))
    return pc, pr, rc, rr


@pytest.mark.parametrize("has_len", [False, True])
@pytest.mark.parametrize("lt", LOSS_TYPES)
def test_pairs_kernel_per_sequence(lt, has_len):
    B = 5
    pc, pr, rc, rr = _pairs(B, 1)
    lc = torch.tensor([3, 1, 0, 7, 12]) if has_len else None
    lr = torch.tensor([2, 5, 4, 0, 9]) if has_len else None
    if lt in ("ipo", "sigmoid_norm") and not has_len:
        lc = lr = torch.ones(B, dtype=torch.int64)
    e = 0.1 if "label_smoothing" in REGISTRY[lt].params else 0.0
    tau = 0.5 if "discopop_tau" in REGISTRY[lt].params else 0.05  # a parameter must be read
    # bf16 policy inputs: the launcher casts them (one compiled variant for every dtype)
    res = KD.dpo_pairs(pc.bfloat16().to(DEV), pr.bfloat16().to(DEV), rc.to(DEV), rr.to(DEV),
                       None if lc is None else lc.to(DEV), None if lr is None else lr.to(DEV),
                       beta=0.3, loss_type=REGISTRY[lt].kernel_id, label_smoothing=e, tau=tau)
    ref, dc, dr = _reference_loss_and_grad(pc.bfloat16().float(), pr.bfloat16().float(), rc, rr,
                                           lc, lr, 0.3, lt, e, tau)
    tol = dict(atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(res["losses"].cpu(), ref.losses, **tol)
    torch.testing.assert_close(res["loss"].cpu(), ref.loss, **tol)
    torch.testing.assert_close(res["reward_accuracy"].cpu(), ref.reward_accuracy)
    torch.testing.assert_close(res["reward_margins"].cpu(), ref.reward_margins, **tol)
    torch.testing.assert_close(res["dlosses"].cpu(), torch.cat([dc, dr]), **tol)


@pytest.mark.parametrize("lt", LOSS_TYPES)
def test_pairs_kernel_token_mode(lt):
    """TOKENS=True: the kernel sums token log-probs and counts labels itself (one program per
    pair, more than one BLOCK_T step per row, an all-masked sequence)."""
    B, T = 3, KD.TOKENS_BLOCK_T + 40
    g = torch.Generator().manual_seed(2)
    tok = -torch.rand(2 * B, T - 1, generator=g)
    labels = torch.randint(0, 50, (2 * B, T), generator=g)
    labels[:, : T // 3] = -100
    labels[4] = -100  # all masked: 0 log-prob, 0 tokens
    tok = torch.where(labels[:, 1:] == -100, torch.zeros(()), tok)
    rc, rr = -20 * torch.rand(B, generator=g), -20 * torch.rand(B, generator=g)
    e = 0.1 if "label_smoothing" in REGISTRY[lt].params else 0.0
    tau = 0.5 if "discopop_tau" in REGISTRY[lt].params else 0.05  # a parameter must be read
    res = KD.dpo_pairs(None, None, rc.to(DEV), rr.to(DEV), beta=0.2,
                       loss_type=REGISTRY[lt].kernel_id, label_smoothing=e, tau=tau,
                       token_logps=tok.to(DEV), labels=labels.to(DEV))
    logps = tok.sum(1)
    n = (labels[:, 1:] != -100).sum(1)
    torch.testing.assert_close(res["logps"].cpu(), logps, atol=1e-4, rtol=1e-5)
    assert torch.equal(res["n_tokens"].cpu(), n)
    ref, dc, dr = _reference_loss_and_grad(logps[:B], logps[B:], rc, rr, n[:B], n[B:], 0.2, lt,
                                           e, tau)
    torch.testing.assert_close(res["losses"].cpu(), ref.losses, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(res["dlosses"].cpu(), torch.cat([dc, dr]), atol=1e-4, rtol=1e-4)


def test_mean_kernel_fixed_order_over_many_pairs():
    """B above MEAN_BLOCK and PAIRS_BLOCK_B: several pair programs, several mean steps."""
    B = KD.MEAN_BLOCK + 77
    pc, pr, rc, rr = _pairs(B, 3)
    kw = dict(beta=0.1, loss_type=0, label_smoothing=0.0, tau=0.05)
    a = KD.dpo_pairs(pc.to(DEV), pr.to(DEV), rc.to(DEV), rr.to(DEV), **kw)
    b = KD.dpo_pairs(pc.to(DEV), pr.to(DEV), rc.to(DEV), rr.to(DEV), **kw)
    ref, _, _ = _reference_loss_and_grad(pc, pr, rc, rr, None, None, 0.1, "sigmoid", 0.0, 0.05)
    torch.testing.assert_close(a["loss"].cpu(), ref.loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a["reward_accuracy"].cpu(), ref.reward_accuracy)
    assert torch.equal(a["loss"], b["loss"])  # deterministic


# ----------------------------------------------------------------------------------------------
# fused LM head: bias / no bias, every gradient subset, atomic and deterministic backward
# ----------------------------------------------------------------------------------------------


def _head(S=21, H=40, V=75, offset=0, seed=4):
    g = torch.Generator().manual_seed(seed)
    store = torch.randn(S * H + offset, generator=g) * 0.5
    hidden = store[offset:].view(S, H)
    weight = torch.randn(V, H, generator=g) * 0.5
    bias = torch.randn(V, generator=g)
    targets = torch.randint(0, V, (S,), generator=g)
    gs = torch.randn(S, generator=g)
    return hidden, weight, bias, targets, gs


def _cap(z, softcap):
    """The reference soft-cap (HF Gemma 2): softcap * tanh(z / softcap)."""
    return z if softcap is None else softcap * torch.tanh(z / softcap)


# a cap of 1.5 on logits of std ~1.6 (up to ~6): most of them well into tanh's saturation
@pytest.mark.parametrize("softcap", [None, 1.5])
@pytest.mark.parametrize("offset", [0, 1])  # aligned rows / the launcher's aligned copy
@pytest.mark.parametrize("bias", [False, True])
def test_fused_forward(bias, offset, softcap):
    hidden, weight, b, targets, _ = _head(offset=offset)
    assert KL._row_align(hidden) == (4 if offset == 0 else 1)
    roff0 = torch.tensor([3, 0, 7]) * hidden.stride(0)
    rows, roff, align = KL._aligned_rows(hidden, roff0)
    assert align == 4 and KL._row_align(rows) == 4
    if offset == 0:
        assert rows is hidden and roff is roff0
    else:
        assert torch.equal(roff, torch.arange(3) * 40) and torch.equal(rows, hidden[[3, 0, 7]])
    row_off = torch.arange(hidden.shape[0]) * hidden.stride(0)  # from hidden's data pointer
    stats, tl = KL.fused_forward(hidden.to(DEV), row_off.to(DEV), weight.to(DEV),
                                 b.to(DEV) if bias else None, targets.to(DEV), 0.5,
                                 softcap=softcap)
    z = _cap(hidden @ weight.T + (b if bias else 0), softcap) * 0.5
    assert stats.shape == (hidden.shape[0], 2)
    torch.testing.assert_close(stats[:, 0].cpu(), z.max(1).values, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats.sum(1).cpu(), torch.logsumexp(z, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tl.cpu(), z.gather(1, targets[:, None])[:, 0], atol=1e-5,
                               rtol=1e-5)


@pytest.mark.parametrize("softcap", [None, 1.5])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("need", ["h", "w", "b", "hw", "hb", "wb", "hwb"])
def test_fused_backward(need, deterministic, softcap):
    if softcap is not None and need not in ("hwb", "w"):
        pytest.skip("the cap is checked on one full and one partial gradient set")
    bias = "b" in need
    hidden, weight, b, targets, gs = _head(H=37, offset=int(deterministic))  # odd H: padded copy
    S, H = hidden.shape
    V = weight.shape[0]
    row_off = torch.arange(S) * H
    z0 = hidden @ weight.T + (b if bias else 0)
    z = _cap(z0, softcap) * 0.5
    lse = torch.logsumexp(z, 1)
    # reference: d/dz of sum(gs * temperature * logp) = gs * (onehot - softmax) (* cap')
    d = (torch.nn.functional.one_hot(targets, V).float() - torch.softmax(z, 1)) * gs[:, None]
    if softcap is not None:
        d = d * (1 - torch.tanh(z0 / softcap) ** 2)
    f32 = dict(device=DEV, dtype=torch.float32)
    gh = torch.zeros(S, H, **f32) if "h" in need else None
    gw = torch.zeros(V, H, **f32) if "w" in need else None
    gb = torch.zeros(V, **f32) if "b" in need else None
    args = (hidden.to(DEV), row_off.to(DEV), weight.to(DEV), b.to(DEV) if bias else None,
            targets.to(DEV), lse.to(DEV), gs.to(DEV), 0.5)
    KL.fused_backward(*args, gh=gh, gw=gw, gb=gb, deterministic=deterministic, softcap=softcap)
    tol = dict(atol=1e-5, rtol=1e-4)
    if gh is not None:
        torch.testing.assert_close(gh.cpu(), d @ weight, **tol)
    if gw is not None:
        torch.testing.assert_close(gw.cpu(), d.T @ hidden, **tol)
    if gb is not None:
        torch.testing.assert_close(gb.cpu(), d.sum(0), **tol)
    if deterministic:  # the same bits again
        again = [None if t is None else torch.zeros_like(t) for t in (gh, gw, gb)]
        KL.fused_backward(*args, gh=again[0], gw=again[1], gb=again[2], deterministic=True,
                          softcap=softcap)
        for x, y in zip((gh, gw, gb), again):
            assert x is None or torch.equal(x, y)


@pytest.mark.parametrize("deterministic", [False, True])
def test_fused_kernels_read_a_strided_weight(monkeypatch, deterministic):
    """The kernels themselves take any weight strides (64-bit offsets): a transposed view
    handed to them as it is (the launchers' contiguous copy switched off)."""
    hidden, weight, b, targets, gs = _head(H=24, V=50)
    wt = weight.t().contiguous().t()  # [V, H] view of [H, V] storage: k-stride V
    assert wt.stride() == (1, 50)
    monkeypatch.setattr(KL, "k_contiguous", lambda w: w)
    seen = []
    monkeypatch.setattr(KL, "_fused_fwd_kernel", _Spy(KL._fused_fwd_kernel, seen, args=True))
    S, H = hidden.shape
    row_off = torch.arange(S) * H
    stats, tlog = KL.fused_forward(hidden, row_off, wt, b, targets, 0.5)
    assert seen[0][1][4:6] == (1, 50)  # stride_wv, stride_wk as launched
    z = (hidden @ weight.T + b) * 0.5
    torch.testing.assert_close(stats.sum(1), torch.logsumexp(z, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tlog, z.gather(1, targets[:, None])[:, 0], atol=1e-5, rtol=1e-5)
    lse = torch.logsumexp(z, 1)
    d = (torch.nn.functional.one_hot(targets, 50).float() - torch.softmax(z, 1)) * gs[:, None]
    gh, gw, gb = torch.zeros(S, H), torch.zeros(50, H), torch.zeros(50)
    KL.fused_backward(hidden, row_off, wt, b, targets, lse, gs, 0.5, gh=gh, gw=gw, gb=gb,
                      deterministic=deterministic)
    tol = dict(atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gh, d @ weight, **tol)
    torch.testing.assert_close(gw, d.T @ hidden, **tol)
    torch.testing.assert_close(gb, d.sum(0), **tol)


def test_launchers_give_the_kernels_a_k_contiguous_weight(monkeypatch):
    """A transposed weight reaches the fused kernels with unit k-stride (one variant per dtype,
    16-byte loads, no (H-1) * V offset)."""
    hidden, weight, b, targets, gs = _head(H=24, V=50)
    wt = weight.t().contiguous().t()
    seen = []
    for name in ("_fused_fwd_kernel", "_fused_bwd_kernel", "_fused_bwd_det_kernel"):
        monkeypatch.setattr(KL, name, _Spy(getattr(KL, name), seen, args=True))
    S, H = hidden.shape
    row_off = torch.arange(S) * H
    KL.fused_forward(hidden, row_off, wt, None, targets, 1.0)
    for det in (False, True):
        KL.fused_backward(hidden, row_off, wt, None, targets, torch.zeros(S), gs, 1.0,
                          gw=torch.zeros(50, H), deterministic=det)
    assert len(seen) == 3 and all(args[4:6] == (H, 1) for _, args in seen)


def test_fused_backward_follows_torch_deterministic_mode(monkeypatch):
    seen = []
    real = KL._fused_bwd_det_kernel
    monkeypatch.setattr(KL, "_fused_bwd_det_kernel", _Spy(real, seen))
    hidden, weight, b, targets, gs = _head(S=5, H=16, V=20)
    args = (hidden, torch.arange(5) * 16, weight, None, targets, torch.zeros(5), gs, 1.0)
    KL.fused_backward(*args, gh=torch.zeros(5, 16))
    assert not seen
    prev = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        KL.fused_backward(*args, gh=torch.zeros(5, 16))
    finally:
        torch.use_deterministic_algorithms(prev)
    assert seen


class _Spy:
    """Stands in for a kernel: records each launch's grid (and, with ``args``, its positional
    arguments, tensors as themselves) and runs it."""

    def __init__(self, fn, seen, args=False):
        self.fn, self.seen, self.args = fn, seen, args

    def __getitem__(self, grid):
        if not self.args:
            self.seen.append(grid)
            return self.fn[grid]

        def launch(*a, **kw):
            self.seen.append((grid, a))
            return self.fn[grid](*a, **kw)
        return launch


# ----------------------------------------------------------------------------------------------
# the cuBLAS strategy's row kernels and the logits kernels' modes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("softcap", [None, 1.5])
@pytest.mark.parametrize("bias", [False, True])
def test_lse_update(bias, softcap):
    g = torch.Generator().manual_seed(5)
    C, V, v0 = 6, 130, 40
    z = torch.randn(C, V, generator=g)
    b = torch.randn(V, generator=g)
    tgt = torch.randint(0, 200, (C,), generator=g)
    m = torch.full((C,), float("-inf"))
    s = torch.zeros(C)
    t = torch.full((C,), 7.0)
    KL.lse_update(z, b if bias else None, tgt, m, s, t, v0, 2.0, softcap=softcap)
    x = _cap(z + (b if bias else 0), softcap) * 2.0
    torch.testing.assert_close(m + torch.log(s), torch.logsumexp(x, 1))
    hit = (tgt >= v0) & (tgt < v0 + V)
    want = torch.where(hit, x.gather(1, (tgt - v0).clamp(0, V - 1)[:, None])[:, 0], 7.0)
    torch.testing.assert_close(t, want)


@pytest.mark.parametrize("flags", [(gl, gls, glp) for gl in (0, 1) for gls in (0, 1)
                                   for glp in (0, 1)])
def test_logits_backward_dpo_mode_flags(flags):
    """MODE_DPO with each combination of its optional terms (g_loss, g_losses, g_logps: runtime
    flags of one compiled variant) the ops can launch."""
    gl_on, gls_on, glp_on = flags
    B, T, V = 2, 5, 37
    N = 2 * B
    g = torch.Generator().manual_seed(6)
    x = torch.randn(N, T, V, generator=g)
    labels = torch.randint(0, V, (N, T), generator=g)
    labels[0, 2] = -100
    lp, lse = KP.forward(x, labels, -100, 1.0)
    g_loss = torch.tensor(0.7)
    g_losses = torch.randn(B, generator=g)
    g_logps = torch.randn(N, generator=g)
    dl = torch.randn(N, generator=g)
    out = KP.backward(x, labels, lse, -100, 1.0, mode=KP.MODE_DPO,
                      g=g_logps if glp_on else None, g_loss=g_loss if gl_on else None,
                      g_losses=g_losses if gls_on else None, dlosses=dl, B=B)
    coef = torch.zeros(N)
    if gl_on:
        coef += g_loss / B
    if gls_on:
        coef += g_losses.repeat(2)
    gseq = coef * dl + (g_logps if glp_on else 0)
    ref = torch.zeros_like(x)
    p = torch.softmax(x[:, :-1], -1)
    oh = torch.nn.functional.one_hot(labels[:, 1:].clamp(min=0), V).float()
    scored = (labels[:, 1:] != -100).float()[..., None]
    ref[:, :-1] = (oh - p) * scored * gseq[:, None, None]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_int32_labels_reach_the_kernels_as_int64(monkeypatch):
    """int32 labels (accepted by the ops) are widened by the launchers: the kernels have one
    label dtype, so int32 callers compile no variants of their own; the results are the same."""
    B, T, V = 2, 6, 37
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2 * B, T, V, generator=g)
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[0, :3] = -100
    seen = []
    for mod, name in ((KP, "_fwd_kernel"), (KP, "_bwd_kernel"), (KP, "_seq_sum_kernel"),
                      (KD, "_dpo_pairs_kernel")):
        monkeypatch.setattr(mod, name, _Spy(getattr(mod, name), seen, args=True))
    out = {}
    for dt in (torch.int64, torch.int32):
        lab = labels.to(dt)
        lp, st = KP.forward(x, lab, -100, 1.0)
        sums, cnt = KP.sequence_sums(lp, lab, -100)
        gx = KP.backward(x, lab, st, -100, 1.0, mode=KP.MODE_SEQUENCE, g=torch.ones(2 * B))
        res = KD.dpo_pairs(None, None, torch.zeros(B), torch.zeros(B), beta=0.1, loss_type=0,
                           label_smoothing=0.0, tau=0.05, token_logps=lp, labels=lab)
        out[dt] = (lp, sums, cnt, gx, res["loss"])
    for a, b in zip(out[torch.int64], out[torch.int32]):
        assert torch.equal(a, b)
    lab_args = [a for _, args in seen for a in args
                if isinstance(a, torch.Tensor) and not a.dtype.is_floating_point]
    assert lab_args and all(a.dtype == torch.int64 for a in lab_args)


# ----------------------------------------------------------------------------------------------
# the gate's recording (no compiler needed)
# ----------------------------------------------------------------------------------------------


def test_gate_records_every_specialisation():
    from bpo_fast.tools import gpu_check as G

    jobs = G.record_launches((80,))
    kinds = {}
    for j in jobs:
        kinds.setdefault(j["kernel"], []).append(j)
    dpo = {(j["kwargs"]["LOSS"]["i"], j["kwargs"]["TOKENS"]["b"], j["kwargs"]["HAS_LEN"]["b"])
           for j in kinds["_dpo_pairs_kernel"]}
    # one variant per (loss, TOKENS, HAS_LEN), whatever B, T or the input dtypes
    assert dpo == {(lt, tok, hl) for lt in range(12) for tok, hl in
                   ((False, False), (False, True), (True, False))}
    assert len(kinds["_dpo_pairs_kernel"]) == 36
    assert {j["kwargs"]["ROWS"]["b"] for j in kinds["_fused_bwd_det_kernel"]} == {True, False}
    # one variant per MODE: MODE_DPO's optional terms are runtime flags
    assert {j["kwargs"]["MODE"]["i"] for j in kinds["_bwd_kernel"]} == {0, 1, 2}
    assert not any("HAS_GLOSS" in j["kwargs"] for j in kinds["_bwd_kernel"])
    # the tiles recorded are the table's, for each dtype
    tiles = {(j["kwargs"]["BM"]["i"], j["kwargs"]["BV"]["i"], j["kwargs"]["BK"]["i"])
             for j in kinds["_fused_bwd_kernel"]}
    assert tiles == {KL.tile_config("bwd", dt, 80)[:3] for dt in (torch.float32, torch.bfloat16)}
    assert set(kinds) >= {"_fwd_kernel", "_seq_sum_kernel", "_lse_update_kernel",
                          "_dlogits_kernel", "_fused_fwd_kernel", "_dpo_mean_kernel"}
    # the grid's int32 labels are launched as int64; its transposed weights with unit k-stride
    assert not any(a and a.get("t") == "int32" for j in jobs for a in j["args"])
    for k in ("_fused_fwd_kernel", "_fused_bwd_kernel", "_fused_bwd_det_kernel"):
        assert all(j["args"][5] == {"i": 1} and j["wide"] == ["h_ptr", "w_ptr"]
                   for j in kinds[k]), k
    # V not a multiple of 16 (32001) reaches the logits kernels: rows without 16-byte vectors
    assert any(not j["args"][2].get("ns") and j["args"][2]["i"] % 16
               for j in kinds["_fwd_kernel"])
    # every fused LM-head kernel is recorded with and without the logit soft-cap
    for k in ("_fused_fwd_kernel", "_fused_bwd_kernel", "_fused_bwd_det_kernel",
              "_lse_update_kernel", "_dlogits_kernel"):
        assert {j["kwargs"]["SOFTCAP"]["b"] for j in kinds[k]} == {False, True}, k
