"""fuse.model: the fused T5 equals stock HF T5 where it must, is padding-invariant, trains, saves,
loads, cuts its decoder and generates text. Tiny random configs only (no hub)."""

import tempfile

import pytest
import torch
from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

from fuse import (
    DecoderDepthError,
    FusionInputError,
    FusionT5Config,
    FusionT5ForConditionalGeneration,
    train_step_flops,
)

IMG_DIM = 12
NUM_LAYERS = 4  # the "tiny" preset


def make_config(spec="0:question 2:image", pool=None, attn="sdpa", **overrides):
    return FusionT5Config.from_name(
        "tiny",
        fusion_spec=spec,
        pool=pool,
        text_modalities=["question"],
        modality_dims={"image": IMG_DIM},
        dropout_rate=0.0,
        attn_implementation=attn,
        **overrides,
    )


def make_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    return FusionT5ForConditionalGeneration(make_config(**kwargs)).eval()


def stock_twin(model, **config_overrides):
    """Stock HF T5 with the fused model's T5 weights (adapters left out)."""
    config = T5Config(**{**model.config.to_t5_config().to_dict(), **config_overrides})
    stock = T5ForConditionalGeneration(config).eval()
    result = stock.load_state_dict(model.state_dict(), strict=False)
    assert not result.missing_keys
    assert all(key.startswith("encoder.adapters.") for key in result.unexpected_keys)
    return stock


def text_batch(lengths, width=None, seed=1):
    """Right-padded token ids and mask for samples of the given real lengths."""
    g = torch.Generator().manual_seed(seed)
    width = width or max(lengths)
    ids = torch.randint(3, 384, (len(lengths), width), generator=g)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return ids * mask, mask


def image_batch(batch, n=6, seed=2):
    return torch.randn(batch, n, IMG_DIM, generator=torch.Generator().manual_seed(seed))


def labels_batch(batch, length=4, seed=3):
    return torch.randint(3, 384, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- equality with stock HF T5
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("k", range(NUM_LAYERS + 1))
def test_no_extra_tokens_equals_stock_t5_at_every_layer(k, attn):
    """A join of zero tokens at layer k rebuilds the bias and mask; nothing may change."""
    model = make_model(spec=f"0:question {k}:image" if k else "0:question,image", attn=attn)
    stock = stock_twin(model)
    ids, mask = text_batch([7, 5, 3])
    labels = labels_batch(3)
    out = model(modalities={"question": (ids, mask), "image": image_batch(3, n=0)}, labels=labels)
    ref = stock(input_ids=ids, attention_mask=mask, labels=labels)
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.encoder_last_hidden_state, ref.encoder_last_hidden_state, **tol)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-6)


def test_fusion_at_zero_equals_stock_t5_on_concatenated_embeddings():
    model = make_model(spec="0:question,image", attn="eager")
    stock = stock_twin(model)
    ids, mask = text_batch([7, 4, 2])
    image = image_batch(3, n=5)
    labels = labels_batch(3)
    out = model(modalities={"question": (ids, mask), "image": image}, labels=labels)

    # Reference: per sample, [real text embeddings, image tokens], right-padded, fed as inputs_embeds.
    image_tokens, _ = model.encoder.adapters["image"](image)  # (B, 5, d)
    text_tokens = model.shared(ids)
    embeds = torch.zeros(3, 7 + 5, model.config.d_model)
    ref_mask = torch.zeros(3, 7 + 5, dtype=torch.long)
    for b in range(3):
        n = int(mask[b].sum())
        embeds[b, : n + 5] = torch.cat([text_tokens[b, :n], image_tokens[b]])
        ref_mask[b, : n + 5] = 1
    ref = stock(inputs_embeds=embeds, attention_mask=ref_mask, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-6)
    real = ref_mask.bool()
    torch.testing.assert_close(out.encoder_last_hidden_state[real], ref.encoder_last_hidden_state[real])


