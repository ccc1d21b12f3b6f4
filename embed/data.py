"""The DataLoader side of stage 1: decode in workers, hand the forward pass whole batches.

``ImageDataset.__getitem__`` never raises for a bad image: it returns a :class:`Sample` whose
``reason`` says why it failed, and :func:`collate` separates those from the good ones, so failures
are counted and reported instead of stopping the run.
"""

import time
from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset

from .decode import BadImage, open_rgb
from .sources import ImageRef, read_bytes

JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass
class Sample:
    """One decoded (or failed) image.

    Attributes:
        id: the image id.
        path: where it came from (file, or ``shard.tar:member``).
        pixels: ``(3, H, W)`` uint8 after timm's resize and crop; None when failed or left raw.
        jpeg: the undecoded JPEG bytes (``--decode-on-device``); None otherwise.
        reason: why it failed; None when it did not.
        seconds: time spent reading and decoding it.
    """

    id: str
    path: str
    pixels: torch.Tensor | None = None
    jpeg: torch.Tensor | None = None
    reason: str | None = None
    seconds: float = 0.0


@dataclass
class Batch:
    """Decoded images of one batch, the raw JPEGs left for the device, and the failures."""

    ids: list = field(default_factory=list)
    pixels: torch.Tensor | None = None  # (B, 3, H, W) uint8
    jpeg_ids: list = field(default_factory=list)
    jpeg_paths: list = field(default_factory=list)
    jpegs: list = field(default_factory=list)  # 1-D uint8 tensors of encoded bytes
    failed: list = field(default_factory=list)  # [{"id", "path", "reason"}]
    decode_s: float = 0.0

    def __len__(self) -> int:
        return len(self.ids) + len(self.jpeg_ids) + len(self.failed)

    def pin_memory(self):  # called by the DataLoader's pinning thread when pin_memory=True
        if self.pixels is not None:
            self.pixels = self.pixels.pin_memory()
        return self


class ImageDataset(Dataset):
    """Map-style dataset over :class:`ImageRef`; returns a :class:`Sample` per index.

    Args:
        refs: the images, in order.
        pil_transform: the PIL part of timm's eval transform (ends in a uint8 tensor).
        max_pixels: larger images are refused as decompression bombs.
        draft_target: see :func:`embed.decode.open_rgb`; None decodes JPEGs at full size.
        raw_jpeg: leave JPEGs encoded (they are decoded on the GPU); other formats are decoded here.
    """

    def __init__(self, refs: list[ImageRef], pil_transform, max_pixels: int, draft_target=None,
                 raw_jpeg: bool = False):
        self.refs = refs
        self.pil_transform = pil_transform
        self.max_pixels = max_pixels
        self.draft_target = draft_target
        self.raw_jpeg = raw_jpeg

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int) -> Sample:
        ref = self.refs[index]
        t0 = time.perf_counter()
        sample = Sample(ref.id, ref.describe())
        try:
            data = read_bytes(ref)
            if self.raw_jpeg and data.startswith(JPEG_MAGIC) and _gpu_decodable(data, self.max_pixels):
                sample.jpeg = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            else:
                sample.pixels = self.pil_transform(open_rgb(data, self.max_pixels, self.draft_target))
        except FileNotFoundError:
            sample.reason = "file not found"
        except IsADirectoryError:
            sample.reason = "a directory, not an image file"
        except BadImage as e:
            sample.reason = str(e)
        except OSError as e:
            sample.reason = f"cannot read: {e.strerror or e}"
        except Exception as e:  # an image no decoder step anticipated: reported and counted, never fatal
            sample.reason = f"unexpected {type(e).__name__} while decoding: {e}"
        sample.seconds = time.perf_counter() - t0
        return sample


def _gpu_decodable(data: bytes, max_pixels: int) -> bool:
    """Whether nvjpeg can take this JPEG as is: a sane size and a gray or YCbCr/RGB colour space.

    CMYK/YCCK JPEGs and anything PIL cannot even parse the header of go the CPU path, which
    converts them or reports why they failed.
    """
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.mode in ("RGB", "L") and img.size[0] * img.size[1] <= max_pixels
    except Exception:  # the CPU path will report the reason
        return False


def collate(samples: list[Sample]) -> Batch:
    """Stack the decoded samples; keep raw JPEGs as a list; list failures with their reasons."""
    batch = Batch(decode_s=sum(s.seconds for s in samples))
    pixels = []
    for s in samples:
        if s.reason is not None:
            batch.failed.append({"id": s.id, "path": s.path, "reason": s.reason})
        elif s.jpeg is not None:
            batch.jpeg_ids.append(s.id)
            batch.jpeg_paths.append(s.path)
            batch.jpegs.append(s.jpeg)
        else:
            batch.ids.append(s.id)
            pixels.append(s.pixels)
    if pixels:
        batch.pixels = torch.stack(pixels)  # (B, 3, H, W) uint8
    return batch
