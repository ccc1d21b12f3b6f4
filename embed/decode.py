"""Bytes -> RGB ``PIL.Image``, refusing broken files with a reason a person can act on.

Odd but valid modes are converted the way timm's and torchvision's folder loaders convert them
(``Image.convert("RGB")``: alpha dropped, palette expanded, grayscale replicated, CMYK converted),
except 16/32-bit grayscale, which PIL would clip at 255: it is scaled to 8 bits first. EXIF
orientation is not applied (neither do those loaders).

JPEG draft mode (``Image.draft``) lets libjpeg decode at 1/2, 1/4 or 1/8 scale in the DCT domain,
which is several times cheaper; it is used only when the decoded image still covers the resize
target, so the pipeline never upsamples what it would otherwise have downsampled.
"""

import io
import warnings

import numpy as np
from PIL import Image, ImageFile

from .config import DEFAULT_MAX_PIXELS


class BadImage(Exception):
    """An image that cannot be embedded; ``str(e)`` is the reason for the failures report."""


_WIDE_GRAY = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}


def open_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft_target=None) -> Image.Image:
    """Decode ``data`` into a loaded RGB image.

    Args:
        data: the encoded file.
        max_pixels: images with more pixels are refused (decompression bombs).
        draft_target: ``(width, height)`` the decoded JPEG must at least cover, or None for a full
            decode.

    Raises:
        BadImage: empty, not an image, truncated or corrupt, or too large.
    """
    if not data:
        raise BadImage("empty file (0 bytes)")
    limit, load_truncated = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    try:
        # PIL's process-wide switches, set for this decode and restored after it. Truncated files
        # must fail rather than be padded with grey. PIL refuses images over *twice* its
        # MAX_IMAGE_PIXELS and would quote that doubled limit: its check is off while the header is
        # read, so the check below refuses with --max-pixels and the size, and set to half of
        # --max-pixels for load(), where some formats (ICO, GIF) meet sizes the header did not give.
        Image.MAX_IMAGE_PIXELS = None
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise BadImage(f"decompression bomb: {width}x{height} = {width * height} pixels "
                               f"exceeds --max-pixels {max_pixels}")
            Image.MAX_IMAGE_PIXELS = max_pixels / 2  # PIL raises above 2 * MAX_IMAGE_PIXELS
            if draft_target is not None and img.format == "JPEG":
                img.draft("RGB", draft_size(img.size, draft_target))
            img.load()  # the whole decode happens here: truncated data fails now, not later
            return to_rgb(img)
    except BadImage:
        raise
    except Image.DecompressionBombError:  # from load(): its message would quote PIL's limit, not ours
        raise BadImage(f"decompression bomb: an image inside the file exceeds --max-pixels {max_pixels} "
                       f"(the header said {width}x{height})") from None
    except Image.UnidentifiedImageError:
        raise BadImage("not an image (no decoder recognises the data)") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
        raise BadImage(f"truncated or corrupt image: {e}") from None
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = limit, load_truncated


def to_rgb(img: Image.Image) -> Image.Image:
    """An RGB copy of ``img`` (``img`` itself when it already is RGB)."""
    if img.mode == "RGB":
        return img
    if img.mode in _WIDE_GRAY:
        a = np.asarray(img)
        if img.mode == "F":
            a = np.nan_to_num(a.astype(np.float64))
            a = a * 255.0 if a.max(initial=0) <= 1.0 else a
        elif a.max(initial=0) > 255:  # 16-bit range: keep the top 8 bits' worth of contrast
            a = a.astype(np.float64) / 257.0
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL warns on P -> RGB when the palette carries transparency
    return img.convert("RGB")


def draft_size(size, target) -> tuple:
    """The smallest ``(w, h)`` to ask ``Image.draft`` for so the result still covers ``target``.

    ``target`` is ``(short_side,)`` for an aspect-preserving resize of the shorter side, or
    ``(width, height)``.
    """
    w, h = size
    if len(target) == 1:
        scale = target[0] / min(w, h)
        return (max(1, int(np.ceil(w * scale))), max(1, int(np.ceil(h * scale))))
    return tuple(int(t) for t in target)


def draft_target_of(pil_transform):
    """What a timm eval transform first resizes to: ``(short_side,)``, ``(w, h)`` or None.

    None (no draft) when the transform does not start with a plain ``Resize``.
    """
    from torchvision import transforms as T

    steps = getattr(pil_transform, "transforms", [pil_transform])
    first = steps[0] if steps else None
    if type(first) is not T.Resize or first.max_size is not None:
        return None
    size = first.size
    if isinstance(size, int):
        return (size,)
    if len(size) == 1:
        return (int(size[0]),)
    return (int(size[1]), int(size[0]))  # torchvision sizes are (h, w)