# ---------------------------------------------------------------- padding invariance
@pytest.mark.parametrize("pool", [None, "image:mean:2", "image:max:3", "image:attention:2"])
@pytest.mark.parametrize("k", [0, 2, NUM_LAYERS])
def test_outputs_do_not_depend_on_batch_padding(k, pool):
    """Sample 0 alone vs in a batch that pads its text and its image tokens further."""
    model = make_model(spec=f"0:question {k}:image" if k else "0:question,image", pool=pool)
    ids, mask = text_batch([4], width=4)
    image = image_batch(1, n=5)
    labels = labels_batch(1)
    alone = model(modalities={"question": (ids, mask), "image": (image, torch.ones(1, 5))}, labels=labels)

    other_ids, _ = text_batch([9], seed=7)
    wide_ids = torch.cat([torch.nn.functional.pad(ids, (0, 5)), other_ids])  # sample 0 gets 5 pad tokens
    wide_mask = torch.cat([torch.nn.functional.pad(mask, (0, 5)), torch.ones(1, 9, dtype=torch.long)])
    padded_image = torch.nn.functional.pad(image, (0, 0, 0, 3), value=7.0)  # junk in the padding
    wide_image = torch.cat([padded_image, image_batch(1, n=8, seed=9)])
    image_mask = torch.tensor([[1] * 5 + [0] * 3, [1] * 8])
    batched = model(
        modalities={"question": (wide_ids, wide_mask), "image": (wide_image, image_mask)},
        labels=torch.cat([labels, labels_batch(1, seed=11)]),
    )
    enc_alone = model.encode({"question": (ids, mask), "image": (image, torch.ones(1, 5))})
    enc_batch = model.encode({"question": (wide_ids, wide_mask), "image": (wide_image, image_mask)})
    n_real = int(enc_alone.attention_mask.sum())
    assert enc_batch.attention_mask[0, :n_real].all() and not enc_batch.attention_mask[0, n_real:].any()
    # float32 rounding differs with the padded length (float64 agrees to 1e-13), hence 1e-4
    tol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        enc_batch.last_hidden_state[0, :n_real], enc_alone.last_hidden_state[0, :n_real], **tol
    )
    torch.testing.assert_close(batched.logits[:1], alone.logits, **tol)


# ---------------------------------------------------------------- pooling, shapes, gradients, NaNs
@pytest.mark.parametrize(
    "pool, expected",
    [(None, 6), ("image:mean:3", 3), ("image:max:4", 4), ("image:attention:2", 2), ("image:mean:1", 1)],
)
@pytest.mark.parametrize("k", [0, 2, NUM_LAYERS])
def test_pooled_lengths_and_shapes(pool, expected, k):
    model = make_model(spec=f"0:question {k}:image" if k else "0:question,image", pool=pool)
    ids, mask = text_batch([5, 3])
    enc = model.encode({"question": (ids, mask), "image": image_batch(2, n=6)})
    assert enc.last_hidden_state.shape == (2, 5 + expected, model.config.d_model)
    assert enc.attention_mask.shape == (2, 5 + expected)
    assert enc.attention_mask.sum(1).tolist() == [5 + expected, 3 + expected]
    assert train_step_flops(model.config, 2, {"question": 5, "image": 6}, 4).lengths[-1] == 5 + expected


def test_mean_and_max_pool_contiguous_groups_of_valid_tokens():
    model = make_model(pool="image:mean:2")
    adapter = model.encoder.adapters["image"]
    x = torch.arange(2 * 5 * 3, dtype=torch.float).reshape(2, 5, 3)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    pooled, pooled_mask = adapter.pool(x, mask)
    torch.testing.assert_close(pooled[0], torch.stack([x[0, :2].mean(0), x[0, 2:4].mean(0)]))
    # 5 valid tokens into 2 groups: token j goes to floor(j * 2 / 5), i.e. groups of 3 and 2
    torch.testing.assert_close(pooled[1], torch.stack([x[1, :3].mean(0), x[1, 3:].mean(0)]))
    assert pooled_mask.all()
    maxed, _ = make_model(pool="image:max:2").encoder.adapters["image"].pool(x, None)
    torch.testing.assert_close(maxed[1], torch.stack([x[1, :3].amax(0), x[1, 3:].amax(0)]))


@pytest.mark.parametrize("pool", [None, "image:mean:2", "image:max:2", "image:attention:2"])
@pytest.mark.parametrize(
    "spec", ["0:question,image", "0:question 2:image", "2:question 0:image", "0:question 4:image"]
)
def test_gradient_reaches_every_trainable_parameter_and_no_nans(spec, pool):
    model = make_model(spec=spec, pool=pool).train()
    ids, mask = text_batch([6, 2])
    image_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]])  # sample 1 has no image at all
    batch = {"question": (ids, mask), "image": (image_batch(2), image_mask)}
    out = model(modalities=batch, labels=labels_batch(2))
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_gradient_checkpointing_gives_the_same_loss():
    model = make_model(spec="0:question 2:image", pool="image:attention:2").train()
    batch = {"question": text_batch([6, 3]), "image": image_batch(2)}
    loss = model(modalities=batch, labels=labels_batch(2)).loss
    model.activation_checkpointing_enable()
    loss_ckpt = model(modalities=batch, labels=labels_batch(2)).loss
    loss_ckpt.backward()
    torch.testing.assert_close(loss, loss_ckpt)
    assert model.encoder.adapters["image"].proj.weight.grad is not None


