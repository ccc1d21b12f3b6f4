"""Stage 1 throughput: end to end (JPEG files -> cache) against the model alone, in one run.

Writes photo-like 640x480 JPEGs, then measures, on the same model, batch size and thread count:

- model only: normalisation + ``forward_features`` on in-memory uint8 batches (inference mode),
  before and after each end-to-end run;
- end to end: :func:`embed.embed` from the files to a fresh cache (decode in DataLoader workers,
  batched normalisation, forward pass, background LMDB writer), timed over its embedding loop
  (worker start-up included; model loading and source scanning not) and over the whole call;

and prints their ratio. The target on the 2-core dev machine is a ratio of at least 0.9.

    python bench/embed_bench.py [--n 512] [--model vit_tiny_patch16_224] [--batch-size 32]
        [--num-workers N] [--threads N] [--no-draft] [--device cpu|cuda] [--rounds 2] [--dir /tmp]
"""

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from embed import EmbedConfig, embed, load_model


def photo_like(rng, w=640, h=480) -> Image.Image:
    """Smooth gradients, blurred shapes and mild sensor noise: decodes like a photo, unlike pure noise."""
    yy, xx = np.mgrid[0:h, 0:w] / w
    base = np.stack([np.sin(xx * rng.uniform(1, 5) + yy * rng.uniform(1, 5) + rng.uniform(0, 6))
                     for _ in range(3)], -1)
    img = Image.fromarray(((base + 1) * 127.5).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(25):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = [x0, y0, x0 + int(rng.integers(10, 220)), y0 + int(rng.integers(10, 220))]
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    a = np.asarray(img.filter(ImageFilter.GaussianBlur(1.5)), dtype=np.int16) + rng.integers(-6, 7, (h, w, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def write_jpegs(folder, n, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    protos = [photo_like(rng) for _ in range(min(n, 32))]  # a few scenes, shifted: keeps generation quick
    for i in range(n):
        img = protos[i % len(protos)]
        if i >= len(protos):
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if (i // len(protos)) % 2 else img
            img = Image.fromarray(np.roll(np.asarray(img), int(rng.integers(0, 640)), axis=1))
        img.save(folder / f"COCO_train2014_{i:012d}.jpg", quality=85)


def model_only(loaded, batch_size, n, device) -> float:
    """Images/s of normalise + forward_tokens on in-memory uint8 batches, the same ops as embed's loop."""
    size = loaded.data_config["input_size"]
    x = torch.randint(0, 256, (batch_size, *size), dtype=torch.uint8, device=device)
    with torch.inference_mode():
        loaded.forward_tokens(loaded.normalize(x))  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        done, t = 0, time.perf_counter()
        while done < n:
            y = loaded.forward_tokens(loaded.normalize(x)).to(torch.float16).cpu()
            done += batch_size
        del y
    return done / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=512, help="JPEGs to embed")
    ap.add_argument("--model", default="vit_tiny_patch16_224")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--num-workers", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-draft", action="store_true")
    ap.add_argument("--decode-on-device", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=2, help="end-to-end runs, each between two model-only runs")
    ap.add_argument("--dir", default=None, help="where to write the JPEGs and caches (default: a temp dir)")
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="embed_bench_", dir=args.dir))
    try:
        t = time.perf_counter()
        write_jpegs(root / "imgs", args.n)
        mb = sum(p.stat().st_size for p in (root / "imgs").iterdir()) / 1e6
        print(f"wrote {args.n} JPEGs 640x480 ({mb / args.n * 1e3:.0f} kB each) in {time.perf_counter() - t:.1f} s")

        cfg = EmbedConfig(images=[root / "imgs"], out=root / "cache", model=args.model, batch_size=args.batch_size,
                          num_workers=args.num_workers, threads=args.threads, draft=not args.no_draft,
                          decode_on_device=args.decode_on_device, device=args.device, progress=False)
        if args.threads:
            torch.set_num_threads(args.threads)
        device = torch.device(args.device)
        loaded = load_model(cfg, device)
        cpus = len(os.sched_getaffinity(0))
        print(f"model {args.model}: input {loaded.data_config['input_size']}, crop_pct "
              f"{loaded.data_config['crop_pct']}, tokens {loaded.token_shape}; batch {args.batch_size}; "
              f"device {device}; {cpus} CPUs; torch threads {torch.get_num_threads()}")

        model_rates, loop_rates, call_rates = [model_only(loaded, args.batch_size, args.n, device)], [], []
        print(f"model only:           {model_rates[-1]:8.1f} img/s")
        for r in range(args.rounds):  # interleaved, so a busy neighbour slows both sides alike
            cfg.out = str(root / f"cache{r}")
            s = embed(cfg)
            loop_rates.append(s.embedded / s.embed_s)
            call_rates.append(s.images_per_s)
            print(f"end to end:           {loop_rates[-1]:8.1f} img/s over the embedding loop "
                  f"({s.images_per_s:.1f} img/s over the whole call of {s.wall_s:.1f} s, model loading included)")
            print(f"  decode {s.decode_s / max(1, s.embedded) * 1e3:.2f} ms/img of worker time; the loop waited "
                  f"{s.wait_s:.2f} s for data; model {s.model_s:.1f} s; background write {s.write_s:.2f} s")
            model_rates.append(model_only(loaded, args.batch_size, args.n, device))
            print(f"model only:           {model_rates[-1]:8.1f} img/s")
        ref = float(np.mean(model_rates))
        print(f"ratio end-to-end / model-only: {np.mean(loop_rates) / ref:.3f} over the embedding loop, "
              f"{np.mean(call_rates) / ref:.3f} over the whole call  (load average {os.getloadavg()[0]:.1f} on "
              f"{cpus} CPUs)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
