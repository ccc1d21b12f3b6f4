"""Fixtures shared by the stage-2 suites: a small shapes dataset in the VQA v2 layout, embedded with
the shipped demo ViT into a real LMDB cache, and split into real WebDataset QA shards."""

import pytest

from embed import EmbedConfig, embed
from embed.registry import DEMO_VIT
from pipelines.data.shapes import write_shapes
from pipelines.data.shards import write_qa_shards


@pytest.fixture(scope="session")
def vqa_data(tmp_path_factory):
    """``vqa_data(images, seed)`` -> a folder holding ``shapes/``, ``cache/`` and ``qa/``; built once
    per (images, seed) for the whole session. Tests must not change it (copy it first)."""
    built = {}

    def build(images: int, seed: int):
        if (images, seed) not in built:
            root = tmp_path_factory.mktemp(f"vqa-{images}-{seed}")
            write_shapes(root / "shapes", images=images, seed=seed)
            summary = embed(EmbedConfig(images=[str(root / "shapes" / "train2014")], out=str(root / "cache"),
                                        model=DEMO_VIT, pretrained=True, num_workers=0, batch_size=64,
                                        progress=False))
            assert summary.embedded == images and summary.failed == 0
            write_qa_shards(root / "shapes", root / "qa", min_shards=2, seed=0)
            built[images, seed] = root
        return built[images, seed]

    return build
