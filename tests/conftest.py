"""Fixtures shared by the stage-2 suites: a small shapes dataset in the VQA v2 layout, embedded with
the shipped demo ViT into a real LMDB cache, and split into real WebDataset QA shards; and one laid
out as VQA v2 comes (train and val splits, the images apart)."""

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


@pytest.fixture(scope="session")
def vqa_v2(tmp_path_factory):
    """VQA v2 as it comes, small: ``vqa/`` holds the questions and annotations of a train and a val
    split of the shapes data (val: another seed, image ids from 100001), ``coco/`` their images
    (``train2014/``, ``val2014/``), ``cache/`` all of them embedded with the shipped demo ViT. Tests
    must not change it."""
    root = tmp_path_factory.mktemp("vqa-v2")
    write_shapes(root / "vqa", images=30, seed=0)
    write_shapes(root / "vqa", images=10, seed=1, split="val", first_id=100001)
    (root / "coco").mkdir()
    for folder in ("train2014", "val2014"):
        (root / "vqa" / folder).rename(root / "coco" / folder)
    summary = embed(EmbedConfig(images=[str(root / "coco" / "train2014"), str(root / "coco" / "val2014")],
                                out=str(root / "cache"), model=DEMO_VIT, pretrained=True, num_workers=0,
                                batch_size=64, progress=False))
    assert summary.embedded == 40 and summary.failed == 0
    return root
