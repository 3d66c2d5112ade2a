"""bpo_fast.diffusion_noise: schedules, the Philox stream, the CPU (and CUDA) kernels, the
reference, the fallback, validation. CUDA tests are marked and skipped without a GPU."""

import math
import warnings

import pytest
import torch

from bpo_fast import _ext
from bpo_fast.ops import noise as N
from bpo_fast.ops.noise import (CLIP_MEAN, CLIP_STD, DEFAULT_SCHEDULE, NoiseSchedule,
                                diffusion_noise, diffusion_noise_reference,
                                philox_normal_reference)

HAS_EXT = _ext.load_extension()
needs_ext = pytest.mark.skipif(not HAS_EXT, reason=f"bpo_fast._C not built: {_ext._state['error']}")
HAS_CUDA = torch.cuda.is_available()


def _images(B=3, C=3, H=8, W=12, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, C, H, W), dtype=torch.uint8, generator=g).to(device)


def _stream_reference(images, timesteps, seed, offset=0, **kw):
    """The reference fed with the op's own Philox stream: what the kernels must compute."""
    B, C, H, W = images.shape if kw.get("layout", "NCHW") == "NCHW" else images.permute(0, 3, 1, 2).shape
    K = timesteps.shape[1] if timesteps.dim() == 2 else 1
    eps = philox_normal_reference(seed, offset, B * K, C * H * W)
    shape = (B, K, C, H, W) if timesteps.dim() == 2 else (B, C, H, W)
    return diffusion_noise_reference(images.cpu(), timesteps.cpu(), noise=eps.view(shape), **kw)


# ------------------------------------------------------------------------------- schedules

def test_schedule_closed_forms():
    T = 1000
    lin = NoiseSchedule("linear", T)
    i = torch.arange(T, dtype=torch.float64)
    betas = 1e-4 + (0.02 - 1e-4) * i / (T - 1)
    torch.testing.assert_close(lin.betas.double(), betas, rtol=1e-6, atol=1e-9)
    abar = torch.cumprod(1 - betas, 0)
    torch.testing.assert_close(lin.alphas_cumprod.double(), abar, rtol=2e-4, atol=1e-6)
    torch.testing.assert_close(lin.sqrt_alphas_cumprod, lin.alphas_cumprod.sqrt())
    torch.testing.assert_close(lin.sqrt_one_minus_alphas_cumprod, (1 - lin.alphas_cumprod).sqrt())
    for s in (lin, NoiseSchedule("cosine", T), NoiseSchedule("sigmoid", T)):
        assert s.alphas_cumprod.dtype == torch.float32 and s.alphas_cumprod.shape == (T,)
        assert torch.all(s.alphas_cumprod[1:] < s.alphas_cumprod[:-1])  # strictly more noise
        torch.testing.assert_close(s.sqrt_alphas_cumprod ** 2 + s.sqrt_one_minus_alphas_cumprod ** 2,
                                   torch.ones(T), atol=1e-6, rtol=0)

    sl = NoiseSchedule("scaled_linear", T, beta_start=0.00085, beta_end=0.012)
    b = (math.sqrt(0.00085) + (math.sqrt(0.012) - math.sqrt(0.00085)) * i / (T - 1)) ** 2
    torch.testing.assert_close(sl.betas.double(), b, rtol=1e-5, atol=1e-9)

    # cosine: the product telescopes, abar_t = f((t+1)/T) / f(0) wherever beta is not capped
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    cos = NoiseSchedule("cosine", T)
    closed = torch.tensor([f((t + 1) / T) / f(0) for t in range(T)], dtype=torch.float64)
    capped = cos.betas >= 0.999 - 1e-6
    assert capped.sum() >= 1 and bool(capped[-1])  # the last step hits the 0.999 cap
    torch.testing.assert_close(cos.alphas_cumprod.double()[~capped], closed[~capped], rtol=1e-4, atol=1e-6)

    # sigmoid (VCD/BPO): betas in [1e-5, 5e-3], symmetric around the midpoint
    sig = NoiseSchedule("sigmoid", T)
    assert sig.betas.min() > 1e-5 and sig.betas.max() < 5e-3
    torch.testing.assert_close(sig.betas + sig.betas.flip(0), torch.full((T,), 1e-5 + 5e-3), rtol=1e-5, atol=1e-9)


