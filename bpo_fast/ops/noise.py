"""Batched forward-diffusion noising of images: BPO's "image-weakened prompting".

    x_t = sqrt(abar_t) * x_0 + sqrt(1 - abar_t) * eps,     eps ~ N(0, I)

:func:`diffusion_noise` does it for a whole batch in one pass over memory with the compiled op
``torch.ops.bpo_fast.diffusion_noise`` (CPU and CUDA kernels in ``csrc/``): uint8 (or float)
images in, normalised model-ready pixels out, one or several noise levels per image, the noise
drawn in-kernel from a counter-based Philox stream keyed by (seed, offset, output image, element)
so it never depends on the launch geometry and is the same on CPU and CUDA for the same seed.

:func:`diffusion_noise_reference` is the plain-PyTorch definition of what the op computes (it
takes the noise as an argument, or draws it with ``torch.randn``); :func:`philox_normal_reference`
reproduces the op's random stream in plain PyTorch. Without the compiled extension,
:func:`diffusion_noise` falls back to the reference with ``torch.randn`` noise (same semantics,
different random stream) and warns once.

Layout of uint8/float images: ``layout="NCHW"`` (default) reads ``[B, C, H, W]``;
``layout="NHWC"`` reads channels-last ``[B, H, W, C]`` (e.g. a stack of decoded HWC images).
It is never guessed from the shape: a ``[B, 3, 3, 3]`` batch would be ambiguous. Either may have
any strides (a channels-last-strided NCHW tensor, a crop, a slice): the kernels read them in place.
The output is always a contiguous ``[B, C, H, W]`` (or ``[B, K, C, H, W]``).
"""

import math
import numbers
import warnings

import torch

from bpo_fast import _ext

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "NoiseSchedule",
    "DEFAULT_SCHEDULE",
    "diffusion_noise",
    "diffusion_noise_reference",
    "philox_normal_reference",
]

# OpenAI CLIP's preprocessing statistics (LLaVA-1.5's CLIP ViT-L/14-336 image processor).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_SPACES = ("normalized", "pixel")
_LAYOUTS = ("NCHW", "NHWC")
_IMAGE_DTYPES = (torch.uint8, torch.float32, torch.float16, torch.bfloat16)
_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_NORM_CHANNELS = 16  # csrc/noise_common.h kMaxNormChannels


