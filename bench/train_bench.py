"""The training step of a ``fuse-train`` preset, eager against ``torch.compile``, side by side.

Each row is one (fusion layer, batch size, mode) of the preset's model, built and stepped exactly as
``fuse-train`` builds and steps it (:func:`pipelines.train.model.build_model`, ``make_optimizer``:
fused AdamW, :func:`pipelines.train.loop.loss_function`: the compiled forward), with random weights
(the preset's T5 shape; no hub). The rows are timed round-robin, a few steps of each per round, so
machine noise hits them alike; each prints the best round's samples/s and step time. On CUDA it
also prints the model FLOP utilisation (:func:`fuse.train_step_flops` over ``--peak-tflops``,
989 for an H100/H200's dense bf16).

Batches: by default random tokens and embeddings of the preset's shapes (question lengths drawn per
batch, answers short), padded as ``fuse-train`` pads them (to the batch's longest; to a multiple of
8 when compiled). With ``--shards`` and ``--cache`` they come from the real stream instead
(:func:`pipelines.train.streams.batches`, the run's workers), and the share of the loop spent
waiting for the stream is printed ("wait").

``--check-steps N`` also trains eager and compiled from the same weights on the same N batches and
prints both loss curves' last values (the compiled step must learn the same). ``--explain`` prints
``torch._dynamo.explain``'s graph count and graph breaks of the fused forward.

Examples:
    python bench/train_bench.py                                   # CPU: demo preset, layers 0 2 4, batch 64
    python bench/train_bench.py --shards quickstart/qa --cache image=quickstart/cache --layers 2
    python bench/train_bench.py --device cuda --preset paper --layers 0,6,12 --batch 128,256 \\
        --precision bf16 --rounds 5                                # the GPU table (README, "Benchmarks")
"""

from __future__ import annotations

import argparse
import copy
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fuse import train_step_flops  # noqa: E402
from pipelines.train.config import TrainConfig  # noqa: E402
from pipelines.train.loop import loss_function  # noqa: E402
from pipelines.train.model import build_model, make_optimizer, model_inputs  # noqa: E402

# The preset's model shapes without its hub files: (T5 preset of random weights, vocabulary, image
# tokens x width, question tokens at most, answer tokens at most)
SHAPES = {
    "demo": dict(t5="demo", vocab=64, image=(9, 192), text=16, answer=2),
    "paper": dict(t5="t5-base", vocab=32128, image=(196, 768), text=24, answer=4),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(SHAPES), default="demo")
    p.add_argument("--layers", default=None, help="image fusion layers, comma-separated [demo: 0,2,4; paper: 0,6,12]")
    p.add_argument("--batch", default=None, help="batch sizes, comma-separated [the preset's]")
    p.add_argument("--modes", default="eager,compiled", help="eager, compiled or both")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=["fp32", "bf16", "bf16-pure"], default="fp32",
                   help="fp32; bf16: autocast over fp32 weights; bf16-pure: bf16 weights and optimizer")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads [all]")
    p.add_argument("--steps", type=int, default=5, help="steps per row per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per row first (compilation)")
    p.add_argument("--shards", default=None, help="read batches from these shards' train side")
    p.add_argument("--cache", default=None, metavar="image=PATH", help="the image cache, with --shards")
    p.add_argument("--workers", type=int, default=2, help="stream workers, with --shards")
    p.add_argument("--check-steps", type=int, default=0, help="also compare eager and compiled losses over N steps")
    p.add_argument("--explain", action="store_true", help="print torch._dynamo.explain of the fused forward")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the device's dense bf16 peak, for MFU")
    return p.parse_args(argv)


def row_config(args, layer: int, batch: int, compiled: bool) -> TrainConfig:
    shape = SHAPES[args.preset]
    flags = dict(t5=shape["t5"], fuse=f"0:question {layer}:image", batch_size=batch, compile=compiled, dropout=0.0,
                 max_answer_len=shape["answer"] + 1, caches={"image": args.cache.split("=", 1)[1] if args.cache else "x"})
    if args.shards:
        flags.update(shards=args.shards, num_workers=args.workers)
    return TrainConfig.resolve(args.preset, **flags)