def test_schedule_matches_diffusers_and_vcd_formulas():
    # diffusers DDPMScheduler / betas_for_alpha_bar, written out independently
    T = 1000
    ref = {
        "linear": torch.linspace(0.0001, 0.02, T, dtype=torch.float32),
        "scaled_linear": torch.linspace(0.0001 ** 0.5, 0.02 ** 0.5, T, dtype=torch.float32) ** 2,
        "sigmoid": torch.sigmoid(torch.linspace(-6, 6, T)) * (0.5e-2 - 1e-5) + 1e-5,
    }
    cosine = []
    for k in range(T):
        t1, t2 = k / T, (k + 1) / T
        ab = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        cosine.append(min(1 - ab(t2) / ab(t1), 0.999))
    ref["cosine"] = torch.tensor(cosine, dtype=torch.float32)
    for kind, betas in ref.items():
        s = NoiseSchedule(kind, T)
        abar = torch.cumprod(1.0 - betas, dim=0)
        assert torch.equal(s.betas, betas), kind
        assert torch.equal(s.alphas_cumprod, abar), kind
        assert torch.equal(s.sqrt_alphas_cumprod, abar ** 0.5), kind
        assert torch.equal(s.sqrt_one_minus_alphas_cumprod, (1 - abar) ** 0.5), kind
    # the VCD helper's tables exactly (it rebuilds them on every call)
    alphas_prod = torch.cumprod(1 - ref["sigmoid"], dim=0)
    assert torch.equal(DEFAULT_SCHEDULE.sqrt_alphas_cumprod, torch.sqrt(alphas_prod))
    assert torch.equal(DEFAULT_SCHEDULE.sqrt_one_minus_alphas_cumprod, torch.sqrt(1 - alphas_prod))


def test_schedule_validation_and_cache():
    with pytest.raises(ValueError, match="kind"):
        NoiseSchedule("quadratic")
    with pytest.raises(TypeError, match="num_steps"):
        NoiseSchedule("linear", 10.0)
    with pytest.raises(ValueError, match="num_steps"):
        NoiseSchedule("linear", 0)
    with pytest.raises(ValueError, match="beta_start"):
        NoiseSchedule("linear", beta_start=0.0)
    with pytest.raises(ValueError, match="beta_end"):
        NoiseSchedule("sigmoid", beta_end=1.5)
    with pytest.raises(ValueError, match="<= beta_end"):
        NoiseSchedule("linear", beta_start=0.02, beta_end=0.01)
    with pytest.raises(ValueError, match="cosine"):
        NoiseSchedule("cosine", beta_start=0.001)
    with pytest.raises(TypeError, match="beta_start"):
        NoiseSchedule("linear", beta_start="0.1")
    s = NoiseSchedule("linear", 10)
    a = s.tables("cpu")
    assert s.tables(torch.device("cpu"))[0] is a[0]  # cached, not rebuilt
    assert "linear" in repr(s)


# ------------------------------------------------------------------------------- the stream

def test_philox_known_answers():
    # Random123's kat_vectors for philox4x32_10
    cases = [
        ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
        ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
        ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0],
         [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
    ]
    for ctr, key, want in cases:
        t = lambda v: torch.tensor([v], dtype=torch.int64)  # noqa: E731
        got = N.philox4x32_10_reference([t(c) for c in ctr], [t(k) for k in key])
        assert [int(v) for v in got] == want


def test_device_log_is_accurate_on_every_uniform():
    """csrc/philox.h log_unit (the GPU's log in Box-Muller), emulated op by op in fp32 on all
    2^23 values uniform_open01 can produce: relative error below 2 ulp everywhere, including
    next to u = 1 where an absolute-error log would ruin the small radii."""
    k = torch.arange(2 ** 23, dtype=torch.int64)
    u = k.float() * 2.0 ** -23 + 2.0 ** -24  # uniform_open01, exact
    assert bool((u > 0).all() and (u < 1).all()) and torch.unique(u).numel() == 2 ** 23
    bits = u.view(torch.int32)
    e = (bits - 0x3F3504F3) & torch.tensor(0xFF800000 - 2 ** 32, dtype=torch.int32)
    x = (bits - e).view(torch.float32) - 1.0
    fe = (e >> 23).float()
    z = x * x
    coef = [7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
            -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1]
    p = torch.full_like(x, coef[0])
    for c in coef[1:]:
        p = p * x + c
    got = 0.693147180559945309 * fe + (x + ((x * z) * p - 0.5 * z))
    exact = torch.log(u.double())
    rel = ((got.double() - exact) / exact.abs()).abs().max().item()
    assert rel < 2 * 2.0 ** -24, rel


