"""Models this project registers with timm, so that ``embed --model`` and, after ``import embed.registry``,
``timm.create_model(name)`` find them like any other timm model. :func:`embed.load_model` imports this
module itself; ``import embed`` does not, so that the CLIs check their arguments before loading timm.

``vit_shapes_patch16_48``: a small ViT (4 blocks, 192 dims, 3 heads) at 48×48 pixels with 16-pixel
patches, so its 3×3 patch tokens line up with the 3×3 grid of the synthetic shapes data. Its
``.demo`` weights ship with the package (``embed/weights/vit_shapes_patch16_48.demo.safetensors``,
3.9 MB of float16) and are loaded by timm's own pretrained path (``pretrained_cfg["file"]``), so
``embed --model vit_shapes_patch16_48`` uses them with no hub and no flag (:func:`shipped_weights`;
``--no-pretrained`` asks for random weights). They were trained by ``python scripts/demo_vit.py`` to
name the colour and shape of objects in shapes scenes of varied layouts, sizes and backgrounds (seeds
disjoint from the dataset's); see that script. Shipping them lets the quickstart run with no hub: a
randomly initialised ViT keeps colour but loses shape, and a T5 trained over such features stays at
the question-only level.
"""

from pathlib import Path

from timm.models import generate_default_cfgs, get_pretrained_cfg, register_model
from timm.models.vision_transformer import _cfg, _create_vision_transformer

WEIGHTS_DIR = Path(__file__).parent / "weights"
DEMO_VIT = "vit_shapes_patch16_48"
DEMO_VIT_ARGS = dict(img_size=48, patch_size=16, embed_dim=192, depth=4, num_heads=3, class_token=True,
                     global_pool="token")

default_cfgs = generate_default_cfgs({
    f"{DEMO_VIT}.demo": _cfg(
        file=str(WEIGHTS_DIR / f"{DEMO_VIT}.demo.safetensors"), num_classes=0, input_size=(3, 48, 48),
        crop_pct=1.0, interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), license="mit"),
})


@register_model
def vit_shapes_patch16_48(pretrained=False, **kwargs):
    """ViT-Tiny width, 4 blocks, 48×48 input, 16×16 patches: 9 patch tokens of 192 dims."""
    args = dict(DEMO_VIT_ARGS, num_classes=0)
    return _create_vision_transformer(DEMO_VIT, pretrained=pretrained, **dict(args, **kwargs))


def shipped_weights(name: str) -> Path | None:
    """The local weights file of ``name``'s default pretrained config (``name`` may carry a tag), if
    that file exists: weights that ship with this project (or another installed package) rather than
    come from a hub. None for hub-only models and unknown names."""
    cfg = get_pretrained_cfg(name)
    path = Path(cfg.file) if cfg is not None and cfg.file else None
    return path if path is not None and path.is_file() else None
