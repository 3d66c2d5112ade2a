"""Image decoding to the processor's geometry on CPU workers (uint8), normalisation on device.

The expensive, branchy part of a Hugging Face image processor (decode, RGB conversion, resize,
centre crop) runs here on CPU worker processes and stays uint8 (4x less to move than float32).
The arithmetic part (rescale + normalise) runs batched on the model's device: fused with the
diffusion noise by :func:`bpo_fast.diffusion_noise`, or, with no noise, by
:func:`normalize_uint8`, which repeats the processor's own float arithmetic so the pixels are
bit-for-bit what ``processor(images=...)`` returns.

Bit-exact for PIL-backend processors (``CLIPImageProcessorPil``, the slow ``CLIPImageProcessor``
that LLaVA-1.5 uses). A torchvision-backend ("fast") processor resizes with its own kernels, so
there the clean pixels agree only up to resize rounding.
"""

import os
import re
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["ImageGeometry", "load_image", "normalize_uint8", "ImageLoadDataset", "ImageError",
           "open_image", "to_rgb", "image_digest"]


class ImageError(ValueError):
    """An image that cannot be read or decoded (the message names it and says why)."""


_PIL_FILTERS = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


def _pil_filter(resample):
    """PIL filter id from a PIL/transformers enum, an int, or a torchvision mode ("bicubic")."""
    if resample is None:
        return 2  # transformers' default (bilinear)
    v = getattr(resample, "value", resample)
    if isinstance(v, str):
        if v.lower() not in _PIL_FILTERS:
            raise ValueError(f"processor: unsupported resample mode {resample!r}")
        return _PIL_FILTERS[v.lower()]
    return int(v)


def _get(obj, key):
    """Read ``key`` from a size dict or a transformers ``SizeDict``."""
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(key)
    return getattr(obj, key, None)


@dataclass(frozen=True)
class ImageGeometry:
    """What the processor does to an image, as plain data that pickles to worker processes."""

    shortest_edge: object = None   # resize so the short side is this (aspect kept), or
    resize_hw: object = None       # resize to exactly (height, width)
    crop_hw: object = None         # centre crop to (height, width), zero-padding if smaller
    resample: int = 3              # PIL resampling filter (3 = bicubic)
    do_resize: bool = True
    do_center_crop: bool = True
    do_convert_rgb: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    mean: tuple = (0.48145466, 0.4578275, 0.40821073)
    std: tuple = (0.26862954, 0.26130258, 0.27577711)

    @classmethod
    def from_processor(cls, processor):
        """Read the geometry from a ``LlavaProcessor`` / CLIP-style image processor."""
        ip = getattr(processor, "image_processor", processor)
        size = getattr(ip, "size", None)
        crop = getattr(ip, "crop_size", None)
        if getattr(ip, "do_pad", False):
            raise ValueError("processor: image processors that pad (do_pad=True) are not supported")
        if _get(size, "longest_edge") or _get(size, "max_height"):
            raise ValueError(f"processor: unsupported size {size!r} (expected 'shortest_edge' or "
                             "'height'/'width')")
        se = _get(size, "shortest_edge")
        hw = None
        if se is None and _get(size, "height") is not None:
            hw = (int(_get(size, "height")), int(_get(size, "width")))
        do_resize = bool(getattr(ip, "do_resize", True))
        if do_resize and se is None and hw is None:
            raise ValueError(f"processor: cannot read the resize size from {size!r}")
        do_crop = bool(getattr(ip, "do_center_crop", False))
        crop_hw = (int(_get(crop, "height")), int(_get(crop, "width"))) if do_crop else None
        resample = _pil_filter(getattr(ip, "resample", 3))
        mean = getattr(ip, "image_mean", None)
        std = getattr(ip, "image_std", None)
        do_norm = bool(getattr(ip, "do_normalize", True))
        if do_norm and (mean is None or std is None):
            raise ValueError("processor: do_normalize is set but image_mean/image_std are missing")
        as3 = lambda v: tuple(float(x) for x in (v if isinstance(v, (list, tuple)) else [v] * 3))  # noqa: E731
        return cls(
            shortest_edge=int(se) if se is not None else None, resize_hw=hw, crop_hw=crop_hw,
            resample=resample, do_resize=do_resize, do_center_crop=do_crop,
            do_convert_rgb=bool(getattr(ip, "do_convert_rgb", True)),
            do_rescale=bool(getattr(ip, "do_rescale", True)),
            rescale_factor=float(getattr(ip, "rescale_factor", 1 / 255)),
            do_normalize=do_norm, mean=as3(mean) if do_norm else (0.0,) * 3,
            std=as3(std) if do_norm else (1.0,) * 3,
        )

    def output_hw(self):
        """(H, W) of every output image, when it is fixed (crop or exact resize), else None."""
        return self.crop_hw or (self.resize_hw if self.do_resize else None)