@needs_ext
@pytest.mark.parametrize("shape", [(3, 3, 8, 12), (2, 3, 5, 7), (1, 3, 1, 1)])
@pytest.mark.parametrize("space", ["normalized", "pixel"])
def test_cpu_kernel_is_the_reference_on_the_philox_stream(shape, space):
    # Odd shapes (C*H*W not a multiple of 4, one element) cover the partial Philox groups.
    x = _images(*shape)
    B = shape[0]
    for ts in (torch.arange(B) * 333 % 1000, torch.tensor([[0, 999, 500]] * B)):
        for seed in (0, 12345, 2 ** 64 - 1):
            out = diffusion_noise(x, ts, seed=seed, space=space)
            ref = _stream_reference(x, ts, seed, space=space)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-5)
    # offset moves to an independent stream (torch.ops level: the generator's Philox offset)
    sab, s1 = DEFAULT_SCHEDULE.tables("cpu")
    ts = torch.full((B,), 999)
    o4 = torch.ops.bpo_fast.diffusion_noise(x, ts, sab, s1, seed=7, offset=4)
    torch.testing.assert_close(o4, _stream_reference(x, ts, 7, offset=4, mean=None, std=None),
                               rtol=1e-5, atol=2e-5)


@needs_ext
def test_determinism_and_seeding():
    x, ts = _images(), torch.tensor([10, 500, 999])
    a = diffusion_noise(x, ts, seed=3)
    assert torch.equal(a, diffusion_noise(x, ts, seed=3))  # bit for bit
    assert not torch.allclose(a, diffusion_noise(x, ts, seed=4))
    torch.manual_seed(0)
    p, q = diffusion_noise(x, ts), diffusion_noise(x, ts)
    assert not torch.allclose(p, q)  # consecutive calls draw fresh noise
    torch.manual_seed(0)
    assert torch.equal(p, diffusion_noise(x, ts))  # torch.manual_seed reproduces
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(diffusion_noise(x, ts, generator=g1), diffusion_noise(x, ts, generator=g2))
    # the noise of image j depends only on (seed, j, i): a batch's first image is the same alone
    full = diffusion_noise(x, ts, seed=5)
    assert torch.equal(full[:1], diffusion_noise(x[:1], ts[:1], seed=5))


def _recovered_eps(out, x, ts, schedule=DEFAULT_SCHEDULE):
    """eps = (out - a * x0) / s for normalized space with CLIP statistics."""
    u = x.float() / 255
    m = torch.tensor(CLIP_MEAN).view(1, -1, 1, 1)
    s = torch.tensor(CLIP_STD).view(1, -1, 1, 1)
    x0 = ((u - m) / s).unsqueeze(1)
    B, K = ts.shape
    a = schedule.sqrt_alphas_cumprod[ts].view(B, K, 1, 1, 1)
    sd = schedule.sqrt_one_minus_alphas_cumprod[ts].view(B, K, 1, 1, 1)
    return (out.view(B, K, *x.shape[1:]).double() - a * x0) / sd


def _corr(a, b):
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def _check_gaussian_white(eps):
    """eps [B, K, C, H, W]: N(0, 1), uncorrelated across images, levels, channels, neighbours."""
    n = eps.numel()
    tol = 6 / math.sqrt(n)
    assert abs(float(eps.mean())) < tol
    assert abs(float(eps.var()) - 1) < 12 / math.sqrt(n)
    assert abs(float((eps.abs() < 1).double().mean()) - 0.682689) < 0.01
    assert abs(float((eps ** 4).mean()) - 3) < 0.15  # Gaussian kurtosis
    per = eps[:, :, 0].numel()
    ctol = 6 / math.sqrt(per)
    B, K, C = eps.shape[:3]
    assert abs(_corr(eps[0], eps[1])) < 6 / math.sqrt(eps[0].numel())  # images
    if K > 1:
        assert abs(_corr(eps[:, 0], eps[:, 1])) < 6 / math.sqrt(eps[:, 0].numel())  # levels
    assert abs(_corr(eps[:, :, 0], eps[:, :, 1])) < ctol  # channels
    assert abs(_corr(eps[..., 1:], eps[..., :-1])) < 6 / math.sqrt(eps[..., 1:].numel())  # w neighbours
    assert abs(_corr(eps[..., 1:, :], eps[..., :-1, :])) < 6 / math.sqrt(eps[..., 1:, :].numel())  # h
    # lag 4: consecutive Philox groups
    assert abs(_corr(eps[..., 4:], eps[..., :-4])) < 6 / math.sqrt(eps[..., 4:].numel())


