"""Train the demo audio encoder (``embed/weights/ast_sounds_demo``) on synthetic beeps, and probe it.

As the demo ViT makes the image path provable without a model hub, this tiny Audio Spectrogram
Transformer (transformers' ``ASTModel``: 192 dims, 4 layers, 3 heads) makes the audio path
provable: it is trained from scratch on sounds of :mod:`pipelines.data.sounds` (the generator of
``vqa-data avshapes``, with string seeds ``demo_ast:train:<i>`` that no dataset uses; loudness,
exact pitch, timing and hiss vary) to tell, from the mean of its patch tokens, the number of beeps,
the pitch and the timbre (three linear heads, thrown away after training).

Input: 1 s at 16 kHz -> ``ASTFeatureExtractor`` log-mel (64 mel bins, 100 frames of 10 ms, normalised
with the training sounds' mean and std) -> 16x16 patches at stride 16 -> 4 x 6 = 24 patch tokens.
The encoder (no heads) is saved as float16 safetensors with its config and feature extractor, so
``ASTModel.from_pretrained(DIR)`` and ``AutoFeatureExtractor.from_pretrained(DIR)`` load it; the
tokens ``embed`` stores are ``last_hidden_state[:, 2:]`` (24 x 192). Then the linear probes of
:mod:`demo_ast_probe` score held-out sounds.

    python scripts/demo_ast.py [--sounds 16000] [--steps 1200] [--batch-size 64] [--threads 2] [--out DIR]

The shipped weights are ``python scripts/demo_ast.py --stop-at 600`` (the first 600 steps of the
1,200-step schedule: 26 minutes on a 2-core CPU shared with other jobs, about 5 on a quiet one).
Their probes (``python scripts/demo_ast_probe.py``, 2,000 fit / 1,000 held-out sounds, mean patch
token): count 98.4%, pitch 99.9%, timbre 99.6% (chance 28.0 / 52.5 / 20.7%).
"""

import argparse
import logging
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo_ast_probe as probes  # noqa: E402

log = logging.getLogger("demo_ast")
MEL_BINS, FRAMES, PATCH = 64, 100, 16


def build():
    """A randomly initialised tiny AST and its feature extractor (normalisation set later)."""
    from transformers import ASTConfig, ASTFeatureExtractor, ASTModel

    config = ASTConfig(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768,
                       num_mel_bins=MEL_BINS, max_length=FRAMES, patch_size=PATCH, frequency_stride=PATCH,
                       time_stride=PATCH, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    extractor = ASTFeatureExtractor(sampling_rate=probes.sounds.SAMPLE_RATE, num_mel_bins=MEL_BINS,
                                    max_length=FRAMES, do_normalize=True)
    return ASTModel(config), extractor


class Heads(nn.Module):
    """Linear heads on the mean patch token: count, pitch, timbre."""

    def __init__(self, dim: int):
        super().__init__()
        self.heads = nn.ModuleDict({p: nn.Linear(dim, n) for p, n in probes.CLASSES.items()})

    def forward(self, tokens):  # (B, P, D)
        pooled = tokens.mean(1)  # (B, D)
        return {p: head(pooled) for p, head in self.heads.items()}


def save(model, extractor, out: Path) -> None:
    """The encoder as float16 safetensors + config, and the feature extractor, in ``out``."""
    import copy

    copy.deepcopy(model).eval().half().save_pretrained(str(out))
    extractor.save_pretrained(str(out))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sounds", type=int, default=16000)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save-every", type=int, default=200, help="Save the encoder every N steps.")
    ap.add_argument("--stop-at", type=int, default=None,
                    help="Stop after step N (saved), on the schedule of --steps.")
    ap.add_argument("--out", default=str(probes.WEIGHTS))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.time()

    model, extractor = build()
    waves, labels = probes.draw("demo_ast:train", args.sounds)
    extractor.do_normalize = False
    raw = probes.spectrograms(extractor, waves[:1000])  # the log-mel statistics of the training sounds
    extractor.mean, extractor.std = float(raw.mean()), float(raw.std())
    extractor.do_normalize = True
    inputs = probes.spectrograms(extractor, waves)  # (N, FRAMES, MEL_BINS)
    del waves
    log.info("%d training sounds -> %s log-mel in %.0f s (mean %.2f, std %.2f)", len(inputs), tuple(inputs.shape),
             time.time() - t0, extractor.mean, extractor.std)

    heads = Heads(model.config.hidden_size)
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, (args.steps - s) / max(1, args.steps - warmup)))
    gen = torch.Generator().manual_seed(0)
    model.train()
    last = min(args.steps, args.stop_at or args.steps)
    for step in range(1, last + 1):
        idx = torch.randint(len(inputs), (args.batch_size,), generator=gen)
        logits = heads(model(input_values=inputs[idx]).last_hidden_state[:, 2:])  # (B, 24, D) -> heads
        losses = {p: F.cross_entropy(logits[p], labels[p][idx]) for p in probes.PROBES}
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps:
            acc = {p: (logits[p].argmax(-1) == labels[p][idx]).float().mean().item() for p in probes.PROBES}
            log.info("step %d/%d loss %.3f %s (%.0f s)", step, args.steps, loss.item(),
                     " ".join(f"{p} {100 * a:.0f}%" for p, a in acc.items()), time.time() - t0)
        if step % args.save_every == 0 or step == last:  # a stopped run leaves usable weights
            save(model, extractor, Path(args.out))
    size = sum(f.stat().st_size for f in Path(args.out).iterdir())
    log.info("saved %s (%.1f MB) after %.0f s", args.out, size / 1e6, time.time() - t0)
    out = Path(args.out)

    model, extractor = probes.load(out)
    fit_w, fit_y = probes.draw("demo_ast:probe-fit", 2000)
    test_w, test_y = probes.draw("demo_ast:probe-test", 1000)
    fit_t = probes.tokens(model, probes.spectrograms(extractor, fit_w))
    test_t = probes.tokens(model, probes.spectrograms(extractor, test_w))
    print(probes.table({"mean patch token": probes.probe(fit_t, fit_y, test_t, test_y),
                        "chance": probes.chance(fit_y, test_y)}))
    log.info("done in %.0f s", time.time() - t0)


if __name__ == "__main__":
    main()
