"""``embed``: images, audio or video -> encoder tokens -> the LMDB cache, from the shell."""

import json
import logging
import os
import sys

import click

from store import DTYPES, StoreError

from .config import (
    DEFAULT_AUDIO_MODEL,
    DEFAULT_FRAMES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MODEL,
    FEATURES_ON,
    MODALITIES,
    PRECISIONS,
    SOURCE_KINDS,
    EmbedConfig,
)
from .errors import EmbedError


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    if not _is_main_process():
        level = max(level, logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


_NOUNS = {"image": "image", "audio": "clip", "video": "video"}


def _format_summary(s) -> list[str]:
    noun = {"image": "images", "audio": "clips", "video": "videos"}[s.modality]
    flags = ", ".join(f"{k} {v}" for k, v in s.flag_counts.items())
    rows = [("cache", s.cache),
            (noun, f"{s.total} in the sources"),
            ("embedded", str(s.embedded) + (f" ({s.values} values: windows)" if s.values != s.embedded else "")),
            ("skipped", f"{s.skipped} (already in the cache)"),
            ("failed", f"{s.failed}" + (f" (see {s.failures_path})" if s.failures_path else "")),
            ("flagged", f"{s.flagged}" + (f": {flags} (embedded; see {s.flags_path})" if s.flags_path else "")),
            ("value", f"{'x'.join(map(str, s.shape))} {s.dtype}"),
            ("weights", s.weights),
            ("processes", f"{s.processes} on {s.device}"),
            ("time", f"{s.wall_s:.1f} s wall, {s.embed_s:.1f} s embedding; decode {s.decode_s:.1f} s "
                     f"(worker time), waiting for data {s.wait_s:.1f} s, model {s.model_s:.1f} s, "
                     f"write {s.write_s:.1f} s (background), merge {s.merge_s:.1f} s"),
            ("speed", f"{s.images_per_s:.1f} {noun}/s ({s.embedded / s.embed_s if s.embed_s else 0:.1f} "
                      "while embedding)")]
    width = max(len(k) for k, _ in rows)
    return [f"{k:<{width}}  {v}" for k, v in rows]


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("images", nargs=-1, required=True)
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False),
              help="The cache directory: created, or resumed (ids it holds are skipped).")
@click.option("--modality", type=click.Choice(MODALITIES), default="image", show_default=True,
              help="What IMAGES hold: image files, audio files (or the audio track of mp4/webm/mkv), or video "
                   "files (T frames each through the timm model).")
@click.option("--model",
              help=f"image, video: a timm model name [default: {DEFAULT_MODEL}]. audio: a transformers audio "
                   "encoder by hub id or save_pretrained folder (AST, Whisper's encoder, wav2vec2, HuBERT, "
                   f"WavLM, CLAP's audio tower), or ast_sounds_demo (shipped) [default: {DEFAULT_AUDIO_MODEL}: "
                   "AudioSet-trained, patch tokens like ViT-B/16's, 768 wide; 1214x768 per 10 s].")
@click.option("--pretrained/--no-pretrained", default=None,
              help="The model's pretrained weights: those shipped with this project (the demo ViT "
                   "vit_shapes_patch16_48's) or else from the hub; --no-pretrained: random weights "
                   "(seeded by --seed). [default: the shipped weights where a model has them, else "
                   "random ones, with a warning]")
@click.option("--checkpoint", type=click.Path(dir_okay=False),
              help="Local weights: .safetensors, or .pth/.pt/.bin/.ckpt read with weights_only=True.")
@click.option("--model-kwargs", default="{}", metavar="JSON",
              help="Extra timm.create_model arguments, e.g. '{\"depth\": 2}'.")
@click.option("--img-size", type=int, help="Input size override (model and preprocessing).")
@click.option("--layer", type=int,
              help="Take transformer block K's output (no final norm; -2 = the penultimate block, as "
                   "LLaVA) instead of the final-norm tokens.")
@click.option("--batch-size", default=64, show_default=True, help="Images per forward pass and commit.")
@click.option("--dtype", type=click.Choice(DTYPES), default="float16", show_default=True,
              help="The cache's value dtype.")
@click.option("--device", help="cpu, cuda or cuda:N [default: what accelerate picks].")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
              help="auto = bf16 autocast on CUDA, fp32 on CPU.")
@click.option("--num-workers", type=int, help="Decode workers per process [default: CPUs per process - 1].")
@click.option("--threads", type=int, help="torch threads per process [default: torch's].")
@click.option("--source", type=click.Choice(SOURCE_KINDS), default="auto", show_default=True,
              help="How to read IMAGES: auto decides per path (folder / .tar shard / list file).")
@click.option("--id-pattern", metavar="REGEX",
              help="For folders: a regex with one group, searched in each file name, giving the id.")
@click.option("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, show_default=True,
              help="Refuse larger images as decompression bombs.")
@click.option("--draft/--no-draft", default=True, show_default=True,
              help="Decode JPEGs at reduced DCT scale when that still covers the resize target.")
@click.option("--decode-on-device", is_flag=True, help="Decode JPEGs on the GPU (nvjpeg).")
@click.option("--pin-memory/--no-pin-memory", default=None, help="[default: on with CUDA]")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of a random initialisation.")
@click.option("--clip-seconds", type=float,
              help="audio: crop or zero-pad every file to this length [default: the encoder's own: 10 s for AST, "
                   "30 s for Whisper].")