def test_missing_or_misshapen_modalities_raise_typed_errors():
    model = make_model()
    with pytest.raises(FusionInputError, match=r"missing \['image'\]"):
        model(modalities={"question": text_batch([3])}, labels=labels_batch(1))
    with pytest.raises(FusionInputError, match=r"expected \(B, N, 12\) features, got \(1, 6, 5\)"):
        model(modalities={"question": text_batch([3]), "image": torch.randn(1, 6, 5)}, labels=labels_batch(1))
    with pytest.raises(FusionInputError, match="pooling to 8 tokens but 'image' has 6"):
        make_model(pool="image:mean:8").encode({"question": text_batch([3]), "image": image_batch(1)})


# ---------------------------------------------------------------- position embeddings of vector tokens
@pytest.mark.parametrize("pool, length", [(None, 6), ("image:attention:2", 2)])
def test_position_embeddings_tell_apart_tokens_that_late_fusion_sees_as_a_bag(pool, length):
    spec = f"0:question {NUM_LAYERS}:image"  # late: the decoder's cross-attention has no positions
    same = image_batch(1)[:, :1].expand(1, 6, IMG_DIM)  # six identical tokens
    bag = make_model(spec=spec, pool=pool, modality_lengths={"image": 6})
    placed = make_model(spec=spec, pool=pool, modality_lengths={"image": 6}, modality_positions=["image"])
    assert bag.encoder.adapters["image"].position_embedding is None
    assert placed.encoder.adapters["image"].position_embedding.shape == (length, 32)
    for model, distinct in ((bag, False), (placed, True)):  # attention pooling of equal tokens: equal
        out = model.encode({"question": text_batch([3]), "image": same}).last_hidden_state[0, 3:]  # (P, D)
        assert out.shape[0] == length
        assert (not torch.allclose(out[0], out[1])) == distinct
    # a stock T5 checkpoint loads; the new vectors are initialised and saved, and reload unchanged
    model = placed
    batch = {"question": text_batch([5, 2]), "image": image_batch(2)}
    before = model(modalities=batch, labels=labels_batch(2)).logits
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        loaded = FusionT5ForConditionalGeneration.from_pretrained(tmp).eval()
    assert loaded.config.modality_positions == ["image"]
    torch.testing.assert_close(loaded(modalities=batch, labels=labels_batch(2)).logits, before, rtol=0, atol=0)


def test_position_embeddings_need_a_vector_modality_of_known_length():
    from fuse import PoolSpecError

    with pytest.raises(PoolSpecError, match=r"--positions question: not a vector modality \(those: image\)"):
        make_config(modality_positions=["question"], modality_lengths={"image": 6})
    with pytest.raises(PoolSpecError, match="--positions image: needs the number of 'image' tokens"):
        make_config(modality_positions=["image"])
    make_config(modality_positions=["image"], pool="image:mean:2")  # pooled: the length is known
    with pytest.raises(FusionInputError, match="7 'image' tokens, but position embeddings for 6"):
        make_model(modality_positions=["image"], modality_lengths={"image": 6}).encode(
            {"question": text_batch([3]), "image": image_batch(1, n=7)})


# ---------------------------------------------------------------- save / load / pretrained / decoder depth
def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    model = make_model(spec="0:question 3:image", pool="image:attention:2")
    batch = {"question": text_batch([5, 2]), "image": image_batch(2)}
    before = model(modalities=batch, labels=labels_batch(2))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = FusionT5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.fusion() == model.config.fusion() and loaded.config.pools() == model.config.pools()
    after = loaded(modalities=batch, labels=labels_batch(2))
    torch.testing.assert_close(after.logits, before.logits, rtol=0, atol=0)
    assert after.loss == before.loss


@pytest.fixture(scope="module")
def pretrained_t5_dir(tmp_path_factory):
    """A tiny 'pretrained' stock T5, saved like a hub checkpoint."""
    torch.manual_seed(5)
    config = T5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_decoder_layers=3,
                      num_heads=4, dropout_rate=0.0, decoder_start_token_id=0)
    path = tmp_path_factory.mktemp("t5-tiny")
    T5ForConditionalGeneration(config).save_pretrained(path)
    return path


