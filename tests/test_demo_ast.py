"""The shipped demo audio encoder (``embed/weights/ast_sounds_demo``, made by ``scripts/demo_ast.py``):
it loads with transformers' own classes, gives 24 finite patch tokens per 1 s sound, and its frozen
tokens tell held-out sounds' timbre, pitch and number of beeps apart with a linear probe."""

import inspect
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import ASTFeatureExtractor, ASTModel, AutoFeatureExtractor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import demo_ast_probe as probes  # noqa: E402

WEIGHTS = probes.WEIGHTS


@pytest.fixture(scope="module")
def shipped():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return probes.load(WEIGHTS)


def test_the_folder_loads_with_transformers_and_is_small():
    files = {p.name: p.stat().st_size for p in WEIGHTS.iterdir()}
    assert set(files) == {"config.json", "model.safetensors", "preprocessor_config.json"}
    assert sum(files.values()) < 5_000_000
    model = ASTModel.from_pretrained(str(WEIGHTS))
    assert model.dtype == torch.float16  # as saved; load with dtype=torch.float32 to compute on a CPU
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_mel_bins, c.max_length) == (192, 4, 64, 100)
    extractor = AutoFeatureExtractor.from_pretrained(str(WEIGHTS))
    assert isinstance(extractor, ASTFeatureExtractor)
    assert (extractor.sampling_rate, extractor.num_mel_bins, extractor.max_length) == (16000, 64, 100)
    audioset_mean = inspect.signature(ASTFeatureExtractor).parameters["mean"].default
    assert extractor.do_normalize and extractor.mean != audioset_mean  # the statistics of its own sounds


def test_tokens_have_the_expected_shape_and_no_nan(shipped):
    model, extractor = shipped
    waves, _ = probes.draw("test_demo_ast:shape", 8)
    inputs = probes.spectrograms(extractor, waves)
    assert inputs.shape == (8, 100, 64)
    assert abs(inputs.mean().item()) < 0.3 and 0.3 < inputs.std().item() < 0.7  # normalised to its data
    with torch.inference_mode():
        hidden = model(input_values=inputs).last_hidden_state
    assert hidden.shape == (8, 2 + 4 * 6, 192)  # cls + distillation + 4 mel x 6 time patches
    tokens = probes.tokens(model, inputs)
    assert tokens.shape == (8, 24, 192) and torch.isfinite(tokens).all()
    assert torch.equal(tokens, hidden[:, 2:])
    # A silent clip (the embed stage pads short ones) is finite too.
    silent = probes.tokens(model, probes.spectrograms(extractor, np.zeros((1, 16000), np.float32)))
    assert torch.isfinite(silent).all()


def test_a_linear_probe_on_held_out_sounds_separates_timbres(shipped):
    model, extractor = shipped
    fit_w, fit_y = probes.draw("test_demo_ast:fit", 400)
    test_w, test_y = probes.draw("test_demo_ast:test", 100)
    acc = probes.probe(probes.tokens(model, probes.spectrograms(extractor, fit_w)), fit_y,
                       probes.tokens(model, probes.spectrograms(extractor, test_w)), test_y)
    assert acc["timbre"] >= 0.9 and acc["pitch"] >= 0.9 and acc["count"] >= 0.7, acc
    chance = probes.chance(fit_y, test_y)
    assert all(chance[p] < 0.6 for p in probes.PROBES), chance