def synthetic_batches(cfg: TrainConfig, shape: dict, count: int, seed: int = 0) -> list:
    """``count`` batches of random tokens and image tokens, padded as the training stream pads them."""
    g = torch.Generator().manual_seed(seed)
    out = []
    multiple = cfg.pad_length()
    for _ in range(count):
        lens = torch.randint(shape["text"] // 2, shape["text"] + 1, (cfg.batch_size,), generator=g)
        width = -(-int(lens.max()) // multiple) * multiple
        ids = torch.randint(3, shape["vocab"], (cfg.batch_size, width), generator=g)
        mask = (torch.arange(width)[None, :] < lens[:, None]).long()
        ids = ids * mask
        answer = torch.randint(1, shape["answer"] + 1, (cfg.batch_size,), generator=g)
        awidth = -(-(shape["answer"] + 1) // multiple) * multiple if multiple > 1 else shape["answer"] + 1
        labels = torch.randint(3, shape["vocab"], (cfg.batch_size, awidth), generator=g)
        labels[torch.arange(awidth)[None, :] >= answer[:, None]] = -100
        image = torch.randn(cfg.batch_size, *shape["image"], generator=g).half()
        out.append({"tokens": {"question": (ids, mask)}, "vectors": {"image": image}, "labels": labels,
                    "id": list(range(cfg.batch_size))})
    return out


class Row:
    """One (layer, batch, mode): the model, its optimizer and compiled step, and its batches."""

    def __init__(self, args, layer: int, batch: int, mode: str, device, base=None):
        self.cfg = cfg = row_config(args, layer, batch, mode == "compiled")
        self.name = f"{args.preset} fuse {layer} batch {batch} {mode}"
        shape = SHAPES[args.preset]
        vocab = shape["vocab"]
        if args.shards:
            from pipelines.data.stream import open_caches
            from pipelines.train.streams import batches, stream_configs

            train_sc, _ = stream_configs(cfg)
            self.stream = batches(train_sc, 0, 0, open_caches(train_sc))
            from pipelines.data.tokens import load_tokenizer

            vocab = load_tokenizer(train_sc.tokenizer).vocab_size
        else:
            self.stream = itertools.cycle(synthetic_batches(cfg, shape, 8))
        torch.manual_seed(0)
        self.model = base if base is not None else build_model(
            cfg, {"image": shape["image"][1]}, {"image": shape["image"][0]}, vocab)
        self.model = copy.deepcopy(self.model).to(device)
        if args.precision == "bf16-pure":
            self.model = self.model.to(torch.bfloat16)
        self.model.train()
        self.optimizer = make_optimizer(cfg, self.model)
        self.loss_fn = loss_function(cfg, self.model)
        self.device, self.args = device, args
        self.amp = args.precision == "bf16"
        self.best, self.wait = float("inf"), []
        self.lengths = None

    def next_batch(self) -> dict:
        batch = next(self.stream)
        return batch[2] if isinstance(batch, tuple) else batch  # the real stream's (epoch, index, batch)

    def step(self, batch: dict | None = None) -> torch.Tensor:
        t0 = time.perf_counter()
        batch = batch or self.next_batch()
        t1 = time.perf_counter()
        modalities = model_inputs(batch, self.cfg.fused_modalities(), self.device)
        if self.args.precision == "bf16-pure":
            modalities["image"] = modalities["image"].to(torch.bfloat16)
        if self.lengths is None:
            self.lengths = ({"question": batch["tokens"]["question"][0].shape[1], "image": SHAPES[self.args.preset]["image"][0]},
                            batch["labels"].shape[1])
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            loss = self.loss_fn(modalities, batch["labels"].to(self.device, non_blocking=True))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.wait.append(t1 - t0)
        return loss.detach()

    def timed(self, steps: int) -> None:
        sync(self.device)
        t = time.perf_counter()
        self.wait = []
        for _ in range(steps):
            self.step()
        sync(self.device)
        elapsed = (time.perf_counter() - t) / steps
        if elapsed < self.best:
            self.best, self.best_wait = elapsed, sum(self.wait) / steps / elapsed


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def explain(args, device) -> None:
    row = Row(args, int((args.layers or "2").split(",")[0]), int((args.batch or "8").split(",")[0]), "eager", device)
    batch = row.next_batch()
    modalities = model_inputs(batch, row.cfg.fused_modalities(), device)
    fn = loss_function(row.cfg, row.model)  # uncompiled: explain traces it
    ex = torch._dynamo.explain(fn)(modalities, batch["labels"].to(device))
    print(f"torch._dynamo.explain: {ex.graph_count} graph(s), {ex.graph_break_count} graph break(s)")
    for reason in ex.break_reasons:
        print(" ", reason.reason, reason.user_stack[-1] if reason.user_stack else "")


def check_losses(args, device, layer: int, batch: int) -> None:
    """Eager and compiled from the same weights over the same batches: both losses at the end."""
    rows = [Row(args, layer, batch, mode, device) for mode in ("eager", "compiled")]
    rows[1].model.load_state_dict(rows[0].model.state_dict())
    curves = [[], []]
    for _ in range(args.check_steps):
        b = rows[0].next_batch()  # the same batch for both
        for curve, row in zip(curves, rows):
            curve.append(float(row.step(b)))
    window = max(1, args.check_steps // 10)
    e, c = (sum(x[-window:]) / window for x in curves)
    print(f"loss over the last {window} of {args.check_steps} steps: eager {e:.4f}, compiled {c:.4f} "
          f"(difference {100 * abs(c - e) / e:.1f}%)")


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.explain:
        explain(args, device)
        return
    layers = [int(x) for x in (args.layers or ("0,6,12" if args.preset == "paper" else "0,2,4")).split(",")]
    sizes = [int(x) for x in (args.batch or str(TrainConfig.resolve(args.preset).batch_size)).split(",")]
    modes = args.modes.split(",")
    print(f"{args.preset} preset on {device} ({torch.get_num_threads()} CPU threads), {args.precision}, "
          f"best of {args.rounds} rounds x {args.steps} steps, torch {torch.__version__}", flush=True)
    rows = []
    for layer in layers:
        for batch in sizes:
            for mode in modes:
                row = Row(args, layer, batch, mode, device)
                t = time.perf_counter()
                for _ in range(args.warmup):
                    row.step()
                sync(device)
                row.first = time.perf_counter() - t
                rows.append(row)
    for _ in range(args.rounds):
        for row in rows:
            row.timed(args.steps)
    header = f"{'row':<36} {'samples/s':>10} {'step ms':>9} {'wait':>6} {'warmup s':>9}" + (" MFU" if device.type == "cuda" else "")
    print(header)
    eager = {}
    for row in rows:
        sps = row.cfg.batch_size / row.best
        text_len, answer_len = row.lengths
        line = (f"{row.name:<36} {sps:>10.0f} {1000 * row.best:>9.1f} "
                f"{100 * row.best_wait:>5.1f}% {row.first:>9.1f}")
        if device.type == "cuda":
            flops = train_step_flops(row.model.config, row.cfg.batch_size, text_len, answer_len).train_step
            line += f" {100 * flops / row.best / (args.peak_tflops * 1e12):.1f}%"
        key = row.name.rsplit(" ", 1)[0]
        if row.name.endswith("eager"):
            eager[key] = row.best
        elif key in eager:
            line += f"  ({eager[key] / row.best:.2f}x eager)"
        print(line, flush=True)
    if args.check_steps:
        check_losses(args, device, layers[0], sizes[0])


if __name__ == "__main__":
    main()