def _resize_hw(h, w, shortest):
    # transformers' get_resize_output_image_size(default_to_square=False), torchvision's rule.
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = shortest, int(shortest * long / short)
    return (new_long, new_short) if w <= h else (new_short, new_long)


def _center_crop(arr, ch, cw):
    # transformers' image_transforms.center_crop on HWC: crop, zero-padding what is missing.
    h, w = arr.shape[:2]
    top, left = (h - ch) // 2, (w - cw) // 2
    if top >= 0 and left >= 0 and top + ch <= h and left + cw <= w:
        return arr[top:top + ch, left:left + cw]
    nh, nw = max(ch, h), max(cw, w)
    canvas = np.zeros((nh, nw) + arr.shape[2:], dtype=arr.dtype)
    tp, lp = -(-(nh - h) // 2), -(-(nw - w) // 2)
    canvas[tp:tp + h, lp:lp + w] = arr
    top, left = top + tp, left + lp
    return canvas[max(0, top):min(nh, top + ch), max(0, left):min(nw, left + cw)]


def to_rgb(img):
    """RGB by the Hugging Face processors' rule (``transformers.image_transforms.convert_to_rgb``,
    which every processor with ``do_convert_rgb`` applies): transparency (an alpha band, or the
    transparent colour of a palette / grey image) composited on white; every other mode
    (grey, palette, CMYK, 16-bit, ...) through PIL's ``convert("RGB")``, as HF does (16-bit
    values above 255 saturate there, in HF's processors the same)."""
    from PIL import Image

    if "A" in img.getbands() or img.info.get("transparency") is not None:
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, img).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def image_digest(data):
    """A 16-byte BLAKE2b digest of an image's bytes (the reference cache binds pairs to it)."""
    import hashlib

    return hashlib.blake2b(data, digest_size=16).digest()


def open_image(ref, image_root=None):
    """The one image loader of every command: ``(RGB PIL image, digest of its bytes)``.

    ``ref``: a path (relative to ``image_root`` unless absolute), raw bytes, a ``{"bytes",
    "path"}`` dict (an undecoded ``datasets.Image``) or a PIL image (its pixels are digested).
    Decoded in full here (a truncated file fails now, not inside a processor) and made RGB by
    :func:`to_rgb`. Raises :class:`ImageError` naming the image for a missing, unreadable or
    undecodable one (a decompression bomb included)."""
    import io

    from PIL import Image

    if isinstance(ref, Image.Image):
        name, img = "<image>", ref
        data = img.tobytes()
    else:
        if isinstance(ref, dict):
            data, path = ref.get("bytes"), ref.get("path")
            name = path or "<image bytes>"
            if not data:
                ref = path
        if isinstance(ref, (bytes, bytearray)):
            data, name = bytes(ref), "<image bytes>"
        elif isinstance(ref, (str, os.PathLike)) and os.fspath(ref):
            path = os.fspath(ref)
            if image_root is not None and not os.path.isabs(path):
                path = os.path.join(image_root, path)
            name = path
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                raise ImageError(f"image {path!r} not found") from None
            except OSError as exc:
                raise ImageError(f"image {path!r} is unreadable ({exc.strerror or exc})") from None
        elif not isinstance(ref, dict) or not data:
            raise ImageError(f"image: expected a path, image bytes, {{'bytes', 'path'}} or a PIL "
                             f"image, got {type(ref).__name__}")
        try:
            img = Image.open(io.BytesIO(data))
            img.load()  # decode now: a truncated file fails here
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, bomb errors...
            # PIL names the buffer (<_io.BytesIO object at 0x...>): name the image instead, so
            # that the message is the same in every run (a resumed run logs it once)
            msg = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", repr(name), str(exc))
            raise ImageError(f"image {name!r} does not decode ({type(exc).__name__}: "
                             f"{' '.join(msg.split())})") from None
    try:
        return to_rgb(img), image_digest(data)
    except Exception as exc:
        raise ImageError(f"image {name!r} does not convert to RGB ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())})") from None