@needs_ext
def test_recovered_noise_statistics():
    x = _images(B=6, C=3, H=48, W=64, seed=1)
    ts = torch.tensor([[999, 700]] * 6)
    torch.manual_seed(0)
    out = diffusion_noise(x, ts)
    _check_gaussian_white(_recovered_eps(out, x, ts))


@needs_ext
def test_per_image_timesteps_and_shared_x0():
    x = _images(B=4, H=16, W=16)
    ts = torch.tensor([[0, 999], [250, 250], [999, 1], [500, 600]])
    out = diffusion_noise(x, ts, seed=11)
    assert out.shape == (4, 2, 3, 16, 16)
    eps = philox_normal_reference(11, 0, 8, 3 * 16 * 16).view(4, 2, 3, 16, 16)
    # each (image, level) has its own timestep's coefficients and the same x0
    u = x.float() / 255
    x0 = (u - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    for b in range(4):
        for k in range(2):
            t = int(ts[b, k])
            a, s = DEFAULT_SCHEDULE.sqrt_alphas_cumprod[t], DEFAULT_SCHEDULE.sqrt_one_minus_alphas_cumprod[t]
            torch.testing.assert_close(out[b, k], a * x0[b] + s * eps[b, k], rtol=1e-5, atol=2e-5)
    # [B, 1] is the same as [B] (output image index j = b * K + k)
    flat = diffusion_noise(x, ts[:, 0], seed=11)
    assert torch.equal(diffusion_noise(x, ts[:, :1], seed=11)[:, 0], flat)
    # t = 0 keeps almost all of x0, t = 999 almost none (the sigmoid schedule ends near abar 0.09)
    assert (out[0, 0] - x0[0]).abs().max() < 0.05


@needs_ext
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_layouts_and_input_dtypes_agree(out_dtype):
    x = _images(B=2, C=3, H=16, W=8)
    ts = torch.tensor([100, 900])
    base = diffusion_noise(x, ts, seed=1, out_dtype=out_dtype)
    assert base.dtype == out_dtype and base.is_contiguous()
    nhwc = x.permute(0, 2, 3, 1).contiguous()  # [B, H, W, C]
    assert torch.equal(diffusion_noise(nhwc, ts, seed=1, layout="NHWC", out_dtype=out_dtype), base)
    cl = x.contiguous(memory_format=torch.channels_last)  # NCHW with channels-last strides
    assert torch.equal(diffusion_noise(cl, ts, seed=1, out_dtype=out_dtype), base)
    big = _images(B=2, C=3, H=40, W=30, seed=2)
    big[:, :, 3:19, 5:13] = x
    view = big[:, :, 3:19, 5:13]  # a strided crop, read in place
    assert not view.is_contiguous()
    assert torch.equal(diffusion_noise(view, ts, seed=1, out_dtype=out_dtype), base)
    tol = dict(rtol=1e-5, atol=1e-5) if out_dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        xf = (x.float() / 255).to(dt)
        exact = dt == torch.float32  # x/255 in fp16/bf16 is itself rounded
        got = diffusion_noise(xf, ts, seed=1, out_dtype=out_dtype)
        torch.testing.assert_close(got, base, **(tol if exact else dict(rtol=2e-2, atol=2e-2)))
    if out_dtype != torch.float32:  # fp32 arithmetic, one rounding at the store
        assert torch.equal(base, diffusion_noise(x, ts, seed=1).to(out_dtype))


@needs_ext
def test_pixel_space_and_no_normalisation():
    x, ts = _images(B=2, H=16, W=16), torch.tensor([999, 999])
    out = diffusion_noise(x, ts, seed=2, space="pixel", mean=None, std=None)
    assert out.min() >= 0 and out.max() <= 1 and (out == 0).any() and (out == 1).any()
    normed = diffusion_noise(x, ts, seed=2, space="pixel")
    m, s = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(normed, (out - m) / s, rtol=1e-5, atol=1e-5)
    plain = diffusion_noise(x, ts, seed=2, mean=None, std=None)
    torch.testing.assert_close(plain, _stream_reference(x, ts, 2, mean=None, std=None), rtol=1e-5, atol=2e-5)


@needs_ext
def test_empty_inputs():
    sched = NoiseSchedule("linear", 10)
    e = diffusion_noise(torch.empty(0, 3, 4, 4, dtype=torch.uint8), torch.empty(0, dtype=torch.long), sched)
    assert e.shape == (0, 3, 4, 4) and e.dtype == torch.float32
    e = diffusion_noise(torch.empty(0, 4, 4, 3, dtype=torch.uint8), torch.empty(0, 2, dtype=torch.long),
                        sched, layout="NHWC", out_dtype=torch.bfloat16)
    assert e.shape == (0, 2, 3, 4, 4) and e.dtype == torch.bfloat16
    e = diffusion_noise(_images(B=2), torch.empty(2, 0, dtype=torch.long), sched)
    assert e.shape == (2, 0, 3, 8, 12)


@needs_ext
def test_opcheck_and_fake():
    op = torch.ops.bpo_fast.diffusion_noise.default
    sab, s1 = DEFAULT_SCHEDULE.tables("cpu")
    x = _images(B=2, H=4, W=8)
    for ts, kw in [
        (torch.tensor([3, 900]), dict(mean=list(CLIP_MEAN), std=list(CLIP_STD), out_dtype=torch.bfloat16, seed=7)),
        (torch.tensor([[3, 900], [1, 2]]), dict(pixel_space=True, seed=1, offset=8)),
    ]:
        res = torch.library.opcheck(op, (x, ts, sab, s1), kw)
        assert all(v == "SUCCESS" for v in res.values()), res
    res = torch.library.opcheck(op, (x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2),
                                     torch.tensor([5, 6]), sab, s1), dict(seed=3))
    assert all(v == "SUCCESS" for v in res.values()), res
    m = op(x.to("meta"), torch.zeros(2, 5, dtype=torch.long, device="meta"), sab.to("meta"),
           s1.to("meta"), out_dtype=torch.float16)
    assert m.shape == (2, 5, 3, 4, 8) and m.dtype == torch.float16 and m.device.type == "meta"