class NoiseSchedule:
    """A DDPM variance schedule of ``num_steps`` steps, computed the way diffusers computes it.

    kinds (``beta_start``/``beta_end`` defaults in brackets):
      - ``"linear"``: ``linspace(beta_start, beta_end, T)`` [1e-4, 0.02] (diffusers' DDPM default)
      - ``"scaled_linear"``: ``linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2`` [1e-4, 0.02]
      - ``"cosine"``: diffusers' ``squaredcos_cap_v2`` (Nichol & Dhariwal), betas capped at
        0.999; takes no ``beta_start``/``beta_end``
      - ``"sigmoid"``: ``sigmoid(linspace(-6, 6, T)) * (beta_end - beta_start) + beta_start``
        [1e-5, 5e-3]: the schedule of the public image-weakening (VCD/BPO) code

    Attributes (float32, CPU): ``betas``, ``alphas_cumprod`` (``cumprod(1 - betas)``),
    ``sqrt_alphas_cumprod`` and ``sqrt_one_minus_alphas_cumprod`` (what the op multiplies by).
    :meth:`tables` returns the two sqrt tables on a device, cached (no rebuild per call).
    """

    KINDS = ("linear", "scaled_linear", "cosine", "sigmoid")
    _DEFAULT_BETAS = {
        "linear": (1e-4, 0.02),
        "scaled_linear": (1e-4, 0.02),
        "sigmoid": (1e-5, 5e-3),
    }

    def __init__(self, kind="sigmoid", num_steps=1000, beta_start=None, beta_end=None):
        if not isinstance(kind, str) or kind not in self.KINDS:
            raise ValueError(f"NoiseSchedule: kind must be one of {self.KINDS}, got {kind!r}")
        if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral):
            raise TypeError(f"NoiseSchedule: num_steps must be an int, got {type(num_steps).__name__}")
        if num_steps < 1:
            raise ValueError(f"NoiseSchedule: num_steps must be >= 1, got {num_steps}")
        if kind == "cosine":
            if beta_start is not None or beta_end is not None:
                raise ValueError("NoiseSchedule: the 'cosine' schedule takes no beta_start/beta_end")
        else:
            d0, d1 = self._DEFAULT_BETAS[kind]
            beta_start = d0 if beta_start is None else beta_start
            beta_end = d1 if beta_end is None else beta_end
            for name, v in (("beta_start", beta_start), ("beta_end", beta_end)):
                if isinstance(v, bool) or not isinstance(v, numbers.Real):
                    raise TypeError(f"NoiseSchedule: {name} must be a float, got {type(v).__name__}")
                if not (0.0 < float(v) < 1.0):
                    raise ValueError(f"NoiseSchedule: {name} must be in (0, 1), got {v}")
            beta_start, beta_end = float(beta_start), float(beta_end)
            if beta_start > beta_end:
                raise ValueError(f"NoiseSchedule: beta_start ({beta_start}) must be <= beta_end ({beta_end})")
        self.kind = kind
        self.num_steps = int(num_steps)
        self.beta_start = beta_start
        self.beta_end = beta_end

        T = self.num_steps
        if kind == "linear":
            betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
        elif kind == "scaled_linear":
            betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float32) ** 2
        elif kind == "sigmoid":
            betas = torch.sigmoid(torch.linspace(-6, 6, T)) * (beta_end - beta_start) + beta_start
        else:  # diffusers' betas_for_alpha_bar(T, max_beta=0.999, alpha_transform_type="cosine")
            def alpha_bar(t):
                return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

            betas = torch.tensor(
                [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)],
                dtype=torch.float32,
            )
        self.betas = betas.to(torch.float32)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self._cache = {}

    def tables(self, device):
        """``(sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod)`` on ``device``, cached.

        Build them once before capturing a CUDA graph (the first eager call does it).
        """
        key = str(torch.device(device))
        t = self._cache.get(key)
        if t is None:
            t = (self.sqrt_alphas_cumprod.to(device), self.sqrt_one_minus_alphas_cumprod.to(device))
            self._cache[key] = t
        return t

    def __repr__(self):
        betas = "" if self.kind == "cosine" else f", beta_start={self.beta_start}, beta_end={self.beta_end}"
        return f"NoiseSchedule({self.kind!r}, num_steps={self.num_steps}{betas})"


DEFAULT_SCHEDULE = NoiseSchedule("sigmoid")


# ----------------------------------------------------------------------------- validation

