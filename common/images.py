"""Images: an image file decoded to uint8 RGB, as the datasets and `eval.py --image` read it."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, ImageOps


class ImageError(OSError):
    """An image file exists but cannot be decoded (truncated, corrupt, not an image)."""


def to_rgb(im: Image.Image) -> np.ndarray:
    """Any PIL image -> uint8 (H, W, 3) RGB.

    16-bit and 32-bit grey images are scaled to 8 bits (not clipped); images with transparency
    are composited on white, the way most viewers show them; CMYK, palette and grey convert.
    """
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(arr[:, :, None], 3, axis=2)
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "RGBa", "La"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def load_image(path: str, exif: bool = False) -> np.ndarray:
    """Read an image as uint8 RGB (H, W, 3), in the orientation its pixels are stored in.

    exif=True turns it the way its EXIF orientation tag says, as photo viewers show it: only for a
    user's own photo (eval.py's single-image prediction), whose mask must match what the user
    sees. Dataset images keep exif=False: COCO's polygons are drawn on the stored pixels, and an
    orientation tag that rotates by 180 degrees, mirrors, or turns a square image would otherwise
    move the image under its masks without changing its size.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path!r}")
    try:
        with Image.open(path) as im:
            im.load()  # decode now, so a truncated file fails here with its name
            if exif:
                im = ImageOps.exif_transpose(im)
            return to_rgb(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageError(f"cannot decode image {path!r}: {err}") from err


def image_hw(sample: dict) -> tuple[int, int]:
    """A raw sample's original image size (H0, W0), whether it holds its image or not."""
    if "image" in sample:
        return tuple(sample["image"].shape[:2])
    return tuple(sample["image_hw"])


def as_rgb(image) -> np.ndarray:
    """What a user may pass as an image, as uint8 RGB (H, W, 3): a file path (EXIF orientation
    applied, as a viewer shows it), a PIL image, or a uint8 array (H, W, 3) or (H, W). Any other
    dtype is refused: a float image may be in [0, 1] or [0, 255], and a wrong guess gives an
    empty mask without a word."""
    if isinstance(image, (str, os.PathLike)):
        return load_image(os.fspath(image), exif=True)
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if torch.is_tensor(image):
        image = image.cpu().numpy()
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"an image array must be uint8 (H, W, 3), not {image.dtype}: convert "
                         "it first, e.g. (x * 255).round().astype(np.uint8) for floats in [0, 1]")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"an image array must be (H, W, 3) RGB or (H, W), not {image.shape}")
    return image