@needs_ext
@pytest.mark.parametrize("space", ["normalized", "pixel"])
@pytest.mark.parametrize("norm", [True, False])
def test_gradient_to_float_images(space, norm):
    # The noise is an additive constant: d out / d u = a_t / std (and the clamp mask in pixel
    # space). Same gradient as autograd through the reference fed with the same noise.
    kw = dict(space=space) if norm else dict(space=space, mean=None, std=None)
    x = torch.rand(2, 3, 4, 8)
    ts = torch.tensor([[3, 999], [500, 10]])
    ours, ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = diffusion_noise(ours, ts, seed=1, **kw)
    w = torch.randn(out.shape)
    (out * w).sum().backward()
    eps = philox_normal_reference(1, 0, 4, 3 * 4 * 8).view(2, 2, 3, 4, 8)
    (diffusion_noise_reference(ref, ts, noise=eps, **kw) * w).sum().backward()
    torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-5, atol=1e-5)
    assert ours.grad.abs().sum() > 0
    # one channel (C = 1) with normalisation
    x1 = torch.rand(2, 1, 4, 8, requires_grad=True)
    diffusion_noise(x1, torch.tensor([5, 7]), seed=2, space=space, mean=[0.5], std=[0.25]).sum().backward()
    a = DEFAULT_SCHEDULE.sqrt_alphas_cumprod[torch.tensor([5, 7])].view(2, 1, 1, 1)
    if space == "normalized":
        torch.testing.assert_close(x1.grad, (a / 0.25).expand(2, 1, 4, 8))
    else:
        assert set(x1.grad.unique().tolist()) <= {0.0} | set((a / 0.25).flatten().tolist())
    if space == "pixel":  # t = 999 clamps somewhere: those elements get no gradient
        xs = x.clone().requires_grad_()
        diffusion_noise(xs, torch.tensor([999, 999]), seed=1, **kw).sum().backward()
        assert (xs.grad == 0).any() and (xs.grad != 0).any()
    sab, s1 = DEFAULT_SCHEDULE.tables("cpu")
    res = torch.library.opcheck(torch.ops.bpo_fast.diffusion_noise.default,
                                (x.clone().requires_grad_(), ts, sab, s1),
                                dict(pixel_space=space == "pixel", seed=3))
    assert all(v == "SUCCESS" for v in res.values()), res


