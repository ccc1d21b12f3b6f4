"""Train-step time of the fused T5 vs stock HF T5, and of fusion layer and pooling, side by side.

Every configuration is timed in the same run, round-robin (one step of each per round; the best
and the median over rounds are printed), so machine noise hits all rows alike. Next to each
measured time is the time predicted from :func:`fuse.train_step_flops`, with one throughput
constant (FLOP/s) calibrated on the best step of the "stock T5, text + image embeddings" row.

A step is zero_grad + forward + backward + AdamW step, on random weights and random inputs:
``--batch`` samples of up to ``--text`` question tokens (right-padded, lengths drawn in
[text/3, text]), ``--image`` image tokens of width ``--image-dim``, ``--answer`` answer tokens.

Example:
    python bench/fuse_bench.py                       # CPU, the "cpu-bench" preset, a few minutes on 2 cores
    python bench/fuse_bench.py --device cuda --preset t5-base --batch 128 --rounds 10 --amp bf16
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import T5ForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fuse import FusionT5Config, FusionT5ForConditionalGeneration, train_step_flops  # noqa: E402


@dataclass
class Row:
    name: str
    step: Callable[[], torch.Tensor]
    flops: float
    lengths: tuple[int, ...]
    times: list[float]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu-bench", help="FusionT5Config preset (default cpu-bench)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--text", type=int, default=24, help="padded question length")
    p.add_argument("--image", type=int, default=196, help="image tokens per sample")
    p.add_argument("--image-dim", type=int, default=192, help="image feature width D")
    p.add_argument("--answer", type=int, default=4, help="answer tokens")
    p.add_argument("--decoder-layers", type=int, default=None, help="decoder depth (default: the preset's)")
    p.add_argument("--layers", default="0,3,6,9,12", help="fusion layers to time")
    p.add_argument("--pools", default="196,14,1", help="mean-pool target lengths to time (at layer 0)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (one step of every row per round)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per row")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none", help="autocast dtype")
    p.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, eager)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quick", action="store_true", help="fewer rows (text-only pair and k=0 pair)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    B, T, N, A = args.batch, args.text, args.image, args.answer

    base = dict(
        text_modalities=["question"], modality_dims={"image": args.image_dim}, attn_implementation=args.attn
    )
    if args.decoder_layers:
        base["num_decoder_layers"] = args.decoder_layers
    probe = FusionT5Config.from_name(args.preset, **base)
    L = probe.num_layers

    # Inputs: right-padded questions, full image token grids, answers.
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(max(1, T // 3), T + 1, (B,), generator=g)
    q_mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    q_ids = torch.randint(3, probe.vocab_size, (B, T), generator=g) * q_mask
    feats = torch.randn(B, N, args.image_dim, generator=g)
    labels = torch.randint(3, probe.vocab_size, (B, A), generator=g)
    q_ids, q_mask, feats, labels = (t.to(device) for t in (q_ids, q_mask, feats, labels))
    text_only = {"question": (q_ids, q_mask)}
    with_image = {"question": (q_ids, q_mask), "image": feats}

    def make_fused(spec: str, pool: str | None = None) -> FusionT5ForConditionalGeneration:
        torch.manual_seed(0)
        config = FusionT5Config.from_name(args.preset, fusion_spec=spec, pool=pool, **base)
        return FusionT5ForConditionalGeneration(config).to(device)

    def train_step(model, forward) -> Callable[[], torch.Tensor]:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        model.train()

        def step() -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = forward()
            loss.backward()
            opt.step()
            return loss

        return step

    rows: list[Row] = []

    def add(name: str, model, forward, config: FusionT5Config) -> None:
        input_lens = {"question": T, "image": N}
        input_lens = {name: n for name, n in input_lens.items() if name in config.fusion().modalities()}
        count = train_step_flops(config, B, input_lens, A)
        rows.append(Row(name, train_step(model, forward), count.train_step, count.lengths, []))

    def add_fused(name: str, model: FusionT5ForConditionalGeneration, modalities) -> None:
        add(name, model, lambda: model(modalities=modalities, labels=labels).loss, model.config)

    # 1. Text only: stock T5 vs the fused model given the same tokens.
    stock = T5ForConditionalGeneration(probe.to_t5_config()).to(device)
    fused_text = make_fused("0:question")
    fused_text.load_state_dict(stock.state_dict(), strict=False)
    add("stock T5, text", stock, lambda: stock(input_ids=q_ids, attention_mask=q_mask, labels=labels).loss,
        fused_text.config)
    add_fused("fused, text (same tokens)", fused_text, text_only)

    # 2. Text + image tokens at layer 0: stock T5 on the concatenated embeddings vs fused k=0.
    fused0 = make_fused("0:question,image")
    stock_img = T5ForConditionalGeneration(probe.to_t5_config()).to(device)
    stock_adapter = copy.deepcopy(fused0.encoder.adapters["image"])  # the same weights, its own parameters
    stock_img.load_state_dict(fused0.state_dict(), strict=False)
    stock_img.add_module("image_adapter", stock_adapter)  # so its optimizer steps the adapter too

    def stock_concat() -> torch.Tensor:
        # Left-aligned like the fused model: [real text, image, padding] per sample.
        img, _ = stock_adapter(feats)  # (B, N, d)
        embeds = torch.cat([stock_img.shared(q_ids), img], dim=1)  # (B, T + N, d)
        mask = torch.cat([q_mask, torch.ones(B, N, dtype=q_mask.dtype, device=device)], dim=1)  # (B, T + N)
        order = torch.sort(1 - mask, dim=1, stable=True).indices
        embeds = embeds.gather(1, order[..., None].expand_as(embeds))
        return stock_img(inputs_embeds=embeds, attention_mask=mask.gather(1, order), labels=labels).loss

    add("stock T5, text+image embeds", stock_img, stock_concat, fused0.config)
    add_fused("fused, image at k=0", fused0, with_image)

    # 3. The fusion layer and pooling.
    if not args.quick:
        for k in (k for k in map(int, args.layers.split(",")) if 0 < k <= L):
            add_fused(f"fused, image at k={k}" + (" (late)" if k == L else ""),
                      make_fused(f"0:question {k}:image"), with_image)
        for p in map(int, args.pools.split(",")):
            add_fused(f"fused, k=0, mean-pool to {p}", make_fused("0:question,image", f"image:mean:{p}"),
                      with_image)
        add_fused("fused, k=0, attention-pool to 14", make_fused("0:question,image", "image:attention:14"),
                  with_image)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for row in rows:
        for _ in range(args.warmup):
            row.step()
    sync()
    for _ in range(args.rounds):
        for row in rows:
            t0 = time.perf_counter()
            loss = row.step()
            sync()
            row.times.append(time.perf_counter() - t0)
            assert torch.isfinite(loss), row.name

    # The best of the rounds is the estimate least disturbed by other work on the machine; the
    # median is printed beside it so a noisy run shows itself.
    best = {r.name: min(r.times) for r in rows}
    calib = next(r for r in rows if r.name.startswith("stock T5, text+image"))
    flops_per_s = calib.flops / best[calib.name]
    print(f"# {args.preset}: d_model {probe.d_model}, {L} encoder / {probe.num_decoder_layers} decoder "
          f"layers, {probe.num_heads} heads, attn={probe._attn_implementation}, amp={args.amp}; "
          f"device {args.device}, threads {torch.get_num_threads()}, torch {torch.__version__}")
    print(f"# batch {B}, question <= {T} tokens, {N} image tokens of D={args.image_dim}, {A} answer tokens; "
          f"{args.rounds} interleaved rounds after {args.warmup} warm-up step(s)")
    print(f"# predicted = FLOPs / {flops_per_s / 1e9:.1f} GFLOP/s (one constant, calibrated on the best "
          f"'{calib.name}' step)")
    header = ("configuration", "tokens", "GFLOP", "best ms", "median", "pred ms", "best/pred")
    print(f"{header[0]:36s} {header[1]:>8s} {header[2]:>7s} {header[3]:>8s} {header[4]:>8s} {header[5]:>8s} "
          f"{header[6]:>9s}")
    for row in rows:
        ms, med = best[row.name] * 1e3, statistics.median(row.times) * 1e3
        pred = row.flops / flops_per_s * 1e3
        first, last = row.lengths[0], row.lengths[-1]
        tokens = str(last) if first == last else f"{first}>{last}"  # first block's length > decoder's
        print(f"{row.name:36s} {tokens:>8s} {row.flops / 1e9:7.1f} {ms:8.1f} {med:8.1f} {pred:8.1f} "
              f"{ms / pred:9.2f}")
    median = {r.name: statistics.median(r.times) for r in rows}
    for label, fused_name, stock_name in (
        ("text only", "fused, text (same tokens)", "stock T5, text"),
        ("text+image k=0", "fused, image at k=0", "stock T5, text+image embeds"),
    ):
        print(f"fused/stock, {label + ':':16s} best {best[fused_name] / best[stock_name]:.3f}, "
              f"median {median[fused_name] / median[stock_name]:.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
