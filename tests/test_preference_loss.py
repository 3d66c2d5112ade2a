"""preference_loss: the one op training runs (fused LM head + registry loss + RPO term).

Against a float64 autograd reference built from full logits, for every loss type with and
without RPO, on both CPU paths of the [B]-sized loss (the torch reference with autograd, and the
Triton pair kernel under the interpreter); the 3-GEMM path against the composed one; LM-head
GEMMs counted per scored token (3 with RPO, every loss type), also through PreferenceModel."""


import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bpo_fast.ops.losses import LOSS_TYPES, loss_config
from bpo_fast.ops.preference import PreferenceLoss, PreferenceLossOutput, preference_loss

EPS = {"robust": 0.2, "exo_pair": 1e-3, "cdpo": 0.1}


def inputs(B=3, T=9, H=24, V=67, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.3
    b = torch.randn(V, generator=g) * 0.1 if bias else None
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[:, :3] = -100          # prompt
    labels[B + 1, 6:] = -100      # a shorter rejected answer
    labels[1] = -100              # a chosen row that scores nothing
    # references near the policy so every loss type is in its interesting range
    with torch.no_grad():
        lp = _logps64(hidden.double(), weight.double(), None if b is None else b.double(),
                      labels, 1.0)[0].float()
    ref_c = lp[:B] + torch.randn(B, generator=g) * 2
    ref_r = lp[B:] + torch.randn(B, generator=g) * 2
    return hidden, weight, labels, b, ref_c, ref_r


def _logps64(hidden, weight, bias, labels, temperature):
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    lsm = torch.log_softmax(logits[:, :-1] / temperature, -1)
    nxt = labels[:, 1:]
    mask = nxt != -100
    tok = lsm.gather(-1, nxt.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    return tok.sum(1), mask.sum(1)


def reference(hidden, weight, bias, labels, ref_c, ref_r, lt, rpo_alpha, temperature,
              length_count="scored"):
    """float64 truth by autograd through full logits."""
    cfg = loss_config(lt, 0.3, EPS.get(lt, 0.0))
    logps, n = _logps64(hidden, weight, bias, labels, temperature)
    B = ref_c.shape[0]
    lengths = n if length_count == "scored" else (labels != -100).sum(1)
    c, r = logps[:B] - ref_c.double(), logps[B:] - ref_r.double()
    losses = cfg.losses(c, r, lengths[:B], lengths[B:])
    nll = -logps[:B].sum() / n[:B].sum().clamp(min=1)
    return losses.mean() + rpo_alpha * nll, losses, nll, logps, n


@pytest.mark.parametrize("rpo_alpha", [0.0, 0.7])
@pytest.mark.parametrize("lt", LOSS_TYPES)
def test_matches_float64_autograd(lt, rpo_alpha, loss_path):
    hidden, weight, labels, bias, ref_c, ref_r = inputs(seed=LOSS_TYPES.index(lt))
    params = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    out = preference_loss(*params[:2], labels, ref_c, ref_r, bias=params[2], loss=lt, beta=0.3,
                          label_smoothing=EPS.get(lt, 0.0), rpo_alpha=rpo_alpha,
                          temperature=0.9, impl="torch", chunk_sizes=(7, 32))
    assert isinstance(out, PreferenceLossOutput)
    grads = torch.autograd.grad(out.loss, params)
    p64 = [t.double().requires_grad_(True) for t in (hidden, weight, bias)]
    loss, losses, nll, logps, n = reference(p64[0], p64[1], p64[2], labels, ref_c, ref_r, lt,
                                            rpo_alpha, 0.9)
    want = torch.autograd.grad(loss, p64)
    B = 3
    torch.testing.assert_close(out.loss.double(), loss.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.dpo.losses.double(), losses.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.nll.double(), nll.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.policy_chosen_logps.double(), logps[:B].detach(),
                               rtol=1e-5, atol=1e-4)
    assert torch.equal(out.chosen_tokens, n[:B]) and torch.equal(out.rejected_tokens, n[B:])
    if rpo_alpha == 0:
        assert out.dpo.loss is out.loss
    for g, w in zip(grads, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("lt", ["sigmoid", "ipo", "cdpo"])
def test_grad_in_forward_equals_composed_path_for_every_output(lt):
    """d loss through the stored gradients; the DPO part, the per-pair losses, the NLL and the
    log-probs through the recomputing backward: both paths agree."""
    hidden, weight, labels, bias, ref_c, ref_r = inputs(B=4, seed=7)
    res = []
    for gif in (True, False):
        params = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
        out = preference_loss(*params[:2], labels, ref_c, ref_r, bias=params[2], loss=lt,
                              beta=0.3, label_smoothing=EPS.get(lt, 0.0), rpo_alpha=0.5,
                              impl="torch", chunk_sizes=(10, 64), grad_in_forward=gif)
        g1 = torch.autograd.grad(out.loss, params, retain_graph=True)
        obj = (0.3 * out.dpo.loss + (torch.arange(4.0) * out.dpo.losses).sum() - 2.0 * out.nll
               + 0.01 * out.policy_rejected_logps.sum())
        res.append((out, g1, torch.autograd.grad(obj, params)))
    (a, ga, ga2), (b, gb, gb2) = res
    for name in ("loss", "nll", "policy_chosen_logps", "policy_rejected_logps", "chosen_tokens"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.dpo.losses, b.dpo.losses, rtol=1e-5, atol=1e-5)
    for x, y in zip(ga + ga2, gb + gb2):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def test_length_count_completion_is_trls():
    hidden, weight, labels, bias, ref_c, ref_r = inputs(bias=False, seed=3)
    labels[0, 0] = 5  # position 0 a completion token: TRL's completion_mask counts it
    for lc in ("scored", "completion"):
        out = preference_loss(hidden, weight, labels, ref_c, ref_r, loss="ipo", beta=0.3,
                              length_count=lc)
        want = reference(hidden.double(), weight.double(), None, labels, ref_c, ref_r, "ipo",
                         0.0, 1.0, length_count=lc)[1]
        torch.testing.assert_close(out.dpo.losses.double(), want, rtol=1e-5, atol=1e-5)
    a = preference_loss(hidden, weight, labels, ref_c, ref_r, loss="ipo").dpo.losses
    b = preference_loss(hidden, weight, labels, ref_c, ref_r, loss="ipo",
                        length_count="completion").dpo.losses
    assert a[0] != b[0] and torch.equal(a[1:], b[1:])


def test_module_and_check_finite():
    hidden, weight, labels, bias, ref_c, ref_r = inputs()
    mod = PreferenceLoss("robust", 0.3, 0.2, rpo_alpha=0.5, check_finite=True)
    assert "robust" in repr(mod) and "rpo_alpha=0.5" in repr(mod)
    out = mod(hidden, weight, labels, ref_c, ref_r, bias=bias)
    want = preference_loss(hidden, weight, labels, ref_c, ref_r, bias=bias, loss="robust",
                           beta=0.3, label_smoothing=0.2, rpo_alpha=0.5)
    torch.testing.assert_close(out.loss, want.loss)
    bad = hidden.clone()
    bad[2, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="hidden holds NaN or inf"):
        mod(bad, weight, labels, ref_c, ref_r, bias=bias)
    with pytest.raises(ValueError, match="ref_chosen_logps holds NaN or inf"):
        mod(hidden, weight, labels, ref_c.clone().fill_(float("inf")), ref_r, bias=bias)
    with pytest.raises(ValueError, match="ref_rejected_logps must be"):
        preference_loss(hidden, weight, labels, ref_c, ref_r[:2])
    with pytest.raises(ValueError, match="grad_in_forward=True needs impl"):
        preference_loss(hidden, weight, labels, ref_c, ref_r, impl="triton",
                        grad_in_forward=True)


# ----------------------------------------------------------------------------------------------
# LM-head GEMMs per scored token, counted at the matmul entry points
# ----------------------------------------------------------------------------------------------


class LMHeadGEMMs(TorchDispatchMode):
    """Sums the FLOPs of every mm/addmm/bmm (with ``only_V``: those whose operands involve the
    vocabulary size V, i.e. the LM head's and not the decoder's, when the head's GEMMs are not
    split along V), in units of one ``[tokens, H] x [H, V]`` GEMM."""

    OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::addmm_", "aten::matmul"}

    def __init__(self, V, only_V=True):
        super().__init__()
        self.V, self.only_V, self.flops = V, only_V, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in self.OPS:
            a, b = (args[1], args[2]) if name.startswith("aten::addmm") else (args[0], args[1])
            if not self.only_V or self.V in (a.shape[-2], a.shape[-1], b.shape[-1]):
                m, k = a.shape[-2], a.shape[-1]
                self.flops += 2 * m * k * b.shape[-1] * (a.shape[0] if a.dim() == 3 else 1)
        return func(*args, **(kwargs or {}))

    def per_token(self, S, H):
        return self.flops / (2 * S * H * self.V)


@pytest.mark.parametrize("lt", LOSS_TYPES)
def test_three_lm_head_gemms_per_scored_token_with_rpo(lt):
    hidden, weight, labels, _, ref_c, ref_r = inputs(B=4, bias=False, V=97, seed=2)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    S = int((labels[:, 1:] != -100).sum())
    for gif, want in ((None, 3), (False, 4)):
        with LMHeadGEMMs(97, only_V=False) as c:  # only the op runs
            out = preference_loss(hidden, weight, labels, ref_c, ref_r, loss=lt, beta=0.3,
                                  label_smoothing=EPS.get(lt, 0.0), rpo_alpha=1.0,
                                  chunk_sizes=(9, 40), grad_in_forward=gif)
            out.loss.backward()
        assert c.per_token(S, 24) == pytest.approx(want), (lt, gif)


def test_preference_model_runs_three_gemms_per_scored_token():
    """PreferenceModel (what `bpo-fast train` runs), every loss type with and without RPO: 3
    LM-head GEMMs per scored token (the reference log-probs come from a cache here)."""
    from bpo_fast.models.preference import PreferenceModel
    from bpo_fast.models.tiny import TinyLlavaConfig, build_tiny_llava

    model = build_tiny_llava(config=TinyLlavaConfig(), seed=0)[0]
    V = model.get_output_embeddings().weight.shape[0]
    H = model.get_output_embeddings().weight.shape[1]
    cfg = model.config
    n_img = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    g = torch.Generator().manual_seed(0)
    B, T = 2, n_img + 24
    ids = torch.randint(3, cfg.image_token_id, (2 * B, T), generator=g)
    ids[:, 1:1 + n_img] = cfg.image_token_id
    labels = ids.clone()
    labels[:, :1 + n_img + 4] = -100
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels,
                 pixel_values=torch.randn(B, 3, cfg.vision_config.image_size,
                                          cfg.vision_config.image_size, generator=g))
    S = int((labels[:, 1:] != -100).sum())
    for lt in LOSS_TYPES:
        for rpo in (None, 1.0):
            pm = PreferenceModel(model, reference_mode="cached", loss_type=lt, rpo_alpha=rpo,
                                 label_smoothing=EPS.get(lt, 0.0))
            with LMHeadGEMMs(V) as c:
                out = pm(**batch, ref_chosen_logps=torch.full((B,), -50.0),
                         ref_rejected_logps=torch.full((B,), -60.0))
                out.loss.backward()
            assert c.per_token(S, H) == pytest.approx(3.0), (lt, rpo)
            assert (out.loss > out.dpo.loss) if rpo else (out.loss is out.dpo.loss)
            model.zero_grad(set_to_none=True)


def test_autocast_does_not_reach_inside_the_op():
    """Under bf16 autocast (what `bpo-fast train` uses with fp32 master weights) the op runs
    its GEMMs in the dtype it is given, with float32 logits: the 3-GEMM path equals the
    composed one, and both equal the same computation without autocast."""
    hidden, weight, labels, _, ref_c, ref_r = inputs(bias=False, seed=4)
    h16, w16 = hidden.bfloat16(), weight.bfloat16()
    res = []
    for gif in (True, False):
        p = [h16.clone().requires_grad_(True), w16.clone().requires_grad_(True)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = preference_loss(*p, labels, ref_c, ref_r, rpo_alpha=0.5, grad_in_forward=gif)
        res.append((out.loss, out.policy_chosen_logps, torch.autograd.grad(out.loss, p)))
    p = [h16.clone().requires_grad_(True), w16.clone().requires_grad_(True)]
    plain = preference_loss(*p, labels, ref_c, ref_r, rpo_alpha=0.5, grad_in_forward=False)
    for loss, lp, g in res:
        assert loss.dtype == torch.float32 and lp.dtype == torch.float32
        torch.testing.assert_close(loss, plain.loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lp, plain.policy_chosen_logps, rtol=1e-5, atol=1e-3)
    for a, b in zip(res[0][2], res[1][2]):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=1e-3)
