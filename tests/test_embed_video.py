"""Stage 1 for video (`embed --modality video`): clips written here with PyAV (mp4/mpeg4, webm/vp8),
T frames sampled uniformly or at an fps, each through a real timm ViT (2 blocks at 64x64: a 4x4 grid
of 192-dim patch tokens), stored frame-major and optionally pooled per frame; the values equal the
ViT run by hand on the frames PyAV decodes; bad files are reported, short clips padded and flagged.
"""

import json

import av
import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from test_embed_audio import tone, write_av
from timm.data import create_transform, resolve_data_config

from embed import EmbedConfig, embed
from embed.cli import cli
from store import CacheReader, MetadataMismatch

MODEL, KWARGS, IMG = "vit_tiny_patch16_224", {"depth": 2}, 64
FPS = 10


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    path = tmp_path_factory.mktemp("vit") / "tiny.safetensors"
    torch.manual_seed(1)
    model = timm.create_model(MODEL, img_size=IMG, **KWARGS).eval()
    save_file(model.state_dict(), str(path))
    return model, path


def write_video(path, frames: int, codec: str = "mpeg4", fmt: str | None = None, seed: int = 0):
    """``frames`` frames at 10 fps, each a different random 8x8 pattern scaled to 80x64."""
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w", format=fmt) as c:
        v = c.add_stream(codec, rate=FPS)
        v.width, v.height, v.pix_fmt = 80, 64, "yuv420p"
        for _ in range(frames):
            img = np.kron(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), np.ones((8, 10, 1), np.uint8))
            for p in v.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in v.encode():
            c.mux(p)
    return path


def config(sources, out, checkpoint, **kw) -> EmbedConfig:
    kw = {"num_workers": 0, "batch_size": 2, "frames": 4, **kw}
    return EmbedConfig(images=sources if isinstance(sources, (list, tuple)) else [sources], out=str(out),
                       model=MODEL, model_kwargs=KWARGS, img_size=IMG, checkpoint=str(checkpoint), device="cpu",
                       modality="video", progress=False, **kw)


def frame_tokens(model, path, indices) -> np.ndarray:
    """The ViT's patch tokens of the frames ``indices`` of ``path``, decoded by PyAV and preprocessed
    by timm's unsplit eval transform: (len(indices), 16, 192)."""
    with av.open(str(path)) as c:
        frames = [f.to_image() for f in c.decode(video=0)]
    transform = create_transform(**resolve_data_config({"input_size": (3, IMG, IMG)}, model=model))
    x = torch.stack([transform(frames[i]) for i in indices])
    with torch.inference_mode():
        return model.forward_features(x)[:, model.num_prefix_tokens:].numpy()


def stored(cache) -> dict:
    with CacheReader(cache) as r:
        return {k: r[k].astype(np.float32) for k in r.keys()}


def close(a, b):
    np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-2)


def test_uniform_frames_through_the_vit_frame_major(tmp_path, vit):
    model, ckpt = vit
    (tmp_path / "v").mkdir()
    write_video(tmp_path / "v" / "clip.mp4", 10)
    write_video(tmp_path / "v" / "other.webm", 10, codec="libvpx", fmt="webm", seed=1)
    s = embed(config(tmp_path / "v", tmp_path / "cache", ckpt))
    assert (s.embedded, s.failed, s.flagged, s.shape) == (2, 0, 0, [4 * 16, 192])
    values = stored(tmp_path / "cache")
    # 4 frames over 1 s: those on screen at 0.125, 0.375, 0.625 and 0.875 s, frames 1, 3, 6 and 8
    for name, path in (("clip", tmp_path / "v" / "clip.mp4"), ("other", tmp_path / "v" / "other.webm")):
        ref = frame_tokens(model, path, [1, 3, 6, 8])  # (4, 16, 192)
        close(values[name], ref.reshape(64, 192))
    with CacheReader(tmp_path / "cache") as r:
        p = r.meta.producer
        assert (p["modality"], p["frames"], p["fps"], p["frame_pool"], p["tokens_per_frame"]) == \
            ("video", 4, None, "none", 16)


@pytest.mark.parametrize("pool, shape", [("mean", (4, 1, 192)), ("grid:4", (4, 4, 192))])
def test_frame_pool_mean_and_grid(tmp_path, vit, pool, shape):
    model, ckpt = vit
    path = write_video(tmp_path / "clip.mp4", 10)
    s = embed(config(path, tmp_path / "cache", ckpt, frame_pool=pool))
    assert s.shape == [shape[0] * shape[1], 192]
    ref = torch.from_numpy(frame_tokens(model, path, [1, 3, 6, 8]))  # (4, 16, 192)
    if pool == "mean":
        want = ref.mean(1)
    else:  # 4x4 patch grid -> 2x2: each token the mean of a 2x2 block of patches
        grid = ref.reshape(4, 4, 4, 192)  # (T, h, w, D)
        want = grid.reshape(4, 2, 2, 2, 2, 192).mean((2, 4)).reshape(4, 4, 192)
    close(stored(tmp_path / "cache")["clip"], want.reshape(-1, 192).numpy())


