"""Stage 1 throughput for audio: end to end (audio files -> cache) against the encoder alone, in one run.

Writes ``--n`` clips of ``--seconds`` (a tone chord plus noise; by default 44.1 kHz stereo FLAC, as
AudioSet and VGGSound clips mostly come: so every file is decoded, downmixed and resampled), then
measures, with the same encoder, batch size and threads:

- encoder alone: the feature extractor (spectrogram) and the forward pass on waveforms already decoded,
  mono and at the encoder's rate, in memory (inference mode), before and after each end-to-end run;
- end to end: :func:`embed.embed` from the files to a fresh cache (decode and resample in DataLoader
  workers; the spectrogram there too, or on each batch in the main process: ``--features-on``; forward
  pass, background LMDB writer), over its embedding loop and the whole call;

and prints their ratio (target on the 2-core dev machine: at least 0.9), then where one file's decode
time goes (read, decode + downmix, resample, spectrogram), measured in this process on every file.

    python bench/embed_audio_bench.py [--n 256] [--model ast_sounds_demo] [--batch-size 32]
        [--format flac] [--rate 44100] [--channels 2] [--seconds S] [--num-workers N] [--threads N]
        [--features-on workers batch] [--rounds 2] [--dir /tmp]
"""

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from embed import EmbedConfig, embed
from embed.audio import AudioDataset, decode_audio, resample, to_mono
from embed.audio_model import load_audio_model
from embed.sources import AUDIO_EXTENSIONS, scan