@needs_ext
def test_torch_compile_cpu():
    x, ts = _images(B=2, H=4, W=8), torch.tensor([[3, 900], [10, 20]])

    def f(x, ts):
        return diffusion_noise(x, ts, out_dtype=torch.bfloat16), diffusion_noise(x, ts)

    cf = torch.compile(f, fullgraph=False)
    torch.manual_seed(0)
    eager = f(x, ts)
    torch.manual_seed(0)
    comp = cf(x, ts)
    for e, c in zip(eager, comp):
        assert torch.equal(e, c)
    assert not torch.allclose(eager[0].float(), eager[1])  # two calls: two draws, never merged


# ------------------------------------------------------------------------------- fallback

@pytest.fixture
def forced_fallback(monkeypatch):
    monkeypatch.setattr(_ext, "_state", {"loaded": False, "error": "forced by the test", "warned": False})
    yield


def test_fallback_semantics(forced_fallback):
    x, ts = _images(B=4, H=32, W=32), torch.tensor([[999, 600]] * 4)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        torch.manual_seed(0)
        out = diffusion_noise(x, ts)
        again = diffusion_noise(x, ts)
    msgs = [w for w in rec if "pure-PyTorch fallback" in str(w.message)]
    assert len(msgs) == 1 and issubclass(msgs[0].category, RuntimeWarning)  # said once
    assert out.shape == (4, 2, 3, 32, 32) and out.dtype == torch.float32
    assert not torch.allclose(out, again)
    torch.manual_seed(0)
    assert torch.equal(out, diffusion_noise(x, ts))  # manual_seed reproduces
    # exactly the reference with torch.randn noise drawn the same way
    g = torch.Generator().manual_seed(5)
    eps = torch.randn((4, 2, 3, 32, 32), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(diffusion_noise(x, ts, generator=g),
                               diffusion_noise_reference(x, ts, noise=eps), rtol=0, atol=0)
    assert torch.equal(diffusion_noise(x, ts, seed=3), diffusion_noise(x, ts, seed=3))
    _check_gaussian_white(_recovered_eps(out, x, ts))
    nhwc = diffusion_noise(x.permute(0, 2, 3, 1).contiguous(), ts, seed=3, layout="NHWC",
                           out_dtype=torch.bfloat16)
    assert torch.equal(nhwc, diffusion_noise(x, ts, seed=3, out_dtype=torch.bfloat16))
    pix = diffusion_noise(x, ts[:, 0], seed=1, space="pixel", mean=None, std=None)
    assert pix.shape == (4, 3, 32, 32) and pix.min() >= 0 and pix.max() <= 1
    with pytest.raises(ValueError, match="timesteps"):
        diffusion_noise(x, ts + 1000)
    e = diffusion_noise(x[:0], ts[:0])
    assert e.shape == (0, 2, 3, 32, 32)


# ------------------------------------------------------------------------------- bad input

def test_bad_inputs():
    x, ts = _images(B=2), torch.tensor([1, 2])
    cases = [
        (TypeError, "images must be a torch.Tensor", dict(images=x.numpy())),
        (ValueError, "4-D", dict(images=x[0])),
        (TypeError, "uint8", dict(images=x.int())),
        (TypeError, "uint8", dict(images=x.double())),
        (ValueError, "mean has 3 values but images has C=4", dict(images=_images(B=2, C=4))),
        (ValueError, "layout='NHWC'", dict(images=x.permute(0, 2, 3, 1)[:, :, :3].contiguous())),
        (ValueError, "timesteps must be in", dict(timesteps=torch.tensor([0, 1000]))),
        (ValueError, "timesteps must be in", dict(timesteps=torch.tensor([-1, 3]))),
        (ValueError, "timesteps has batch 3 but images has batch 2", dict(timesteps=torch.tensor([1, 2, 3]))),
        (ValueError, r"\[B\] \(one level", dict(timesteps=torch.zeros(2, 1, 1, dtype=torch.long))),
        (TypeError, "integer dtype", dict(timesteps=torch.tensor([1.0, 2.0]))),
        (TypeError, "timesteps must be an integer torch.Tensor", dict(timesteps=[1, 2])),
        (ValueError, "timesteps is on meta but images is on cpu", dict(timesteps=ts.to("meta"))),
        (ValueError, "space", dict(space="latent")),
        (ValueError, "layout", dict(layout="CHW")),
        (TypeError, "out_dtype", dict(out_dtype=torch.int8)),
        (TypeError, "out_dtype", dict(out_dtype=torch.float64)),
        (ValueError, "both be given", dict(mean=None)),
        (ValueError, "std must be positive", dict(std=(0.5, 0.0, 0.5))),
        (ValueError, "std has 2 values", dict(std=(0.5, 0.5))),
        (TypeError, "mean must be a sequence", dict(mean=0.5)),
        (TypeError, "schedule must be a NoiseSchedule", dict(schedule="sigmoid")),
        (TypeError, "generator", dict(generator=0)),
        (ValueError, "seed must be in", dict(seed=-1)),
        (ValueError, "seed must be in", dict(seed=2 ** 64)),
        (TypeError, "seed must be an int", dict(seed=1.5)),
    ]
    for exc, msg, kw in cases:
        args = dict(images=x, timesteps=ts)
        args.update(kw)
        images, timesteps = args.pop("images"), args.pop("timesteps")
        with pytest.raises(exc, match=msg):
            diffusion_noise(images, timesteps, **args)
    with pytest.raises(ValueError, match="timesteps must be in"):
        diffusion_noise_reference(x, torch.tensor([0, 1000]))
    with pytest.raises(ValueError, match="noise must be a tensor of shape"):
        diffusion_noise_reference(x, ts, noise=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="at most 16 channels"):
        diffusion_noise(_images(B=1, C=17), torch.tensor([1]), mean=[0.5] * 17, std=[0.5] * 17)
    # no normalisation: any channel count
    assert diffusion_noise(_images(B=1, C=17), torch.tensor([1]), mean=None, std=None).shape == (1, 17, 8, 12)


@needs_ext
def test_op_level_checks():
    # torch.ops callers skip the Python validation: the C++ op still refuses bad input
    sab, s1 = DEFAULT_SCHEDULE.tables("cpu")
    op = torch.ops.bpo_fast.diffusion_noise
    x = _images(B=2)
    with pytest.raises(RuntimeError, match="timesteps must be in"):
        op(x, torch.tensor([0, 1000]), sab, s1)
    with pytest.raises(RuntimeError, match="4-D"):
        op(x[0], torch.tensor([0, 1]), sab, s1)
    with pytest.raises(RuntimeError, match="one value per channel"):
        op(x, torch.tensor([0, 1]), sab, s1, mean=[0.5], std=[0.5])
    with pytest.raises(RuntimeError, match="int64"):
        op(x, torch.tensor([0, 1], dtype=torch.int32), sab, s1)


# ------------------------------------------------------------------------------- CUDA

cuda = pytest.mark.cuda


def _cuda_has_kernel():
    return HAS_EXT and torch._C._dispatch_has_kernel_for_dispatch_key("bpo_fast::diffusion_noise", "CUDA")


@cuda
@pytest.mark.parametrize("kind", ["nchw", "nhwc", "strided", "odd", "float", "half"])
@pytest.mark.parametrize("space", ["normalized", "pixel"])
def test_cuda_matches_cpu_same_seed(kind, space):
    assert _cuda_has_kernel(), "the extension was built without CUDA kernels"
    x = _images(B=3, C=3, H=16, W=24, seed=4)
    layout = "NCHW"
    if kind == "nhwc":
        x, layout = x.permute(0, 2, 3, 1).contiguous(), "NHWC"
    elif kind == "strided":
        x = _images(B=3, C=3, H=40, W=40)[:, :, 2:18, 1:25]
    elif kind == "odd":
        x = _images(B=3, C=3, H=5, W=7)
    elif kind == "float":
        x = x.float() / 255
    elif kind == "half":
        x = (x.float() / 255).half()
    ts = torch.tensor([[0, 999], [500, 1], [999, 250]])
    for seed in (0, 2 ** 63 + 5):
        cpu = diffusion_noise(x, ts, seed=seed, space=space, layout=layout)
        gpu = diffusion_noise(x.cuda(), ts.cuda(), seed=seed, space=space, layout=layout)
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=3e-5)