def _check_args(images, timesteps, schedule, space, mean, std, out_dtype, layout):
    """Validate; return (x as a logical [B, C, H, W] view, timesteps as int64, mean, std)."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"diffusion_noise: images must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype not in _IMAGE_DTYPES:
        raise TypeError("diffusion_noise: images must be uint8 (0..255) or float32/float16/bfloat16 "
                        f"(in [0, 1]), got {images.dtype}")
    if layout not in _LAYOUTS:
        raise ValueError(f"diffusion_noise: layout must be 'NCHW' ([B, C, H, W]) or 'NHWC' "
                         f"([B, H, W, C]), got {layout!r}")
    if images.dim() != 4:
        want = "[B, C, H, W]" if layout == "NCHW" else "[B, H, W, C]"
        raise ValueError(f"diffusion_noise: images must be 4-D {want} (layout={layout!r}), "
                         f"got shape {tuple(images.shape)}")
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"diffusion_noise: schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    if space not in _SPACES:
        raise ValueError(f"diffusion_noise: space must be 'normalized' or 'pixel', got {space!r}")
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"diffusion_noise: out_dtype must be torch.float32, torch.bfloat16 or "
                        f"torch.float16, got {out_dtype}")
    x = images.permute(0, 3, 1, 2) if layout == "NHWC" else images  # a view, no copy
    B, C = x.shape[0], x.shape[1]

    if (mean is None) != (std is None):
        raise ValueError("diffusion_noise: mean and std must both be given or both be None")
    if mean is not None:
        mean, std = _channel_values("mean", mean, C, layout, images), _channel_values("std", std, C, layout, images)
        if any(not (s > 0.0) or not math.isfinite(s) for s in std):
            raise ValueError(f"diffusion_noise: std must be positive and finite, got {std}")
        if any(not math.isfinite(m) for m in mean):
            raise ValueError(f"diffusion_noise: mean must be finite, got {mean}")
        if C > _MAX_NORM_CHANNELS:
            raise ValueError(f"diffusion_noise: at most {_MAX_NORM_CHANNELS} channels can be "
                             f"normalised, images has C={C}")

    if not isinstance(timesteps, torch.Tensor):
        raise TypeError(f"diffusion_noise: timesteps must be an integer torch.Tensor [B] or [B, K], "
                        f"got {type(timesteps).__name__}")
    if timesteps.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"diffusion_noise: timesteps must have an integer dtype (int64), got {timesteps.dtype}")
    if timesteps.dim() not in (1, 2):
        raise ValueError(f"diffusion_noise: timesteps must be [B] (one level per image) or [B, K] "
                         f"(K levels per image), got shape {tuple(timesteps.shape)}")
    if timesteps.shape[0] != B:
        raise ValueError(f"diffusion_noise: timesteps has batch {timesteps.shape[0]} but images has "
                         f"batch {B}: timesteps must be [B] or [B, K] with B={B}")
    if timesteps.device != images.device:
        raise ValueError(f"diffusion_noise: timesteps is on {timesteps.device} but images is on "
                         f"{images.device}; put both on the same device")
    return x, timesteps.to(torch.int64), mean, std


def _channel_values(name, v, C, layout, images):
    if isinstance(v, torch.Tensor):
        v = v.detach().flatten().tolist()
    try:
        vals = tuple(float(e) for e in v)
    except TypeError:
        raise TypeError(f"diffusion_noise: {name} must be a sequence of floats (one per channel) "
                        f"or None, got {type(v).__name__}") from None
    if len(vals) != C:
        hint = ""
        if layout == "NCHW" and images.shape[3] == len(vals):
            hint = " (the last dim matches: for channels-last [B, H, W, C] input pass layout='NHWC')"
        raise ValueError(f"diffusion_noise: {name} has {len(vals)} values but images has C={C} "
                         f"channels (layout={layout!r}, shape {tuple(images.shape)}){hint}")
    return vals


def _check_timestep_range(ts, num_steps):
    """Raise on out-of-range timesteps. On CUDA this reads a flag back (one sync); it is skipped
    under CUDA-graph capture and torch.compile tracing, where the kernels clamp instead."""
    if ts.numel() == 0 or torch.compiler.is_compiling():
        return
    if ts.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    if bool(((ts < 0) | (ts >= num_steps)).any()):
        lo, hi = int(ts.min()), int(ts.max())
        raise ValueError(f"diffusion_noise: timesteps must be in [0, {num_steps}) for this schedule, "
                         f"got values in [{lo}, {hi}]")


def _check_rng(images, generator, seed):
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"diffusion_noise: generator must be a torch.Generator or None, "
                            f"got {type(generator).__name__}")
        if generator.device.type != images.device.type:
            raise ValueError(f"diffusion_noise: generator is on {generator.device} but images is on "
                             f"{images.device}")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"diffusion_noise: seed must be an int or None, got {type(seed).__name__}")
        if not 0 <= seed < 2 ** 64:
            raise ValueError(f"diffusion_noise: seed must be in [0, 2**64), got {seed}")


# ----------------------------------------------------------------------------- reference

def _noise_math(x, ts, sab, s1mab, mean, std, pixel, out_dtype, eps):
    """The spec, in fp32: x a logical [B, C, H, W] tensor, ts [B, K], eps [B, K, C, H, W]."""
    u = x.to(torch.float32)
    if x.dtype == torch.uint8:
        u = u / 255.0
    B, K = ts.shape
    a = sab[ts].view(B, K, 1, 1, 1)
    s = s1mab[ts].view(B, K, 1, 1, 1)
    norm = None
    if mean is not None:
        norm = (torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, 1, -1, 1, 1),
                torch.tensor(std, dtype=torch.float32, device=x.device).view(1, 1, -1, 1, 1))
    u = u.unsqueeze(1)  # [B, 1, C, H, W]: shared by the K levels
    if pixel:
        y = a * (2.0 * u - 1.0) + s * eps
        y = ((y + 1.0) * 0.5).clamp(0.0, 1.0)
        if norm is not None:
            y = (y - norm[0]) / norm[1]
    else:
        x0 = u if norm is None else (u - norm[0]) / norm[1]
        y = a * x0 + s * eps
    return y.to(out_dtype)


def diffusion_noise_reference(images, timesteps, schedule=DEFAULT_SCHEDULE, *, space="normalized",
                              mean=CLIP_MEAN, std=CLIP_STD, out_dtype=torch.float32, layout="NCHW",
                              noise=None, generator=None):
    """Plain-PyTorch definition of :func:`diffusion_noise` (same arguments and validation).

    ``space="normalized"``: ``x0 = (u - mean[c]) / std[c]`` with ``u`` the image in [0, 1]
    (uint8 / 255), ``out = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps``.
    ``space="pixel"``: ``x0 = 2u - 1``, ``x_t`` as above, then back to [0, 1] with
    ``clamp((x_t + 1) / 2, 0, 1)`` (what saving the noisy image would keep) and normalised.
    ``mean=None, std=None``: no normalisation. Arithmetic in float32, output in ``out_dtype``.

    ``noise``: the ``eps`` to use, float ``[B, C, H, W]`` (timesteps ``[B]``) or
    ``[B, K, C, H, W]``; ``None`` draws it with ``torch.randn(..., generator=generator)``.
    """
    if schedule is None:
        schedule = DEFAULT_SCHEDULE
    x, ts, mean, std = _check_args(images, timesteps, schedule, space, mean, std, out_dtype, layout)
    _check_timestep_range(ts, schedule.num_steps)
    B, C, H, W = x.shape
    K = ts.shape[1] if ts.dim() == 2 else 1
    out_shape = (B, K, C, H, W) if ts.dim() == 2 else (B, C, H, W)
    if noise is None:
        eps = torch.randn((B, K, C, H, W), generator=generator, device=x.device, dtype=torch.float32)
    else:
        if not isinstance(noise, torch.Tensor) or tuple(noise.shape) != out_shape:
            raise ValueError(f"diffusion_noise_reference: noise must be a tensor of shape {out_shape}, "
                             f"got {getattr(noise, 'shape', type(noise).__name__)}")
        eps = noise.to(device=x.device, dtype=torch.float32).reshape(B, K, C, H, W)
    sab, s1mab = schedule.tables(x.device)
    out = _noise_math(x, ts.view(B, K), sab, s1mab, mean, std, space == "pixel", out_dtype, eps)
    return out.reshape(out_shape)


# 16-bit halves of the Philox multipliers: products stay below 2^48, exact in int64.
_M = (0xD2511F53, 0xCD9E8D57)
_W = (0x9E3779B9, 0xBB67AE85)
_TAG = 0x62706E31  # csrc/philox.h kNoiseStreamTag
_MASK32 = 0xFFFFFFFF


def _mulhilo(m, x):
    lo16, hi16 = m & 0xFFFF, m >> 16
    p_lo = x * lo16  # < 2^48
    p_hi = x * hi16  # < 2^48
    mid = p_lo + ((p_hi & 0xFFFF) << 16)  # < 2^49
    lo = mid & _MASK32
    hi = ((p_hi >> 16) + (mid >> 32)) & _MASK32
    return hi, lo


def philox4x32_10_reference(ctr, key):
    """Philox4x32-10 on int64 tensors holding uint32 values: ``ctr`` a list of 4, ``key`` of 2."""
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = _mulhilo(_M[0], c0)
        hi1, lo1 = _mulhilo(_M[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _W[0]) & _MASK32
        k1 = (k1 + _W[1]) & _MASK32
    return c0, c1, c2, c3


def philox_normal_reference(seed, offset, num_images, numel, device="cpu"):
    """The op's noise in plain PyTorch: ``[num_images, numel]`` float32, row ``j`` being output
    image ``j`` (``b * K + k``) flattened in ``[C, H, W]`` order. See csrc/philox.h."""
    seed, offset = int(seed) % 2 ** 64, int(offset) % 2 ** 64
    groups = (numel + 3) // 4
    g = torch.arange(groups, dtype=torch.int64, device=device).view(1, -1).expand(num_images, -1)
    j = torch.arange(num_images, dtype=torch.int64, device=device).view(-1, 1).expand(-1, groups)
    full = lambda v: torch.full_like(g, v)  # noqa: E731
    r = philox4x32_10_reference(
        [g.clone(), j.clone(), full(offset & _MASK32), full(offset >> 32)],
        [full(seed & _MASK32), full((seed >> 32) ^ _TAG)],
    )

    def box_muller(ra, rb):
        u = ((ra >> 9).to(torch.float32) + 0.5) * 2.0 ** -23
        v = (rb >> 8).to(torch.float32) * 2.0 ** -23 - 1.0
        rad = torch.sqrt(-2.0 * torch.log(u))
        ang = math.pi * v.to(torch.float64)
        return rad * torch.cos(ang).to(torch.float32), rad * torch.sin(ang).to(torch.float32)

    z0, z1 = box_muller(r[0], r[1])
    z2, z3 = box_muller(r[2], r[3])
    z = torch.stack([z0, z1, z2, z3], dim=-1).reshape(num_images, groups * 4)
    return z[:, :numel].contiguous()


# ----------------------------------------------------------------------------- the op

def _register_fake():
    if not _ext.load_extension():
        return

    @torch.library.register_fake("bpo_fast::diffusion_noise")
    def _diffusion_noise_fake(images, timesteps, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod,
                              mean=None, std=None, pixel_space=False, out_dtype=None, seed=None,
                              offset=0, generator=None):
        torch._check(images.dim() == 4, lambda: "diffusion_noise: images must be 4-D")
        torch._check(timesteps.dim() in (1, 2), lambda: "diffusion_noise: timesteps must be [B] or [B, K]")
        torch._check(timesteps.shape[0] == images.shape[0], lambda: "diffusion_noise: batch mismatch")
        shape = [images.shape[0]]
        if timesteps.dim() == 2:
            shape.append(timesteps.shape[1])
        shape += list(images.shape[1:])
        return images.new_empty(shape, dtype=out_dtype if out_dtype is not None else torch.float32)


_register_fake()
# Looked up once at import (not per call, and not inside torch.compile tracing).
_HAS_CUDA_KERNEL = bool(_ext.load_extension()) and torch._C._dispatch_has_kernel_for_dispatch_key(
    "bpo_fast::diffusion_noise", "CUDA")
_warned_no_cuda = [False]


def _op_available(device):
    if not _ext.load_extension():
        return False
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        if _HAS_CUDA_KERNEL:
            return True
        if not _warned_no_cuda[0]:
            _warned_no_cuda[0] = True
            warnings.warn("bpo_fast: the extension bpo_fast._C was built without CUDA kernels; "
                          "diffusion_noise on CUDA tensors uses the PyTorch fallback. Rebuild on a "
                          "machine with the CUDA toolkit (or FORCE_CUDA=1).", RuntimeWarning, stacklevel=3)
        return False
    return False


def diffusion_noise(images, timesteps, schedule=DEFAULT_SCHEDULE, *, space="normalized",
                    mean=CLIP_MEAN, std=CLIP_STD, out_dtype=torch.float32, generator=None,
                    seed=None, layout="NCHW", check_timesteps=True):
    """Forward-diffuse a batch of images to per-image noise levels, in one pass.

    Args:
        images: uint8 (0..255) or float32/float16/bfloat16 (in [0, 1]; not checked, that would
            cost a pass) images, ``[B, C, H, W]`` (``layout="NCHW"``, default) or channels-last
            ``[B, H, W, C]`` (``layout="NHWC"``). Any strides; read in place.
        timesteps: integer ``[B]`` (one level per image: output ``[B, C, H, W]``) or ``[B, K]``
            (K levels per image: output ``[B, K, C, H, W]``, each image read once), values in
            ``[0, schedule.num_steps)``, on the images' device.
        schedule: a :class:`NoiseSchedule` (default: the ``"sigmoid"`` one of the public
            image-weakening code, 1000 steps).
        space: ``"normalized"``: normalise ``(u - mean) / std`` first, then noise that (what
            LLaVA-style pipelines feed the model); ``"pixel"``: noise ``2u - 1``, map back with
            ``clamp((x_t + 1) / 2, 0, 1)``, then normalise.
        mean, std: per-channel statistics (default CLIP's); ``None, None``: no normalisation.
        out_dtype: float32, bfloat16 or float16. Arithmetic is float32 whatever the dtypes.
        generator: the ``torch.Generator`` to draw the Philox key from (default: the device's
            default generator, so ``torch.manual_seed`` reproduces a run). On CUDA the generator
            is advanced the graph-safe way: the op can be captured in a CUDA graph, and each
            replay draws fresh noise.
        seed: an explicit Philox seed in ``[0, 2**64)`` instead of the generator: the same seed
            gives the same noise on CPU and CUDA (up to float rounding) and for every call.
        layout: ``"NCHW"`` or ``"NHWC"`` (see above); never guessed from the shape.
        check_timesteps: check the timestep range on the host. On CUDA this costs one device
            sync; ``False`` skips it (out-of-range values are then clamped to the table). It is
            skipped anyway under CUDA-graph capture and ``torch.compile``.

    Returns:
        A new contiguous tensor ``[B, C, H, W]`` or ``[B, K, C, H, W]`` of ``out_dtype``,
        differentiable with respect to float ``images`` (the noise is a constant: the gradient
        is ``a_t / std`` per level, masked where pixel space clamped; the mask is read from the
        output, so with a bf16/fp16 output an element that lands within rounding of a clamp
        bound counts as clamped).

    The noise of element ``i`` of output image ``j = b * K + k`` depends only on (seed,
    offset, j, i) (:func:`philox_normal_reference`), never on the batch split or the GPU.
    """
    if schedule is None:
        schedule = DEFAULT_SCHEDULE
    x, ts, mean, std = _check_args(images, timesteps, schedule, space, mean, std, out_dtype, layout)
    _check_rng(images, generator, seed)
    if check_timesteps:
        _check_timestep_range(ts, schedule.num_steps)
    sab, s1mab = schedule.tables(x.device)
    pixel = space == "pixel"

    if _op_available(x.device):
        op_seed = None if seed is None else (seed - 2 ** 64 if seed >= 2 ** 63 else seed)
        return torch.ops.bpo_fast.diffusion_noise(
            x, ts, sab, s1mab, None if mean is None else list(mean), None if std is None else list(std),
            pixel, out_dtype, seed=op_seed, offset=0, generator=generator)

    if not _ext.load_extension():
        _ext.warn_fallback("diffusion_noise")
    return _fallback(x, ts, sab, s1mab, mean, std, pixel, out_dtype, generator, seed)


def _fallback(x, ts, sab, s1mab, mean, std, pixel, out_dtype, generator, seed):
    """Pure-PyTorch path: the reference with torch.randn noise (a different random stream)."""
    B, C, H, W = x.shape
    K = ts.shape[1] if ts.dim() == 2 else 1
    out_shape = (B, K, C, H, W) if ts.dim() == 2 else (B, C, H, W)
    if seed is not None:
        generator = torch.Generator(device=x.device).manual_seed(seed)
    eps = torch.randn((B, K, C, H, W), generator=generator, device=x.device, dtype=torch.float32)
    # Out-of-range timesteps were rejected or (unchecked) are clamped, as in the kernels.
    ts = ts.view(B, K).clamp(0, sab.numel() - 1)
    return _noise_math(x, ts, sab, s1mab, mean, std, pixel, out_dtype, eps).reshape(out_shape)
