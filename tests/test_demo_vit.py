"""The shipped demo ViT (``vit_shapes_patch16_48``): ``embed`` loads its weights by default and
random ones only when asked (``--no-pretrained``), models without shipped weights keep their old
default, and the ``demo`` preset of fuse-train refuses a cache embedded with other weights (random
ones), naming the field."""

import json

import pytest
import timm
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from embed import EmbedConfig, embed, load_model, state_dict_hash
from embed.cli import cli as embed_cli
from embed.registry import DEMO_VIT, WEIGHTS_DIR, shipped_weights
from pipelines.cli.train import main as train_main
from pipelines.train.config import TRAIN_PRESETS
from store import CacheReader

WEIGHTS = WEIGHTS_DIR / f"{DEMO_VIT}.demo.safetensors"
DEMO_EXPECT = TRAIN_PRESETS["demo"]["expect"]["image"]


@pytest.fixture(scope="module")
def data(vqa_data):
    return vqa_data(60, 3)  # the same data as test_train.py: built once when both run


def config(**kw) -> EmbedConfig:
    return EmbedConfig(images=["<images>"], out="<cache>", model=DEMO_VIT, device="cpu", **kw)


def by_hand() -> torch.nn.Module:
    """The demo ViT with the shipped safetensors file loaded directly (neither embed nor timm's
    pretrained path)."""
    torch.manual_seed(123)  # any init: every parameter is overwritten
    model = timm.create_model(DEMO_VIT, pretrained=False).eval()
    model.load_state_dict(load_file(str(WEIGHTS)))  # float16 values into the float32 parameters
    return model


def test_the_default_loads_the_shipped_weights():
    assert shipped_weights(DEMO_VIT) == WEIGHTS and shipped_weights(f"{DEMO_VIT}.demo") == WEIGHTS
    loaded = load_model(config())
    assert loaded.weights == f"pretrained:{DEMO_VIT}.demo"
    ref = by_hand()
    x = torch.randn(4, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(loaded.forward_tokens(x), ref.forward_features(x)[:, ref.num_prefix_tokens:])
    assert loaded.weights_hash == state_dict_hash(ref)
    assert load_model(config(pretrained=True)).weights_hash == loaded.weights_hash  # --pretrained: the same


def test_no_pretrained_gives_seeded_random_weights_and_says_so(caplog):
    with caplog.at_level("WARNING", logger="embed.model"):
        loaded = load_model(config(pretrained=False, seed=3))
    assert loaded.weights == "random"
    assert f"RANDOM WEIGHTS: {DEMO_VIT} is randomly initialised (seed 3), as --no-pretrained asks" in caplog.text
    torch.manual_seed(3)
    assert loaded.weights_hash == state_dict_hash(timm.create_model(DEMO_VIT, pretrained=False))
    assert loaded.weights_hash != state_dict_hash(by_hand())


def test_a_model_without_shipped_weights_keeps_its_random_default(caplog):
    assert shipped_weights("vit_tiny_patch16_224") is None  # its weights are on the hub only
    with caplog.at_level("WARNING", logger="embed.model"):
        loaded = load_model(EmbedConfig(images=["<images>"], out="<cache>", model="vit_tiny_patch16_224",
                                        model_kwargs={"depth": 1}, img_size=32, device="cpu"))
    assert loaded.weights == "random"
    assert "Pass --pretrained or --checkpoint FILE for real ones" in caplog.text


def test_cli_default_is_shipped_and_no_pretrained_is_random(data, tmp_path):
    images = data / "shapes" / "train2014"
    args = ["--model", DEMO_VIT, "--device", "cpu", "--num-workers", "0", "--no-progress", "--json"]
    r = CliRunner().invoke(embed_cli, [str(images), "--out", str(tmp_path / "default"), *args])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["weights"] == f"pretrained:{DEMO_VIT}.demo"
    with CacheReader(tmp_path / "default") as c:
        assert c.meta.producer["weights_hash"] == state_dict_hash(by_hand())
    r = CliRunner().invoke(embed_cli, [str(images), "--out", str(tmp_path / "random"), "--no-pretrained", *args])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["weights"] == "random"
    r = CliRunner().invoke(embed_cli, [str(images), "--out", str(tmp_path / "x"), "--no-pretrained",
                                       "--checkpoint", str(WEIGHTS), *args])
    assert r.exit_code == 2
    assert r.stderr.endswith("Error: --no-pretrained and --checkpoint exclude each other: choose one source of "
                             "weights\n")


def test_the_demo_preset_expects_the_shipped_weights_hash():
    """Retrained weights must come with the hash the preset expects (scripts/demo_vit.py prints it)."""
    assert DEMO_EXPECT["producer"] == {"model": DEMO_VIT, "weights_hash": state_dict_hash(by_hand())}


def test_the_demo_preset_refuses_a_random_weights_cache_naming_the_field(data, tmp_path):
    s = embed(EmbedConfig(images=[str(data / "shapes" / "train2014")], out=str(tmp_path / "random"), model=DEMO_VIT,
                          pretrained=False, num_workers=0, progress=False))
    assert s.weights == "random" and s.embedded == 60
    with CacheReader(tmp_path / "random") as c:
        random_hash = c.meta.producer["weights_hash"]
    r = CliRunner().invoke(train_main, ["--preset", "demo", "--shards", str(data / "qa"), "--cache",
                                        f"image={tmp_path / 'random'}", "--steps", "1", "--num-workers", "0",
                                        "--out", str(tmp_path / "run")])
    assert r.exit_code == 1, r.output
    assert (f"  producer.weights_hash: cache has '{random_hash}', expected "
            f"'{DEMO_EXPECT['producer']['weights_hash']}'") in r.output
    with CacheReader(data / "cache", expect=DEMO_EXPECT) as c:  # the shipped weights' cache is taken
        assert len(c) == 60