@cuda
def test_cuda_large_batch_matches_cpu_and_stream():
    x = torch.randint(0, 256, (4, 3, 336, 336), dtype=torch.uint8)
    ts = torch.tensor([0, 333, 666, 999])
    gpu = diffusion_noise(x.cuda(), ts.cuda(), seed=42, out_dtype=torch.float32).cpu()
    torch.testing.assert_close(gpu, diffusion_noise(x, ts, seed=42), rtol=1e-5, atol=3e-5)
    eps = _recovered_eps(gpu, x, ts.view(4, 1))
    _check_gaussian_white(eps.view(2, 2, 3, 336, 336))


@cuda
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_cuda_low_precision_outputs(out_dtype):
    x, ts = _images(B=4, H=32, W=32, device="cuda"), torch.tensor([[1, 999]] * 4, device="cuda")
    lo = diffusion_noise(x, ts, seed=8, out_dtype=out_dtype)
    hi = diffusion_noise(x, ts, seed=8)
    assert lo.dtype == out_dtype
    assert torch.equal(lo, hi.to(out_dtype))  # fp32 math, one rounding at the store
    nhwc = diffusion_noise(x.permute(0, 2, 3, 1).contiguous(), ts, seed=8, layout="NHWC", out_dtype=out_dtype)
    assert torch.equal(nhwc, lo)


