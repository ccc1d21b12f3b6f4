"""Models this project registers with timm, so that ``embed --model`` and, after ``import embed.registry``,
``timm.create_model(name)`` find them like any other timm model. :func:`embed.load_model` imports this
module itself; ``import embed`` does not, so that the CLIs check their arguments before loading timm.

``vit_shapes_patch16_48``: a small ViT (4 blocks, 192 dims, 3 heads) at 48×48 pixels with 16-pixel
patches, so its 3×3 patch tokens line up with the 3×3 grid of the synthetic shapes data. Its
``.demo`` weights ship with the package (``embed/weights/vit_shapes_patch16_48.demo.safetensors``,
about 7 MB) and are loaded by timm's own pretrained path (``pretrained_cfg["file"]``), so
``embed --model vit_shapes_patch16_48 --pretrained`` works with no hub. They were trained by
``python scripts/demo_vit.py`` to name the colour and shape in each grid cell of shapes scenes
(seeds disjoint from the dataset's); see that script. Shipping them lets the quickstart run with no
hub: a randomly initialised ViT keeps colour but loses shape, and a T5 trained over such features
stays at the question-only level.
"""

from pathlib import Path

from timm.models import generate_default_cfgs, register_model
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
