"""JPEG decoding on the GPU (nvjpeg through ``torchvision.io.decode_jpeg``), for ``--decode-on-device``.

On a GPU the embed stage is decode-bound on CPU cores (DESIGN.md: 1,449 img/s on 16 cores against
8,770 img/s for ViT-B/16), so the workers only read the bytes and the device decodes them. Resize
and centre crop follow timm's eval transform (shorter side to ``size / crop_pct``, then crop) with
antialiased resampling on float pixels, which is close to, not bit-equal with, PIL's; the cache
records ``decode: cuda`` so it is known which path made the values.
"""

import math

import torch

from .errors import ModelError


def check_supported(data_config: dict) -> None:
    if data_config.get("crop_mode", "center") != "center":
        raise ModelError(f"--decode-on-device: crop_mode {data_config['crop_mode']!r} is not supported "
                         "(only 'center'); decode on the CPU instead")
    _, h, w = data_config["input_size"]
    if h != w:
        raise ModelError(f"--decode-on-device: input size {h}x{w} is not square; decode on the CPU instead")


def decode_resize_crop(jpegs: list, data_config: dict, device) -> tuple[torch.Tensor | None, list]:
    """Decode JPEG byte tensors on ``device``; resize and crop as timm's eval transform does.

    Returns:
        ``(pixels, failed)``: ``(B, 3, H, W)`` float pixels in 0..255 (None when all failed), and
        the indices of the JPEGs nvjpeg refused.
    """
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    _, h, w = data_config["input_size"]
    scale = math.floor(min(h, w) / data_config["crop_pct"])
    interpolation = InterpolationMode(data_config["interpolation"])
    try:
        images = decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)
        failed_idx = []
    except RuntimeError:  # one bad JPEG fails the batched call: decode one by one to find it
        images, failed_idx = [], []
        for i, data in enumerate(jpegs):
            try:
                images.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                failed_idx.append(i)
    out = []
    for img in images:
        x = F.resize(img.float(), scale, interpolation=interpolation, antialias=True)  # (3, h', w')
        out.append(F.center_crop(x, [h, w]).clamp_(0, 255))  # (3, h, w)
    return (torch.stack(out) if out else None), failed_idx
