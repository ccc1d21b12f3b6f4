"""Train the demo ViT (``vit_shapes_patch16_48``) that the ``demo`` preset ships.

The quickstart must run without a model hub, and a randomly initialised ViT keeps colour but loses
shape, so a T5 over its tokens cannot beat the question-only baseline. This script trains the small registered ViT
(:mod:`embed.registry`) on freshly drawn shapes scenes (seeds disjoint from any dataset the
``vqa-data shapes`` command writes) to name, for each of the 3×3 grid cells, the colour and the
shape of the object in it (or "empty"), with one linear head per target on each of the 9 patch
tokens. The heads are thrown away; the backbone is saved as float16 safetensors where timm's
pretrained config of ``vit_shapes_patch16_48.demo`` points.

Images go through exactly what ``embed`` does to them: the dataset's JPEG encoding at 96 px, then
timm's transform resolved from the model's pretrained config (bicubic resize to 48, normalise).

    python scripts/demo_vit.py [--scenes 12000] [--steps 1500] [--out embed/weights/...]
"""

import argparse
import io
import logging
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipelines.data import shapes  # noqa: E402

log = logging.getLogger(__name__)
COLOR_CLASSES = ["empty", *shapes.COLORS]
SHAPE_CLASSES = ["empty", *shapes.SHAPES]
SEED_BASE = 7_000_000_007  # scenes are drawn from Random(f"{SEED_BASE}:{i}"): no dataset seed collides


def scene_targets(objects):
    """(colour class, shape class) per grid cell, row-major: two int arrays of 9."""
    color = np.zeros(shapes.GRID * shapes.GRID, dtype=np.int64)
    shape = np.zeros(shapes.GRID * shapes.GRID, dtype=np.int64)
    for o in objects:
        cell = o["row"] * shapes.GRID + o["col"]
        color[cell] = COLOR_CLASSES.index(o["color"])
        shape[cell] = SHAPE_CLASSES.index(o["shape"])
    return color, shape


def draw_scenes(n: int, transform, size: int = 96):
    """``n`` scenes as model inputs (n, 3, H, W) with their per-cell targets."""
    xs, colors, kinds = [], [], []
    for i in range(n):
        objects = shapes._scene(random.Random(f"{SEED_BASE}:{i}"))
        buf = io.BytesIO()
        shapes.render(objects, size).save(buf, format="JPEG", quality=95)  # as the dataset stores it
        xs.append(transform(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))
        c, s = scene_targets(objects)
        colors.append(c)
        kinds.append(s)
    return torch.stack(xs), torch.from_numpy(np.stack(colors)), torch.from_numpy(np.stack(kinds))


class CellHeads(nn.Module):
    """Colour and shape logits for each patch token (one token per grid cell)."""

    def __init__(self, dim: int):
        super().__init__()
        self.color = nn.Linear(dim, len(COLOR_CLASSES))
        self.shape = nn.Linear(dim, len(SHAPE_CLASSES))

    def forward(self, tokens):  # (B, 9, D)
        return self.color(tokens), self.shape(tokens)


def patch_tokens(model, x):
    return model.forward_features(x)[:, model.num_prefix_tokens:]  # (B, 9, D)


def accuracy(model, heads, x, color, kind, batch=512):
    model.eval()
    right_c = right_s = 0
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            lc, ls = heads(patch_tokens(model, x[i:i + batch]))
            right_c += (lc.argmax(-1) == color[i:i + batch]).all(-1).sum().item()
            right_s += (ls.argmax(-1) == kind[i:i + batch]).all(-1).sum().item()
    model.train()
    return right_c / len(x), right_s / len(x)


def main(argv=None):
    import timm
    from safetensors.torch import save_file

    from embed.registry import DEMO_VIT, default_cfgs  # registers the model with timm

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", type=int, default=12000, help="training scenes (drawn once)")
    ap.add_argument("--val-scenes", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=default_cfgs[DEMO_VIT].cfgs["demo"].file)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(args.seed)

    model = timm.create_model(DEMO_VIT, pretrained=False)
    cfg = timm.data.resolve_data_config({}, model=timm.create_model(f"{DEMO_VIT}.demo", pretrained=False))
    transform = timm.data.create_transform(**cfg)
    t0 = time.time()
    x, color, kind = draw_scenes(args.scenes + args.val_scenes, transform)
    xv, cv, kv = x[args.scenes:], color[args.scenes:], kind[args.scenes:]
    x, color, kind = x[:args.scenes], color[:args.scenes], kind[:args.scenes]
    log.info("drew %d scenes in %.0f s (input %s)", len(x) + len(xv), time.time() - t0, tuple(x.shape[1:]))

    heads = CellHeads(model.embed_dim)
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        idx = torch.randint(len(x), (args.batch_size,), generator=gen)
        lc, ls = heads(patch_tokens(model, x[idx]))
        loss = loss_fn(lc.flatten(0, 1), color[idx].flatten()) + loss_fn(ls.flatten(0, 1), kind[idx].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps:
            acc_c, acc_s = accuracy(model, heads, xv, cv, kv)
            log.info("step %d loss %.3f | held-out scenes with every cell right: colour %.1f%%, shape %.1f%% | %.0f s",
                     step, loss.item(), 100 * acc_c, 100 * acc_s, time.time() - t0)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, args.out, metadata={"model": DEMO_VIT, "trained_by": "python scripts/demo_vit.py",
                                         "steps": str(args.steps), "scenes": str(args.scenes)})
    log.info("saved %s", args.out)


if __name__ == "__main__":
    main()