def write_clips(folder: Path, n: int, seconds: float, rate: int, channels: int, fmt: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    for i in range(n):
        freqs = rng.uniform(100, 3000, 3)
        x = sum(0.2 * np.sin(2 * np.pi * f * t) for f in freqs) + 0.02 * rng.standard_normal(len(t))
        x = np.stack([x * (1 - 0.2 * c) for c in range(channels)], 1) if channels > 1 else x
        sf.write(folder / f"clip_{i:05d}.{fmt}", x.astype(np.float32), rate)


def waveforms(files: list, sample_rate: int, samples: int) -> list:
    """Every file decoded, mono, at ``sample_rate``, cut or padded to ``samples``: the encoder's input."""
    out = []
    for p in files:
        x, rate = decode_audio(Path(p).read_bytes())
        x = resample(to_mono(x), rate, sample_rate)[:samples]
        out.append(np.pad(x, (0, samples - len(x))))
    return out


def encoder_only(loaded, waves: list, batch_size: int) -> float:
    """Clips/s of feature extraction + forward pass on in-memory waveforms, the same ops as embed's."""
    features = loaded.features
    with torch.inference_mode():
        x = {k: torch.from_numpy(v) for k, v in features(waves[:batch_size]).items()}
        loaded.forward_tokens(x)  # warm-up
        t = time.perf_counter()
        for i in range(0, len(waves), batch_size):
            x = {k: torch.from_numpy(v) for k, v in features(waves[i:i + batch_size]).items()}
            y = loaded.forward_tokens(x).to(torch.float16).numpy()
        del y
    return len(waves) / (time.perf_counter() - t)


def decode_breakdown(loaded, files: list) -> dict:
    """Median seconds per file of each decode step over ``files`` (the median: the first resample of
    a process pays a one-time ~0.1 s set-up of libswresample, which a mean would spread over all)."""
    ds = AudioDataset(scan(files, extensions=AUDIO_EXTENSIONS), loaded.sample_rate, loaded.clip_samples,
                      loaded.windows, loaded.features)
    steps = {}
    for i in range(len(ds)):
        clip = ds[i]
        assert clip.reason is None, clip.reason
        for k, v in clip.seconds.items():
            steps.setdefault(k, []).append(v)
    return {k: float(np.median(v)) for k, v in steps.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=256, help="clips to embed")
    ap.add_argument("--model", default="ast_sounds_demo")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--format", default="flac", choices=["flac", "wav", "ogg", "mp3"])
    ap.add_argument("--rate", type=int, default=44100, help="the files' sample rate")
    ap.add_argument("--channels", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=None, help="clip length [default: the encoder's]")
    ap.add_argument("--num-workers", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--features-on", nargs="+", default=["workers", "batch"], choices=["workers", "batch"],
                    help="where embed runs the spectrogram; each is measured in every round")
    ap.add_argument("--rounds", type=int, default=2, help="end-to-end runs, each between two encoder-only runs")
    ap.add_argument("--dir", default=None, help="where to write the clips and caches (default: a temp dir)")
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="embed_audio_bench_", dir=args.dir))
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        cfg = EmbedConfig(images=[root / "clips"], out=root / "cache", model=args.model, modality="audio",
                          batch_size=args.batch_size, num_workers=args.num_workers, threads=args.threads,
                          clip_seconds=args.seconds, device="cpu", progress=False)
        loaded = load_audio_model(cfg, torch.device("cpu"))
        seconds = loaded.clip_seconds
        t = time.perf_counter()
        write_clips(root / "clips", args.n, seconds, args.rate, args.channels, args.format)
        files = sorted(str(p) for p in (root / "clips").iterdir())
        kb = sum(os.path.getsize(p) for p in files) / len(files) / 1e3
        print(f"wrote {args.n} clips of {seconds:g} s, {args.rate} Hz, {args.channels} ch, {args.format} "
              f"({kb:.0f} kB each) in {time.perf_counter() - t:.1f} s")
        cpus = len(os.sched_getaffinity(0))
        print(f"encoder {args.model} ({loaded.kind}): {loaded.sample_rate} Hz, tokens {loaded.token_shape}; "
              f"batch {args.batch_size}; {cpus} CPUs; torch threads {torch.get_num_threads()}")
        waves = waveforms(files, loaded.sample_rate, loaded.clip_samples)

        enc_rates, loop_rates, call_rates = [encoder_only(loaded, waves, args.batch_size)], {}, {}
        print(f"encoder only:  {enc_rates[-1]:8.1f} clips/s (spectrogram + forward on decoded waveforms)")
        for r in range(args.rounds):  # interleaved, so a busy neighbour slows every side alike
            for where in args.features_on:
                cfg.out, cfg.features_on = str(root / f"cache{r}_{where}"), where
                s = embed(cfg)
                assert s.embedded == args.n and s.failed == 0, s
                loop_rates.setdefault(where, []).append(s.embedded / s.embed_s)
                call_rates.setdefault(where, []).append(s.images_per_s)
                print(f"end to end, features in {where:7s}: {loop_rates[where][-1]:6.1f} clips/s over the embedding "
                      f"loop ({s.images_per_s:.1f} over the whole call of {s.wall_s:.1f} s, model loading included)")
                print(f"  worker time {s.decode_s / s.embedded * 1e3:.2f} ms/clip; the loop waited {s.wait_s:.2f} s "
                      f"for data; main process (features on the batch, forward) {s.model_s:.1f} s; background "
                      f"write {s.write_s:.2f} s")
            enc_rates.append(encoder_only(loaded, waves, args.batch_size))
            print(f"encoder only:  {enc_rates[-1]:8.1f} clips/s")
        ref = float(np.mean(enc_rates))
        for where in args.features_on:
            print(f"ratio end-to-end / encoder-only, features in {where}: {np.mean(loop_rates[where]) / ref:.3f} "
                  f"over the embedding loop, {np.mean(call_rates[where]) / ref:.3f} over the whole call")
        print(f"(load average {os.getloadavg()[0]:.1f} on {cpus} CPUs)")
        steps = decode_breakdown(loaded, files)
        total = sum(steps.values())
        print("decode per clip (one process, medians): " + ", ".join(
            f"{k} {v * 1e3:.2f} ms ({v / total:.0%})" for k, v in steps.items()) + f"; total {total * 1e3:.2f} ms")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