@cuda
def test_cuda_default_generator_stream():
    x, ts = _images(B=2, H=16, W=16, device="cuda"), torch.tensor([999, 500], device="cuda")
    sab, s1 = DEFAULT_SCHEDULE.tables("cuda")
    op = torch.ops.bpo_fast.diffusion_noise
    diffusion_noise(x, ts)  # tables built, nothing else consumes the generator below
    torch.cuda.manual_seed(123)
    first, second = diffusion_noise(x, ts), diffusion_noise(x, ts)
    m, s = list(CLIP_MEAN), list(CLIP_STD)
    assert torch.equal(first, op(x, ts, sab, s1, m, s, seed=123, offset=0))
    assert torch.equal(second, op(x, ts, sab, s1, m, s, seed=123, offset=4))


@cuda
def test_cuda_graph_capture_and_replay():
    x, ts = _images(B=2, H=16, W=16, device="cuda"), torch.tensor([[999, 400]] * 2, device="cuda")
    sab, s1 = DEFAULT_SCHEDULE.tables("cuda")
    op = torch.ops.bpo_fast.diffusion_noise
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        diffusion_noise(x, ts, out_dtype=torch.bfloat16)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = diffusion_noise(x, ts, out_dtype=torch.bfloat16)
    m, s = list(CLIP_MEAN), list(CLIP_STD)
    torch.cuda.manual_seed(77)
    outs = []
    for _ in range(3):
        graph.replay()
        outs.append(static_out.clone())
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])  # fresh noise
    # the replays draw exactly what the same eager calls would: offsets 0, 4, 8 after the seed
    for r, o in enumerate(outs):
        want = op(x, ts, sab, s1, m, s, out_dtype=torch.bfloat16, seed=77, offset=4 * r)
        assert torch.equal(o, want)
    torch.cuda.manual_seed(77)
    eager = [diffusion_noise(x, ts, out_dtype=torch.bfloat16) for _ in range(3)]
    for o, e in zip(outs, eager):
        assert torch.equal(o, e)


@cuda
def test_cuda_torch_compile():
    x, ts = _images(B=2, H=16, W=16, device="cuda"), torch.tensor([[3, 900], [10, 20]], device="cuda")

    def f(x, ts):
        return diffusion_noise(x, ts, out_dtype=torch.bfloat16) * 2

    cf = torch.compile(f)
    torch.cuda.manual_seed(0)
    eager = f(x, ts)
    torch.cuda.manual_seed(0)
    assert torch.equal(cf(x, ts), eager)
