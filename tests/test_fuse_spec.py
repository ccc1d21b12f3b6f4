"""fuse.spec / fuse.config: the fusion and pooling specs parse, round-trip, and reject impossible
configurations at construction with messages that name the CLI flag."""

import json

import pytest

from fuse import (
    DecoderDepthError,
    FusionSpec,
    FusionSpecError,
    FusionT5Config,
    PoolSpec,
    PoolSpecError,
    coerce_pools,
    parse_pools,
)


def tiny(**overrides):
    base = dict(text_modalities=["question"], modality_dims={"image": 12}, fusion_spec="0:question 2:image")
    return FusionT5Config.from_name("tiny", **{**base, **overrides})


def test_parse_string_dict_json_forms_agree():
    spec = FusionSpec.parse("0:question 6:image")
    assert spec.as_mapping() == {0: ("question",), 6: ("image",)}
    assert FusionSpec.from_dict({0: ["question"], 6: ["image"]}) == spec
    assert FusionSpec.from_dict({"6": "image", "0": ["question"]}) == spec
    assert FusionSpec.from_json(spec.to_json()) == spec
    assert json.loads(spec.to_json()) == {"0": ["question"], "6": ["image"]}
    assert str(spec) == "0:question 6:image"
    assert FusionSpec.coerce(str(spec)) == FusionSpec.coerce(spec.to_json()) == spec


def test_several_modalities_at_one_layer_keep_their_order():
    a = FusionSpec.parse("0:title,image 7:audio")
    b = FusionSpec.parse("0:title 7:audio 0:image")
    assert a == b
    assert a.modalities() == ("title", "image", "audio")
    assert a.layer_of("audio") == 7


@pytest.mark.parametrize(
    "text, message",
    [
        ("0:image 6:image", "--fuse 0:image 6:image: modality 'image' joins twice (layers 0 and 6)"),
        ("x:image", "--fuse x:image: the layer must be an integer, got 'x'"),
        ("6", "--fuse 6: expected LAYER:MODALITY[,MODALITY...], e.g. 0:question 6:image"),
        ("-1:image", "--fuse -1:image: a layer must be >= 0"),
        ("", "--fuse '': at least one modality must join the encoder"),
    ],
)
def test_malformed_spec_names_the_problem(text, message):
    with pytest.raises(FusionSpecError) as err:
        FusionSpec.parse(text)
    assert str(err.value) == message


def test_layer_out_of_range_fails_at_config_construction():
    with pytest.raises(FusionSpecError) as err:
        FusionT5Config.from_name("cpu-bench", text_modalities=["question"], modality_dims={"image": 8},
                                 fusion_spec="0:question 13:image")
    assert str(err.value) == "--fuse 13:image: the encoder has 12 layers (0..12)"


def test_late_fusion_layer_is_num_layers():
    config = tiny(fusion_spec="0:question 4:image")
    assert config.fusion().layer_of("image") == config.num_layers == 4


def test_unknown_modality_fails():
    with pytest.raises(FusionSpecError, match=r"--fuse 2:audio: unknown modality 'audio'"):
        tiny(fusion_spec="0:question 2:audio")


def test_pool_forms():
    pools = parse_pools("image:attention:14 audio:mean:4 depth:none")
    assert pools == {
        "image": PoolSpec("attention", 14), "audio": PoolSpec("mean", 4), "depth": PoolSpec("none")
    }
    assert coerce_pools({"image": {"type": "max", "length": 2}}) == {"image": PoolSpec("max", 2)}
    assert coerce_pools('{"image": "mean:3"}') == {"image": PoolSpec("mean", 3)}
    assert coerce_pools({"image": ("attention", 1)}) == {"image": PoolSpec("attention", 1)}


@pytest.mark.parametrize(
    "text, message",
    [
        ("image:median:4", "--pool image:median:4: unknown pooling 'median' (none, mean, max, attention)"),
        ("image:mean", "--pool image:mean: pooling 'mean' needs a length >= 1"),
        ("image:none:3", "--pool image:none:3: pooling 'none' takes no length"),
        ("image:mean:x", "--pool image:mean:x: the length must be an integer"),
        ("image", "--pool image: expected MODALITY:TYPE[:LENGTH], e.g. image:attention:14"),
    ],
)
def test_malformed_pool_names_the_problem(text, message):
    with pytest.raises(PoolSpecError) as err:
        parse_pools(text)
    assert str(err.value) == message


def test_pooling_longer_than_the_input_fails_at_construction():
    with pytest.raises(PoolSpecError) as err:
        tiny(pool="image:attention:300", modality_lengths={"image": 196})
    assert str(err.value) == "--pool image:attention:300: pooling to 300 tokens but 'image' has 196 tokens"


def test_pooling_a_text_modality_fails():
    with pytest.raises(PoolSpecError, match=r"--pool question:mean:2: 'question' is not a vector modality"):
        tiny(pool="question:mean:2")


def test_modality_both_text_and_vector_fails():
    with pytest.raises(FusionSpecError, match="declared both as text and as a vector"):
        tiny(text_modalities=["question", "image"])


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(KeyError, match="unknown T5 preset 'huge'"):
        FusionT5Config.from_name("huge")


def test_decoder_depth_must_be_positive():
    with pytest.raises(DecoderDepthError, match=r"--decoder-layers 0"):
        tiny(num_decoder_layers=0)


def test_config_round_trips_through_json(tmp_path):
    config = tiny(pool="image:attention:3")
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["fusion_spec"] == {"0": ["question"], "2": ["image"]}
    assert saved["pool"] == {"image": {"type": "attention", "length": 3}}
    again = FusionT5Config.from_pretrained(tmp_path)
    assert again.fusion() == config.fusion() and again.pools() == config.pools()
    assert again.modality_dims == {"image": 12} and again.text_modalities == ["question"]
