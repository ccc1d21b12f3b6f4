"""Initialisation of every model the project builds from a config, against an independent reference.

The fused T5 must start where stock HF ``T5ForConditionalGeneration`` of the same config starts:
transformers 5 skips T5's per-layer init for classes it takes for "custom code" (see
``fuse.encoder.FusionInitMixin``), which once left the fused encoder at std 1 everywhere (q 0.999
where stock has 0.016; hidden values of ~1,100 after block 0 against ~5). The adapters and the demo
ViT are checked against the inits they document and against timm's own ViT.
"""

import math
import re

import pytest
import torch
from transformers import T5ForConditionalGeneration

from fuse import FusionT5Config, FusionT5ForConditionalGeneration
from fuse.pooling import AttentionPool

# A parameter's family: its stack and the last two name parts with block numbers dropped.
_BLOCK = re.compile(r"\.block\.\d+\.layer\.\d+")


def family(name: str) -> str:
    """``encoder.block.3.layer.0.SelfAttention.q.weight`` -> ``encoder SelfAttention.q.weight``."""
    name = _BLOCK.sub("", name)
    stack, _, rest = name.partition(".")
    return f"{stack} {rest}" if stack in ("encoder", "decoder") else name


def family_values(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    groups: dict[str, list[torch.Tensor]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if ".adapters." not in name:
            groups.setdefault(family(name), []).append(p.detach().flatten().float())
    return {k: torch.cat(v) for k, v in groups.items()}


def build_pair(seed=0, spec="0:question 2:image", **overrides):
    config = FusionT5Config.from_name(
        "demo", fusion_spec=spec, text_modalities=["question"],
        modality_dims={"image": 192}, pool="image:attention:4", **overrides,
    )
    torch.manual_seed(seed)
    fused = FusionT5ForConditionalGeneration(config)
    torch.manual_seed(seed)
    stock = T5ForConditionalGeneration(config.to_t5_config())
    return fused, stock


def test_every_t5_parameter_family_starts_as_stock_t5():
    fused, stock = build_pair()
    ours, ref = family_values(fused), family_values(stock)
    assert set(ours) == set(ref)
    expected = {"encoder SelfAttention.q.weight", "encoder SelfAttention.o.weight",
                "encoder SelfAttention.relative_attention_bias.weight", "encoder DenseReluDense.wi.weight",
                "encoder DenseReluDense.wo.weight", "encoder layer_norm.weight", "encoder final_layer_norm.weight",
                "decoder EncDecAttention.k.weight", "shared.weight"}
    assert expected <= set(ref)
    # transformers 5 always ties T5's LM head to the shared embedding (T5Config.__post_init__).
    assert fused.lm_head.weight is fused.shared.weight and stock.lm_head.weight is stock.shared.weight
    for name, value in ref.items():
        mine = ours[name]
        assert mine.numel() == value.numel(), name
        if value.std() == 0:  # the RMS norms' weights: all ones
            torch.testing.assert_close(mine, value, msg=name)
            continue
        # The std of n normal samples is off by about 1/sqrt(2n): allow five times that.
        slack = 5 / math.sqrt(2 * value.numel()) + 0.01
        assert abs(mine.std() / value.std() - 1) < slack, (name, mine.std().item(), value.std().item())
        assert abs(mine.mean()) < 5 * value.std() / math.sqrt(value.numel()), (name, mine.mean().item())


def test_encoder_activations_stay_at_stock_t5_scale():
    fused, stock = build_pair(spec="0:question")
    fused.eval(), stock.eval()
    ids = torch.randint(3, 384, (4, 12), generator=torch.Generator().manual_seed(1))

    def block_peaks(model, forward):
        peaks = []
        hooks = [b.register_forward_hook(lambda m, i, o: peaks.append(o[0].abs().max().item()))
                 for b in model.encoder.block]
        with torch.no_grad():
            forward()
        for h in hooks:
            h.remove()
        return peaks

    ours = block_peaks(fused, lambda: fused.encoder({"question": ids}))
    ref = block_peaks(stock, lambda: stock.encoder(input_ids=ids))
    assert len(ours) == len(ref) == 4
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert b / 3 < a < 3 * b, f"encoder block {i}: largest |hidden| {a:.1f}, stock T5 {b:.1f}"


def test_adapter_and_attention_pool_start_as_documented():
    fused, _ = build_pair(modality_lengths={"image": 9}, modality_positions=["image"])
    adapter = fused.encoder.adapters["image"]
    d_model = fused.config.d_model
    assert abs(adapter.proj.weight.std().item() * 192**0.5 - 1) < 0.05  # std D^-1/2
    assert adapter.proj.bias.abs().max() == 0
    assert torch.all(adapter.norm.weight == 1)
    assert abs(adapter.modality_embedding.std().item() / 0.02 - 1) < 0.3
    assert abs(adapter.position_embedding.std().item() - 1) < 0.2
    pool = adapter.pool
    assert isinstance(pool, AttentionPool)
    assert abs(pool.latent.std().item() * d_model**0.5 - 1) < 0.3  # timm AttentionPoolLatent: dim^-1/2
    for lin in (pool.q, pool.kv, pool.proj, pool.mlp[0], pool.mlp[2]):
        assert abs(lin.weight.std().item() / 0.02 - 1) < 0.15  # timm's ViT init: trunc-normal 0.02
        assert lin.bias.abs().max() == 0


def test_demo_vit_starts_as_timm_vit_of_the_same_width():
    """The demo ViT (registered by this project) gets timm's own init: compared with timm's
    ``vit_tiny_patch16_224`` (same width and heads), family by family."""
    timm = pytest.importorskip("timm")
    from embed.registry import DEMO_VIT  # registers the demo ViT with timm

    torch.manual_seed(0)
    demo = timm.create_model(DEMO_VIT, pretrained=False, num_classes=0)
    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)

    def families(model):
        groups = {}
        for name, p in model.named_parameters():
            groups.setdefault(re.sub(r"blocks\.\d+\.", "", name), []).append(p.detach().flatten())
        return {k: torch.cat(v) for k, v in groups.items()}

    ours, theirs = families(demo), families(ref)
    assert set(ours) == set(theirs)
    for name, value in theirs.items():
        if value.std() == 0:  # norms' weights and biases, zero-initialised tokens
            assert torch.all(ours[name] == value[0]), name
        elif name != "patch_embed.proj.weight":  # lecun-normal over fan-in: differs with the patch size
            assert abs(ours[name].std() / value.std() - 1) < 0.15, name