def test_clips_without_a_duration_in_their_header_pick_the_same_frames(tmp_path, monkeypatch):
    from embed import video

    data = write_video(tmp_path / "clip.mp4", 10).read_bytes()
    with_header, _ = video.decode_frames(data, 4, None)
    monkeypatch.setattr(video, "_duration", lambda container, stream: None)  # decode all, then pick
    without, _ = video.decode_frames(data, 4, None)
    assert [np.asarray(a).tolist() for a in with_header] == [np.asarray(b).tolist() for b in without]
    assert len({np.asarray(a).tobytes() for a in without}) == 4


def test_fps_sampling_pads_a_short_clip_and_flags_it(tmp_path, vit):
    model, ckpt = vit
    path = write_video(tmp_path / "clip.mp4", 10)
    s = embed(config(path, tmp_path / "cache", ckpt, frames=8, fps=4.0))
    assert (s.embedded, s.flagged) == (1, 1)
    # 0, 0.25, 0.5 and 0.75 s: frames 0, 2, 5, 7; then the last one again up to 8 frames
    ref = frame_tokens(model, path, [0, 2, 5, 7, 7, 7, 7, 7])
    close(stored(tmp_path / "cache")["clip"], ref.reshape(-1, 192))
    flags = [json.loads(line) for line in open(s.flags_path)]
    assert flags == [{"id": "clip", "path": str(path), "outcome": "embedded",
                      "flags": ["padded: 4 frames at 4 fps, the last repeated to 8"]}]


def test_bad_videos_fail_and_a_clip_shorter_than_t_is_flagged(tmp_path, vit):
    _, ckpt = vit
    d = tmp_path / "v"
    d.mkdir()
    write_video(d / "ok.mp4", 6)
    write_video(d / "three.mp4", 3)
    (d / "empty.mp4").write_bytes(b"")
    (d / "text.mkv").write_text("not a video\n")
    data = write_video(d / "whole.mp4", 10).read_bytes()
    (d / "whole.mp4").unlink()
    (d / "cut.mp4").write_bytes(data[:len(data) // 2])
    write_av(d / "sound.mp4", tone(0.5), 16000, "aac")
    (tmp_path / "list.txt").write_text("".join(f"{p.stem}\tv/{p.name}\n" for p in sorted(d.iterdir()))
                                       + "gone\tv/gone.mp4\n")
    s = embed(config(tmp_path / "list.txt", tmp_path / "cache", ckpt))
    assert (s.total, s.embedded, s.failed, s.flagged) == (7, 2, 5, 1)
    failures = {f["id"]: f["reason"] for f in map(json.loads, open(s.failures_path))}
    assert set(failures) == {"empty", "text", "cut", "sound", "gone"}
    assert failures["empty"] == "empty file (0 bytes)"
    assert failures["gone"] == "file not found"
    assert failures["sound"] == "no video stream (the file has audio streams)"
    assert failures["text"].startswith("not a video, or truncated (no decoder recognises the data")
    assert failures["cut"].startswith(("not a video, or truncated", "truncated or corrupt video"))
    flags = [json.loads(line) for line in open(s.flags_path)]
    assert [(f["id"], f["flags"]) for f in flags] == [("three", ["short: 3 distinct frames for 4, frames repeated"])]


def test_a_cache_of_other_frame_sampling_is_refused(tmp_path, vit):
    _, ckpt = vit
    path = write_video(tmp_path / "clip.mp4", 10)
    embed(config(path, tmp_path / "cache", ckpt, frame_pool="mean"))
    with pytest.raises(MetadataMismatch, match="frames: cache has 4, expected 6"):
        embed(config(path, tmp_path / "cache", ckpt, frames=6, frame_pool="grid:1"))  # 6 x 1 tokens: 4 x 1 shape
    with pytest.raises(MetadataMismatch, match="fps: cache has None, expected 2.0"):
        embed(config(path, tmp_path / "cache", ckpt, fps=2.0, frame_pool="mean"))


@pytest.mark.parametrize("args, message", [
    (["--frame-pool", "grid:3"], "--frame-pool grid:3: choose none, mean or grid:K with K a square"),
    (["--fps", "0"], "--fps 0.0: must be a positive number of frames per second"),
    (["--frames", "0"], "--frames 0: must be a positive integer"),
    (["--windows"], "--windows does not apply to --modality video"),
])
def test_cli_usage_errors_exit_2(tmp_path, args, message):
    r = CliRunner().invoke(cli, [str(tmp_path), "--out", str(tmp_path / "c"), "--modality", "video", *args])
    assert r.exit_code == 2 and message in r.output, r.output


def test_cli_embeds_videos(tmp_path, vit):
    _, ckpt = vit
    write_video(tmp_path / "clip.mp4", 10)
    r = CliRunner().invoke(cli, [str(tmp_path / "clip.mp4"), "--out", str(tmp_path / "cache"), "--modality", "video",
                                 "--model", MODEL, "--model-kwargs", json.dumps(KWARGS), "--img-size", str(IMG),
                                 "--checkpoint", str(ckpt), "--device", "cpu", "--num-workers", "0",
                                 "--frames", "2", "--frame-pool", "grid:1", "--no-progress", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output[r.output.index("{"):])
    assert (summary["embedded"], summary["shape"], summary["modality"]) == (1, [2, 192], "video")
