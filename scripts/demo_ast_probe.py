"""Linear probes on the demo audio encoder's frozen tokens (``embed/weights/ast_sounds_demo``).

The features are what ``embed`` stores for a sound: AST's final-norm patch tokens
(``last_hidden_state[:, 2:]``: the class and distillation tokens dropped), here 4 frequency x 6 time
patches of 192 dims for 1 s at 16 kHz, in float32. Each probe is the demo ViT's logistic
regression (:func:`demo_vit_probe.fit_logistic`: full-batch L-BFGS on standardised features) on the
mean of the patch tokens, fitted on one set of sounds and scored on held-out ones, all drawn by
:mod:`pipelines.data.sounds` with seeds no dataset uses:

========= ==================================================
probe     target
========= ==================================================
count     the number of beeps (1..4)
pitch     low or high
timbre    the voice: one per shape kind (5)
========= ==================================================

Chance is the majority answer of the fit set.

    python scripts/demo_ast_probe.py [--weights DIR] [--fit 2000] [--test 1000]
"""

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from demo_vit_probe import fit_logistic, percent  # noqa: E402

from pipelines.data import sounds  # noqa: E402

WEIGHTS = Path(__file__).resolve().parents[1] / "embed" / "weights" / "ast_sounds_demo"
PROBES = ("count", "pitch", "timbre")
CLASSES = {"count": len(sounds.COUNTS), "pitch": len(sounds.PITCHES), "timbre": len(sounds.VOICES)}


def draw(seed: str, n: int) -> tuple:
    """``n`` sounds of seeds ``{seed}:{i}``: ``(waveforms (n, samples) float32, {probe: labels (n,)})``."""
    waves, labels = [], {p: [] for p in PROBES}
    for i in range(n):
        rng = random.Random(f"{seed}:{i}")
        s = sounds.random_sound(rng)
        waves.append(sounds.synthesize(s, rng))
        labels["count"].append(sounds.COUNTS.index(s.count))
        labels["pitch"].append(list(sounds.PITCHES).index(s.pitch))
        labels["timbre"].append(sounds.VOICES.index(s.voice))
    return np.stack(waves), {p: torch.tensor(v) for p, v in labels.items()}


def spectrograms(extractor, waves: np.ndarray) -> torch.Tensor:
    """Waveforms ``(N, samples)`` -> the extractor's normalised log-mel input ``(N, frames, mel)``."""
    return extractor(list(waves), sampling_rate=extractor.sampling_rate, return_tensors="pt")["input_values"]


@torch.inference_mode()
def tokens(model, inputs: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Log-mel inputs ``(N, frames, mel)`` -> patch tokens ``(N, P, D)`` float32 (cls, distillation dropped)."""
    model.eval()
    return torch.cat([model(input_values=inputs[i:i + batch].to(model.dtype)).last_hidden_state[:, 2:].float()
                      for i in range(0, len(inputs), batch)])


def probe(fit_tokens, fit_y: dict, test_tokens, test_y: dict) -> dict:
    """Accuracy (0..1) of each probe of :data:`PROBES`, on the mean of the patch tokens."""
    fit, test = fit_tokens.mean(1), test_tokens.mean(1)  # (N, D)
    return {p: (fit_logistic(fit, fit_y[p], CLASSES[p])(test) == test_y[p]).float().mean().item() for p in PROBES}


def chance(fit_y: dict, test_y: dict) -> dict:
    return {p: (test_y[p] == fit_y[p].mode().values).float().mean().item() for p in PROBES}


def table(rows: dict) -> str:
    """A Markdown table: one row per name, one column per probe, in %."""
    lines = ["| features | " + " | ".join(PROBES) + " |", "|---|" + "---:|" * len(PROBES)]
    lines += [f"| {name} | " + " | ".join(percent(acc[p]) for p in PROBES) + " |" for name, acc in rows.items()]
    return "\n".join(lines)


def load(weights):
    """The shipped encoder and its feature extractor, as ``embed`` loads them."""
    from transformers import ASTModel, AutoFeatureExtractor

    return ASTModel.from_pretrained(str(weights)).float().eval(), AutoFeatureExtractor.from_pretrained(str(weights))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", default=str(WEIGHTS))
    ap.add_argument("--fit", type=int, default=2000)
    ap.add_argument("--test", type=int, default=1000)
    args = ap.parse_args()
    t0 = time.time()
    model, extractor = load(args.weights)
    fit_w, fit_y = draw("demo_ast:probe-fit", args.fit)
    test_w, test_y = draw("demo_ast:probe-test", args.test)
    fit_t, test_t = tokens(model, spectrograms(extractor, fit_w)), tokens(model, spectrograms(extractor, test_w))
    print(f"{args.weights}: tokens {tuple(test_t.shape[1:])}, {args.fit} fit / {args.test} held-out sounds")
    print(table({"mean patch token": probe(fit_t, fit_y, test_t, test_y), "chance": chance(fit_y, test_y)}))
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
