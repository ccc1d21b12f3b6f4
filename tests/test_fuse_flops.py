"""fuse.flops: per-layer sequence lengths follow the fusion spec and pooling; the FLOP count matches
a hand count and orders configurations the way the thesis measured them (later/pooled = cheaper)."""

import pytest

from fuse import FusionT5Config, encoder_lengths, train_step_flops


def bench_config(spec, pool=None, **overrides):
    return FusionT5Config.from_name(
        "cpu-bench", fusion_spec=spec, pool=pool, text_modalities=["question"], modality_dims={"image": 192},
        **overrides,
    )


LENS = {"question": 24, "image": 196}


def test_lengths_follow_the_join_layer():
    assert encoder_lengths(bench_config("0:question 6:image"), LENS) == [24] * 6 + [220] * 7
    assert encoder_lengths(bench_config("0:question 12:image"), LENS) == [24] * 12 + [220]
    assert encoder_lengths(bench_config("0:question,image", "image:mean:14"), LENS) == [38] * 13
    late_text = bench_config("3:question 0:image", "image:attention:1")
    assert encoder_lengths(late_text, LENS) == [1] * 3 + [25] * 10


def test_hand_count_for_a_one_layer_model():
    config = FusionT5Config(
        vocab_size=10, d_model=4, d_kv=2, num_heads=2, d_ff=8, num_layers=1, num_decoder_layers=1,
        text_modalities=["q"], modality_dims={"v": 3}, fusion_spec="0:q 1:v",
    )
    count = train_step_flops(config, batch_size=2, input_lens={"q": 5, "v": 6}, answer_len=3)
    L, S, T, d, inner, ff = 5, 11, 3, 4, 4, 8
    encoder = 2 * (8 * L * d * inner + 4 * L * L * inner + 4 * L * d * ff)
    self_attn = 8 * T * d * inner + 4 * T * T * inner
    cross_attn = 4 * T * d * inner + 4 * S * d * inner + 4 * T * S * inner
    decoder = 2 * (self_attn + cross_attn + 4 * T * d * ff)
    assert count.encoder == encoder and count.decoder == decoder
    assert count.adapters == 2 * 2 * 6 * 3 * d
    assert count.lm_head == 2 * 2 * T * d * 10
    assert count.train_step == pytest.approx(3 * count.forward)
    assert count.lengths == (5, 11)


def test_later_fusion_and_pooling_cost_less():
    specs = [f"0:question {k}:image" if k else "0:question,image" for k in (0, 3, 6, 9, 12)]
    by_layer = [train_step_flops(bench_config(spec), 16, LENS, 4) for spec in specs]
    totals = [c.train_step for c in by_layer]
    assert totals == sorted(totals, reverse=True)
    pooled = [train_step_flops(bench_config("0:question,image", f"image:mean:{p}"), 16, LENS, 4).train_step
              for p in (196, 14, 1)]
    assert pooled == sorted(pooled, reverse=True)
    assert pooled[0] == pytest.approx(totals[0])


def test_decoder_depth_scales_the_decoder_count():
    one = train_step_flops(bench_config("0:question,image", num_decoder_layers=1), 16, LENS, 4)
    two = train_step_flops(bench_config("0:question,image", num_decoder_layers=2), 16, LENS, 4)
    assert two.decoder == pytest.approx(2 * one.decoder) and two.encoder == one.encoder