@click.option("--windows", is_flag=True,
              help="audio: a file longer than the clip becomes consecutive windows, stored as ID#w0, ID#w1, ... "
                   "(the last one padded) instead of being cropped to its start.")
@click.option("--features-on", type=click.Choice(FEATURES_ON), default="auto", show_default=True,
              help="audio: run the feature extractor (spectrogram) in the decode workers or in the main process on "
                   "each batch; auto: the workers with CUDA, the batch on the CPU (measured faster there).")
@click.option("--frames", type=int,
              help=f"video: frames T per clip, spread uniformly over it [default: {DEFAULT_FRAMES}].")
@click.option("--fps", type=float,
              help="video: take frames at this rate from the start instead (at most --frames; a shorter clip "
                   "repeats its last frame).")
@click.option("--frame-pool", default="none", show_default=True, metavar="none|mean|grid:K",
              help="video: per frame keep every patch token, their mean, or K tokens (adaptive average pooling of "
                   "the patch grid; K a square). Stored: (T*K, D), frame-major.")
@click.option("--failures", type=click.Path(dir_okay=False),
              help="Failures report (JSON lines) [default: CACHE.failures.jsonl beside the cache]. Items "
                   "embedded with a remark (padded, cropped, resampled, silent) go to CACHE.flags.jsonl.")
@click.option("--strict", is_flag=True, help="Exit 1 if any item failed (flags do not count).")
@click.option("--progress/--no-progress", default=None, help="[default: when stderr is a terminal]")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.option("-q", "--quiet", is_flag=True, help="Warnings and errors only.")
def cli(images, out, modality, model, pretrained, checkpoint, model_kwargs, img_size, layer, batch_size, dtype, device,
        precision, num_workers, threads, source, id_pattern, max_pixels, draft, decode_on_device, pin_memory,
        seed, clip_seconds, windows, features_on, frames, fps, frame_pool, failures, strict, progress, as_json,
        verbose, quiet):
    """Embed IMAGES (or audio or video files) into an LMDB cache (id -> encoder tokens).

    IMAGES are folders (recursive; id = the file name's stem, or 123456 for
    COCO_train2014_000000123456.jpg), list files of `id<TAB>path` lines, or uncompressed
    WebDataset .tar shards (id = __key__; brace patterns like x-{000..009}.tar are expanded).

    Stored per image: the final-norm tokens without class/register tokens (196x768 for
    ViT-B/16 at 224), preprocessed as timm resolves it for the model. Reruns skip ids already in
    the cache; a cache built with another model, weights or preprocessing is refused. Bad images
    are listed in CACHE.failures.jsonl and counted, and the run goes on.

    --modality audio: decoded with soundfile, else PyAV (both ship their codecs), averaged to
    mono, resampled to the encoder's rate (libswresample), cropped or padded to --clip-seconds.
    --modality video: T frames per clip through the timm model, stored (T*tokens, D).

    Example:

    \b
        embed train2014/ --out cache/vit_b16 --pretrained --batch-size 256
        accelerate launch --num_processes 2 -m embed train2014/ --out cache/vit_b16 --pretrained
        embed shapes/train2014 --out cache/demo --model vit_shapes_patch16_48   # shipped weights
        embed sounds/ --modality audio --out cache/ast            # AudioSet AST, 10 s clips
        embed sounds/ --modality audio --model ast_sounds_demo --windows --out cache/demo_audio
        embed clips/ --modality video --frames 8 --frame-pool grid:4 --out cache/video
    """
    _setup_logging(verbose, quiet)
    try:
        config = EmbedConfig(
            images=images, out=out, model=model, pretrained=pretrained, checkpoint=checkpoint,
            model_kwargs=model_kwargs, img_size=img_size, layer=layer, batch_size=batch_size, dtype=dtype,
            device=device, precision=precision, num_workers=num_workers, threads=threads, source=source,
            id_pattern=id_pattern, max_pixels=max_pixels, draft=draft, decode_on_device=decode_on_device,
            pin_memory=pin_memory, seed=seed, failures=failures, modality=modality, clip_seconds=clip_seconds,
            windows=windows, features_on=features_on, frames=frames, fps=fps, frame_pool=frame_pool,
            progress=sys.stderr.isatty() if progress is None else progress)
    except ValueError as e:
        raise click.UsageError(str(e)) from None

    import torch

    from .run import (
        embed,  # timm loads only once the arguments are known to be good (import embed loads torch)
    )

    try:
        summary = embed(config)
    except (EmbedError, StoreError, OSError) as e:
        raise click.ClickException(str(e)) from None
    finally:  # as accelerate's end_training: left to exit with it, a gloo process may abort in teardown
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if not _is_main_process():
        if strict and summary.failed:
            sys.exit(1)
        return
    if as_json:
        click.echo(json.dumps(summary.to_dict(), indent=2))
    else:
        for line in _format_summary(summary):
            click.echo(line)
    if strict and summary.failed:
        raise click.ClickException(f"{summary.failed} {_NOUNS[summary.modality]}(s) failed (--strict); see {summary.failures_path}")


def main():
    cli(prog_name="embed")


if __name__ == "__main__":
    main()