def test_from_t5_loads_pretrained_weights_and_cuts_the_decoder(pretrained_t5_dir, caplog):
    stock = T5ForConditionalGeneration.from_pretrained(pretrained_t5_dir).eval()
    with caplog.at_level("INFO", logger="fuse.model"):
        model = FusionT5ForConditionalGeneration.from_t5(
            str(pretrained_t5_dir),
            fusion_spec="0:question 3:image",
            text_modalities=["question"],
            modality_dims={"image": IMG_DIM},
            pool="image:attention:2",
            decoder_layers=1,
        ).eval()
    assert f"{pretrained_t5_dir}: keeping decoder blocks 0..0 of 3; blocks 1..2 are dropped" in caplog.text
    assert len(model.decoder.block) == model.config.num_decoder_layers == 1
    bias = model.decoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
    stock_bias = stock.decoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
    torch.testing.assert_close(bias, stock_bias)
    for name, value in stock.state_dict().items():
        if not name.startswith("decoder.block.") or name.startswith("decoder.block.0."):
            torch.testing.assert_close(model.state_dict()[name], value, msg=name)
    adapter_std = model.encoder.adapters["image"].proj.weight.std().item()
    assert 0.1 < adapter_std < 0.6  # initialised at std D^-1/2, not T5's std 1

    # Text only, the cut model is stock T5 with a 1-block decoder.
    text_only = FusionT5ForConditionalGeneration.from_t5(
        str(pretrained_t5_dir), fusion_spec="0:question", text_modalities=["question"], decoder_layers=1
    ).eval()
    one_block = stock_twin(text_only, num_decoder_layers=1)
    ids, mask = text_batch([6, 3])
    labels = labels_batch(2)
    out = text_only(modalities={"question": (ids, mask)}, labels=labels)
    ref = one_block(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)


def test_decoder_depth_out_of_range(pretrained_t5_dir):
    with pytest.raises(DecoderDepthError) as err:
        FusionT5ForConditionalGeneration.from_t5(
            str(pretrained_t5_dir), fusion_spec="0:text", decoder_layers=4
        )
    assert str(err.value) == "--decoder-layers 4: the decoder has 3 blocks (1..3)"


def test_truncate_decoder_keeps_block_zero_and_reloads(tmp_path):
    model = make_model(num_decoder_layers=2)
    bias = model.decoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.clone()
    model.truncate_decoder(1)
    assert torch.equal(model.decoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight, bias)
    model.save_pretrained(tmp_path)
    loaded = FusionT5ForConditionalGeneration.from_pretrained(tmp_path)
    assert len(loaded.decoder.block) == 1
    with pytest.raises(DecoderDepthError, match=r"--decoder-layers 2: the decoder has 1 blocks \(1..1\)"):
        model.truncate_decoder(2)


# ---------------------------------------------------------------- generation
@pytest.mark.parametrize("spec", ["0:question 2:image", "0:question 4:image"])
def test_generate_matches_greedy_decoding_and_decodes_to_text(spec):
    model = make_model(spec=spec, pool="image:mean:3", num_decoder_layers=1)
    batch = {"question": text_batch([6, 2]), "image": image_batch(2)}
    generated = model.generate(modalities=batch, max_new_tokens=5, do_sample=False)
    assert generated.shape[0] == 2 and generated.dtype == torch.long

    # Greedy decoding by hand, through forward (no cache): each step must pick the same token.
    decoder_ids = torch.zeros(2, 1, dtype=torch.long)
    for _ in range(generated.shape[1] - 1):
        logits = model(modalities=batch, decoder_input_ids=decoder_ids).logits
        decoder_ids = torch.cat([decoder_ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    finished = (generated == model.config.eos_token_id).cumsum(1) > 0
    assert torch.equal(generated[~finished], decoder_ids[~finished])

    texts = ByT5Tokenizer().batch_decode(generated, skip_special_tokens=True)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)

    beams = model.generate(modalities=batch, max_new_tokens=4, num_beams=2)
    assert beams.shape[0] == 2


def test_generate_from_precomputed_encoder_outputs():
    model = make_model()
    batch = {"question": text_batch([6, 2]), "image": image_batch(2)}
    encoded = model.encode(batch)
    from_encoded = model.generate(encoder_outputs=encoded, max_new_tokens=4)
    assert torch.equal(from_encoded, model.generate(modalities=batch, max_new_tokens=4))
