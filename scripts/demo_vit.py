"""Train the demo ViT (``vit_shapes_patch16_48``) that ``embed`` loads by default, and probe it.

The quickstart must run without a model hub, and a randomly initialised ViT keeps colour but loses
shape, so this script trains the small registered ViT (:mod:`embed.registry`) on freshly drawn shapes
scenes of varied layouts (:mod:`demo_vit_data`: the quickstart's own 3×3 grid files; the same grid
rendered at 32–256 px on plain and noisy backgrounds; one shape filling most of the frame; 1–4 shapes
at random places and sizes from about 8 px to the whole image), all decoded and resized to 48 px
exactly as ``embed`` does. Seeds are strings (``demo_vit:train:<i>``), so no scene collides with
a dataset ``vqa-data shapes`` writes.

Targets (one linear head each, thrown away after training): on every patch token, the colour and the
shape of the object centred in its grid cell (or empty); on the mean of the patch tokens, the
number of objects, which cells hold one, which colours and which shapes occur. The backbone is saved
as float16 safetensors where timm's pretrained config of ``vit_shapes_patch16_48.demo`` points.
Its weights hash (as ``embed`` records it in a cache) is printed: the ``demo`` preset of
``fuse-train`` expects it (``pipelines/train/config.py``), so update it there with new weights.

Then linear probes on the frozen tokens (:mod:`demo_vit_probe`) score held-out scenes of each
layout; ``--probe-only`` scores existing weights (``--weights FILE``, default the shipped file) and
``--compare FILE`` puts a second file's figures beside them.

    python scripts/demo_vit.py [--scenes 48000] [--steps 8000] [--workers 2] [--threads 2]
    python scripts/demo_vit.py --probe-only [--weights FILE] [--compare OLD.safetensors]
"""

import argparse
import logging
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo_vit_data as data  # noqa: E402
import demo_vit_probe as probes  # noqa: E402

log = logging.getLogger("demo_vit")
SEED = "demo_vit"  # scene seeds: f"{SEED}:{set}:{i}"; a dataset's are f"shapes:{seed}:{i}"


class Heads(nn.Module):
    """Per patch token: colour and shape of the object centred in its cell. On the mean token: the
    number of objects, which cells are occupied, which colours and shapes occur."""

    def __init__(self, dim: int):
        super().__init__()
        self.cell_color = nn.Linear(dim, 1 + len(data.COLORS))
        self.cell_shape = nn.Linear(dim, 1 + len(data.SHAPES))
        self.count = nn.Linear(dim, data.MAX_COUNT + 1)
        self.occupied = nn.Linear(dim, data.CELLS)
        self.colors = nn.Linear(dim, len(data.COLORS))
        self.shapes = nn.Linear(dim, len(data.SHAPES))

    def loss(self, tokens, t: dict):  # tokens (B, 9, D)
        pooled = tokens.mean(1)  # (B, D)
        loss = F.cross_entropy(self.cell_color(tokens).flatten(0, 1), t["cell_color"].flatten())
        loss = loss + F.cross_entropy(self.cell_shape(tokens).flatten(0, 1), t["cell_shape"].flatten())
        loss = loss + F.cross_entropy(self.count(pooled), t["count"])
        for key in ("occupied", "colors", "shapes"):
            loss = loss + F.binary_cross_entropy_with_logits(getattr(self, key)(pooled), t[key].float())
        return loss

    @torch.inference_mode()
    def object_accuracy(self, tokens, t: dict) -> tuple:
        """Share of objects whose cell's colour / shape head is right."""
        objects = t["cell_color"] > 0
        color = (self.cell_color(tokens).argmax(-1) == t["cell_color"])[objects].float().mean().item()
        shape = (self.cell_shape(tokens).argmax(-1) == t["cell_shape"])[objects].float().mean().item()
        return color, shape


MIRROR = torch.tensor([2, 1, 0, 5, 4, 3, 8, 7, 6])  # grid cell -> its cell in the mirror image


def flip(x, t: dict, which):
    """Mirror the scenes ``which`` left to right, their per-cell targets with them (every shape is
    left-right symmetric, so the rest is unchanged)."""
    x, t = x.clone(), dict(t)
    x[which] = x[which].flip(-1)  # (n, 3, H, W)
    for key in ("cell_color", "cell_shape", "occupied"):
        t[key] = t[key].clone()
        t[key][which] = t[key][which][:, MIRROR]
    return x, t


def load(weights: str | None, seed: int = 0):
    """The demo ViT through ``embed``'s own loader (model, preprocessing, hash), with the weights of
    the file ``weights``, or random ones (as ``embed --no-pretrained``) when None."""
    from embed import EmbedConfig, load_model
    from embed.registry import DEMO_VIT

    source = {"checkpoint": weights} if weights else {"pretrained": False, "seed": seed}
    return load_model(EmbedConfig(images=("<scenes>",), out="<none>", model=DEMO_VIT, **source))


def _draw_chunk(job):
    prefix, start, variants, pil_transform = job
    return data.draw_set(prefix, variants, data.Pixels(pil_transform), start=start)


def draw(prefix: str, variants: list, pil_transform, workers: int) -> tuple:
    """:func:`demo_vit_data.draw_set` over ``workers`` processes (the same scenes for any number)."""
    chunk = 500
    jobs = [(prefix, i, variants[i:i + chunk], pil_transform) for i in range(0, len(variants), chunk)]
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            parts = pool.map(_draw_chunk, jobs)
    else:
        parts = [_draw_chunk(j) for j in jobs]
    return torch.cat([p[0] for p in parts]), {k: torch.cat([p[1][k] for p in parts]) for k in parts[0][1]}