def load_image(path_or_image, geometry):
    """Decode + RGB + resize + centre crop, as the processor does: an HWC uint8 numpy array.

    Raises :class:`ImageError` for a missing, unreadable or undecodable image.
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(path_or_image, Image.Image):
        img = to_rgb(path_or_image) if geometry.do_convert_rgb else path_or_image
    elif geometry.do_convert_rgb:
        img, _ = open_image(path_or_image)
    else:
        try:
            img = Image.open(path_or_image)
            img.load()  # decode now, so truncated files fail here rather than later
        except FileNotFoundError:
            raise ImageError(f"image not found: {path_or_image}") from None
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            raise ImageError(f"cannot decode image {path_or_image}: {exc}") from None
    try:
        if geometry.do_resize:
            if geometry.shortest_edge is not None:
                nh, nw = _resize_hw(img.height, img.width, geometry.shortest_edge)
            else:
                nh, nw = geometry.resize_hw
            # transformers always goes through PIL's resize, even at the same size: do too.
            img = img.resize((nw, nh), resample=geometry.resample)
        arr = np.array(img)  # writable copy (torch.from_numpy warns on read-only arrays)
    except (OSError, ValueError) as exc:
        raise ImageError(f"cannot decode image {path_or_image}: {exc}") from None
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.dtype != np.uint8 or arr.shape[2] != 3:
        raise ImageError(f"image {path_or_image}: expected 8-bit RGB after conversion, got "
                         f"{arr.dtype} with {arr.shape[2]} channels")
    if geometry.do_center_crop:
        arr = _center_crop(arr, *geometry.crop_hw)
    return np.ascontiguousarray(arr)


def normalize_uint8(images, geometry, *, out_dtype=torch.float32):
    """uint8 ``[B, C, H, W]`` -> the processor's pixel values, same float arithmetic.

    transformers rescales in float64 then casts to float32 and normalises in float32 as
    ``(x - mean) / std``; we do exactly that, on the tensor's device, so the no-noise path is
    bit-identical to ``processor(images=...).pixel_values`` in float32.
    """
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        raise TypeError("images: expected a uint8 tensor [B, C, H, W]")
    # float64 like numpy (exact x * (1/255) before the cast); MPS has no float64.
    x = images.to(torch.float32 if images.device.type == "mps" else torch.float64)
    if geometry.do_rescale:
        x = x * geometry.rescale_factor
    x = x.to(torch.float32)
    if geometry.do_normalize:
        mean = torch.tensor(geometry.mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(geometry.std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        x = (x - mean) / std
    return x.to(out_dtype)


class ImageLoadDataset(torch.utils.data.Dataset):
    """``(key, path)`` items -> ``(key, HWC uint8 array or None, error or None)`` in workers.

    Errors are returned, not raised, so one bad image never stops a DataLoader.
    """

    def __init__(self, items, image_root, geometry):
        self.items = list(items)
        self.image_root = image_root
        self.geometry = geometry

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        key, rel = self.items[i]
        path = rel if (self.image_root is None or os.path.isabs(rel)) else os.path.join(self.image_root, rel)
        try:
            return key, load_image(path, self.geometry), None
        except ImageError as exc:
            return key, None, str(exc)
        except Exception as exc:  # a decoder bug must not kill a long run either
            return key, None, f"cannot load image {path}: {type(exc).__name__}: {exc}"


def collate_images(batch):
    """Keep items as a list; stack the good arrays into one uint8 ``[n, H, W, C]`` tensor."""
    keys = [b[0] for b in batch]
    good = [i for i, b in enumerate(batch) if b[1] is not None]
    shapes = {batch[i][1].shape for i in good}
    stacked = None
    if good and len(shapes) == 1:
        stacked = torch.from_numpy(np.stack([batch[i][1] for i in good]))
    return {"keys": keys, "good": good, "errors": [b[2] for b in batch], "pixels": stacked,
            "arrays": None if stacked is not None else [batch[i][1] for i in good]}
