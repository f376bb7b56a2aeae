"""Image decoding and CLIP preprocessing, robust to what web-scale shards contain.

Every failure is a `BadSample` with a short reason (counted and skipped by the pipelines): corrupt or
truncated files, decompression bombs, unsupported modes. Unusual but valid images are converted:
CMYK, grayscale, palette, RGBA/LA (composited on white: transparent regions of logos and icons are
white in the pages they come from), and 16/32-bit images (scaled to 8 bits, not clipped).

Preprocessing follows CLIP / mPLUG-Owl (DESIGN.md §4): evaluation resizes to size×size bicubic without
keeping the aspect ratio (as the official inference does); training takes a random resized crop
(scale 0.5–1, aspect 3/4–4/3) and a random horizontal flip.
"""

from __future__ import annotations

import contextlib
import io
import math
import threading
import warnings

import numpy as np
from PIL import Image

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)

# Images above this many pixels are refused before decoding (the check reads only the header). Raise
# it (make_shards --max-pixels, data.max_pixels) for real photos above ~90 MP (10000 x 10000 is 100 MP).
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's default warning threshold (~ 9459 x 9459)

_PIL_LIMIT_LOCK = threading.Lock()


class BadSample(Exception):
    """A sample that cannot be used; `reason` is the counter key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        hi = arr.max() if arr.size else 0
        scale = 255.0 / (65535.0 if mode.startswith("I;16") or hi > 255 else max(hi, 1.0))
        if mode == "F":
            lo, hi = float(arr.min()), float(arr.max())
            arr, scale = arr - lo, 255.0 / max(hi - lo, 1e-12)
        gray = np.clip(arr * scale, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, P, CMYK, YCbCr, 1, ...


@contextlib.contextmanager
def _pil_pixel_limit(max_pixels: int):
    """Let PIL open images up to `max_pixels`. PIL has its own bomb check on a module global
    (`Image.MAX_IMAGE_PIXELS`: a warning above it, which `decode_image` ignores since it checks
    `max_pixels` itself, and an error above twice it). Only when `max_pixels` is above that error limit
    is the global raised, for this decode, under a lock so that overlapping decodes in threads restore it
    correctly; the images of other decodes meanwhile are still held to their own `max_pixels`."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is None or max_pixels <= 2 * limit:
        yield
        return
    with _PIL_LIMIT_LOCK:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Bytes -> RGB PIL image, or BadSample (`decompression_bomb` above `max_pixels`, from the header)."""
    if not data:
        raise BadSample("empty_image")
    try:
        with warnings.catch_warnings(), _pil_pixel_limit(max_pixels):
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels decides
            image = Image.open(io.BytesIO(data))
            w, h = image.size
            if w * h > max_pixels:
                raise BadSample("decompression_bomb", f"{w}x{h} pixels, more than max_pixels={max_pixels}")
            image.load()
    except BadSample:
        raise
    except Image.DecompressionBombError as e:  # PIL's own limit; only below it when max_pixels is too
        raise BadSample("decompression_bomb", f"more than max_pixels={max_pixels} ({e})") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for corrupt data
        raise BadSample("corrupt_image", f"{type(e).__name__}: {e}") from None
    if image.size[0] < 1 or image.size[1] < 1:
        raise BadSample("corrupt_image", "zero-sized image")
    try:
        return _to_rgb(image)
    except Exception as e:
        raise BadSample("unsupported_image_mode", f"{image.mode}: {e}") from None


def image_format(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> str | None:
    """PIL's format name of encoded image bytes ("JPEG", "PNG", ...), from the header only, under the same
    pixel limit as `decode_image` (call it on bytes that decoded)."""
    with warnings.catch_warnings(), _pil_pixel_limit(max_pixels):
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as probe:
            return probe.format


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator, *, scale=(0.5, 1.0),
                            ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) as torchvision's RandomResizedCrop draws it (10 tries, then center)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def preprocess(image: Image.Image, size: int, *, train: bool, rng: np.random.Generator | None = None,
               normalize: bool = True, hflip: bool = True) -> np.ndarray:
    """RGB image -> [size, size, 3] float32 (CLIP-normalised) or uint8 (normalize=False). `hflip=False`
    keeps the random crop but never mirrors (for text that names left and right)."""
    if train:
        if rng is None:
            raise ValueError("training augmentation needs an rng")
        box = random_resized_crop_box(*image.size, rng)
        image = image.resize((size, size), Image.BICUBIC, box=box)
        if rng.random() < 0.5 and hflip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
    else:
        image = image.resize((size, size), Image.BICUBIC)
    pixels = np.asarray(image, dtype=np.uint8)
    if not normalize:
        return pixels
    return clip_normalize(pixels)


def clip_normalize(pixels: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 [..., W, 3] -> float32 (pixels / 255 - CLIP_MEAN) / CLIP_STD, into `out` if given (a
    C-contiguous float32 array of the same shape, e.g. a batch's pixel row: no temporary array).

    Computed on rows of W*3 values against mean/std tiled to that length: broadcasting the 3-vectors
    directly makes numpy's inner loop 3 elements long, which made this the costliest step of caption
    preprocessing (1.2 ms vs 0.17 ms at 224 px; same float32 operations, bit-identical results)."""
    shape, width = pixels.shape, pixels.shape[-2]
    if out is None:
        out = np.empty(shape, np.float32)
    elif out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float32 array of shape {shape}")
    flat = out.reshape(-1, width * 3)
    np.copyto(flat, pixels.reshape(-1, width * 3), casting="unsafe")
    flat /= 255.0
    flat -= np.tile(CLIP_MEAN, width)
    flat /= np.tile(CLIP_STD, width)
    return out