def mixture(n: int, seed: int) -> list:
    """``n`` training variants drawn with the shares of :data:`demo_vit_data.VARIANTS`."""
    names = list(data.VARIANTS)
    p = np.array([data.VARIANTS[v] for v in names])
    idx = np.random.default_rng(seed).choice(len(names), size=n, p=p / p.sum())
    return [names[i] for i in idx]


def probe_table(loaded_models: dict, args) -> dict:
    """``{weights: {row: {probe: accuracy}}}`` plus ``"chance"``, on the same probe scenes for all."""
    pil_transform = next(iter(loaded_models.values())).pil_transform
    results = {name: {} for name in [*loaded_models, "chance"]}
    for layout, background in data.VARIANTS:
        row = "quickstart (96 px grid, dark)" if layout == "quickstart" else f"{layout}, {background}"
        t0 = time.time()
        x_fit, t_fit = draw(f"{SEED}:probe-fit:{layout}:{background}", [(layout, background)] * args.probe_fit,
                            pil_transform, args.workers)
        x_test, t_test = draw(f"{SEED}:probe-test:{layout}:{background}", [(layout, background)] * args.probe_test,
                              pil_transform, args.workers)
        for name, loaded in loaded_models.items():
            f_fit = probes.features(loaded.model, loaded.normalize, x_fit)
            f_test = probes.features(loaded.model, loaded.normalize, x_test)
            results[name][row] = probes.probe(f_fit, t_fit, f_test, t_test)
        results["chance"][row] = probes.chance(t_fit, t_test)
        log.info("probed %s (%.0f s): %s", row, time.time() - t0,
                 "; ".join(f"{name} {' '.join(f'{k} {probes.percent(v)}' for k, v in r[row].items())}"
                           for name, r in results.items()))
    return results


def train(args, model, pil_transform, normalize) -> float:
    """Train ``model`` with fresh :class:`Heads` on the training mixture; returns the seconds it took
    (drawing the scenes not counted)."""
    t0 = time.time()
    x, t = draw(f"{SEED}:train", mixture(args.scenes, args.seed), pil_transform, args.workers)
    xv, tv = draw(f"{SEED}:val", mixture(args.val_scenes, args.seed + 1), pil_transform, args.workers)
    log.info("drew %d + %d scenes in %.0f s (input %s uint8)", len(x), len(xv), time.time() - t0, tuple(x.shape[1:]))

    heads = Heads(model.embed_dim)
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        model.train()
        idx = torch.randint(len(x), (args.batch_size,), generator=gen)
        xb, tb = flip(x[idx], {k: v[idx] for k, v in t.items()}, torch.rand(len(idx), generator=gen) < 0.5)
        tokens = model.forward_features(normalize(xb))[:, model.num_prefix_tokens:]  # (B, 9, D)
        loss = heads.loss(tokens, tb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % args.log_every == 0 or step == args.steps:
            feats = probes.features(model, normalize, xv)
            color, shape = heads.object_accuracy(feats, tv)
            log.info("step %d loss %.3f | held-out objects: colour %.1f%%, shape %.1f%% | %.0f s",
                     step, loss.item(), 100 * color, 100 * shape, time.time() - t0)
    log.info("trained %d steps in %.0f s", args.steps, time.time() - t0)
    return time.time() - t0


def main(argv=None):
    from safetensors.torch import save_file

    from embed.registry import DEMO_VIT, default_cfgs  # registers the model with timm

    shipped = default_cfgs[DEMO_VIT].cfgs["demo"].file
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", type=int, default=48000, help="training scenes (drawn once)")
    ap.add_argument("--val-scenes", type=int, default=700)
    ap.add_argument("--steps", type=int, default=8000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=250)
    ap.add_argument("--threads", type=int, help="torch threads [default: torch's]")
    ap.add_argument("--workers", type=int, default=1, help="processes drawing scenes")
    ap.add_argument("--probe-fit", type=int, default=1500, help="scenes per layout to fit each probe on")
    ap.add_argument("--probe-test", type=int, default=1000, help="held-out scenes per layout to score it on")
    ap.add_argument("--out", default=shipped, help="where to save the trained weights")
    ap.add_argument("--probe-only", action="store_true", help="no training: probe --weights")
    ap.add_argument("--weights", default=shipped, help="with --probe-only: the weights to probe")
    ap.add_argument("--compare", help="also probe these weights and show them beside, in parentheses")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    if args.probe_only:
        weights = args.weights
    else:
        fresh = load(None, args.seed)  # timm's init, seeded; embed's preprocessing of the .demo config
        model = fresh.model.train().requires_grad_(True)
        train_s = train(args, model, fresh.pil_transform, fresh.normalize)
        state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
        save_file(state, args.out, metadata={
            "model": DEMO_VIT, "trained_by": "python scripts/demo_vit.py", "steps": str(args.steps),
            "scenes": str(args.scenes), "batch_size": str(args.batch_size), "seed": str(args.seed),
            "train_seconds": f"{train_s:.0f}"})
        log.info("saved %s", args.out)
        weights = args.out
    models = {"new": load(weights)}
    if args.compare:
        models["old"] = load(args.compare)
    for name, m in models.items():
        log.info("%s: %s, weights_hash %s", name, m.weights, m.weights_hash)
    if not args.probe_only:
        log.info("the demo preset of fuse-train must expect weights_hash %s (pipelines/train/config.py)",
                 models["new"].weights_hash)
    results = probe_table(models, args)
    print(f"linear probes, held-out scenes ({args.probe_fit} fit / {args.probe_test} test per layout), %"
          + (f": {weights} ({args.compare})" if args.compare else f": {weights}"))
    print(probes.table(results["new"], results.get("old")))
    print("\nmajority-class chance")
    print(probes.table(results["chance"]))


if __name__ == "__main__":
    main()
