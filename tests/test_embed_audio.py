"""Stage 1 for audio (`embed --modality audio`): real files of every format written here (soundfile:
wav, flac, ogg, mp3; PyAV: mp4 with an AAC track, mkv with Opus), bad files of each kind, and values
checked against an independent reference: the model run on the HF feature extractor's own output for
the waveform soundfile reads. Tiny random transformers models (AST, Whisper, wav2vec2, HuBERT, CLAP)
are saved with save_pretrained into tmp_path and loaded by path, as a hub id would be.
Subprocess tests: a SIGKILLed run resumed to the same values, a 2-process accelerate launch.
"""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner
from test_embed_launch import count, env, free_port, kill_when

from embed import EmbedConfig, EmbedError, embed
from embed.audio import decode_audio
from embed.audio_model import SHIPPED
from embed.cli import cli
from store import CacheReader, MetadataMismatch, verify

SR = 16000
CLIP = SR  # the tiny AST reads 1 s (max_length 100 fbank frames)


def save_ast(folder: Path, seed: int = 0, sampling_rate: int = SR) -> Path:
    """A random tiny AST (2 layers, 32 wide) with its feature extractor, as save_pretrained writes them."""
    from transformers import ASTConfig, ASTFeatureExtractor, ASTModel

    torch.manual_seed(seed)
    config = ASTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       max_length=100, num_mel_bins=32)
    ASTModel(config).save_pretrained(folder)
    ASTFeatureExtractor(max_length=100, num_mel_bins=32, sampling_rate=sampling_rate).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ast(tmp_path_factory):
    return save_ast(tmp_path_factory.mktemp("ast") / "tiny_ast")


def tone(seconds: float, rate: int = SR, freq: float = 440.0, channels: int = 1, seed: int = 0) -> np.ndarray:
    """A tone plus a little noise: ``(n,)`` or ``(n, channels)`` float32."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * rate))) / rate
    x = 0.3 * np.sin(2 * np.pi * freq * t) + 0.02 * rng.standard_normal(len(t))
    x = x.astype(np.float32)
    return np.stack([x * (1 - 0.3 * c) for c in range(channels)], 1) if channels > 1 else x


def write_av(path: Path, samples: np.ndarray, rate: int, codec: str, video: bool = False,
             fmt: str | None = None) -> Path:
    """A container written with PyAV: an audio track (``codec``) of mono ``samples``, and, with
    ``video``, a 10-frame mpeg4 video track first."""
    with av.open(str(path), "w", format=fmt) as c:
        if video:
            v = c.add_stream("mpeg4", rate=10)
            v.width, v.height, v.pix_fmt = 64, 48, "yuv420p"
        a = c.add_stream(codec, rate=rate)
        a.layout = "mono"
        if video:
            for i in range(10):
                for p in v.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), 20 * i, np.uint8), format="rgb24")):
                    c.mux(p)
            for p in v.encode():
                c.mux(p)
        size = a.codec_context.frame_size or 1024
        for k in range(0, len(samples), size):
            frame = av.AudioFrame.from_ndarray(samples[None, k:k + size].astype(np.float32), format="flt",
                                               layout="mono")
            frame.sample_rate, frame.pts = rate, k
            for p in a.encode(frame):
                c.mux(p)
        for p in a.encode():
            c.mux(p)
    return path


def write_video_only(path: Path, frames: int = 5) -> Path:
    with av.open(str(path), "w") as c:
        v = c.add_stream("mpeg4", rate=10)
        v.width, v.height, v.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            for p in v.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), 30 * i, np.uint8), format="rgb24")):
                c.mux(p)
        for p in v.encode():
            c.mux(p)
    return path


def config(sources, out, model, **kw) -> EmbedConfig:
    kw = {"num_workers": 0, "batch_size": 4, **kw}
    return EmbedConfig(images=sources if isinstance(sources, (list, tuple)) else [sources], out=str(out),
                       model=str(model), modality="audio", device="cpu", progress=False, **kw)


def read_all(cache) -> dict:
    with CacheReader(cache) as r:
        return {k: r[k].astype(np.float32) for k in r.keys()}


def reference(folder: Path, wave: np.ndarray) -> np.ndarray:
    """Tokens of ``wave`` (mono, at the model's rate, one clip) from the model and feature extractor
    loaded afresh, without the embed code: (L, D) float32."""
    from transformers import AutoFeatureExtractor, AutoModel

    fe = AutoFeatureExtractor.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    x = fe([wave], sampling_rate=fe.sampling_rate, return_tensors="pt")
    with torch.inference_mode():
        return model(**x).last_hidden_state[0, 2:].numpy()  # AST: cls + distillation dropped


def pad(x: np.ndarray, n: int) -> np.ndarray:
    return np.pad(x, (0, n - len(x))) if len(x) < n else x[:n]


def assert_f16_close(stored, ref):
    np.testing.assert_allclose(stored, ref, rtol=2e-2, atol=2e-2)
    assert np.abs(stored - ref).mean() < 2e-3


def test_every_format_decodes_and_a_wav_equals_the_reference(tmp_path, ast):
    d = tmp_path / "sounds"
    d.mkdir()
    x = tone(0.8)
    sf.write(d / "a_wav.wav", x, SR, subtype="PCM_16")
    sf.write(d / "b_flac.flac", x, SR)
    sf.write(d / "c_ogg.ogg", x, SR)
    sf.write(d / "d_mp3.mp3", x, SR)
    write_av(d / "e_mp4.mp4", x, SR, "aac", video=True)
    write_av(d / "f_mkv.mkv", tone(0.8, 48000), 48000, "libopus")
    s = embed(config(d, tmp_path / "cache", ast))
    assert (s.total, s.embedded, s.failed, s.shape) == (6, 6, 0, [18, 32])  # 1 s: 12 x 1 + ... patches
    values = read_all(tmp_path / "cache")
    wav, rate = sf.read(d / "a_wav.wav", dtype="float32")
    assert rate == SR
    ref = reference(ast, pad(wav, CLIP))
    assert_f16_close(values["a_wav"], ref)
    # lossy codecs: the same sound, so nearly the same tokens (a random model; far from another sound's)
    other = reference(ast, pad(tone(0.8, freq=1500, seed=3), CLIP))
    for k in ("b_flac", "c_ogg", "d_mp3", "e_mp4", "f_mkv"):
        assert np.abs(values[k] - ref).mean() < np.abs(other - ref).mean() / 2, k
    assert s.flag_counts == {"padded": 6, "resampled": 1}  # 0.8 s clips; the mkv at 48 kHz


def test_bad_files_fail_and_odd_ones_are_embedded_and_flagged(tmp_path, ast):
    d = tmp_path / "sounds"
    d.mkdir()
    sf.write(d / "ok.wav", tone(1.0), SR)
    (d / "empty.wav").write_bytes(b"")
    (d / "text.wav").write_text("not a sound at all\n")
    sf.write(d / "whole.wav", tone(1.0), SR)
    data = (d / "whole.wav").read_bytes()
    (d / "whole.wav").unlink()
    (d / "cut.wav").write_bytes(data[:len(data) // 2])
    sf.write(d / "whole.flac", tone(1.0), SR)
    data = (d / "whole.flac").read_bytes()
    (d / "whole.flac").unlink()
    (d / "cutflac.flac").write_bytes(data[:len(data) // 3])
    write_video_only(d / "mute.mp4")
    sf.write(d / "stereo44.wav", tone(1.0, 44100, channels=2), 44100)
    sf.write(d / "silence.wav", np.zeros(SR, dtype=np.float32), SR)
    sf.write(d / "short.wav", tone(0.3), SR)
    sf.write(d / "long.wav", tone(2.5), SR)
    (tmp_path / "list.txt").write_text("".join(f"{p.stem}\tsounds/{p.name}\n" for p in sorted(d.iterdir()))
                                       + "gone\tsounds/gone.wav\n")
    s = embed(config(tmp_path / "list.txt", tmp_path / "cache", ast))
    assert (s.total, s.embedded, s.failed, s.flagged) == (11, 5, 6, 4)
    failures = {f["id"]: f["reason"] for f in map(json.loads, open(s.failures_path))}
    assert failures == {
        "empty": "empty file (0 bytes)",
        "text": "not audio or video, or truncated (no decoder recognises the data: Invalid data found when "
                "processing input)",
        "cut": "truncated audio: the data chunk holds 15978 of the 32000 bytes its header announces",
        "cutflac": failures["cutflac"],
        "mute": "no audio stream (the file has video streams)",
        "gone": "file not found"}
    assert failures["cutflac"].startswith("truncated or corrupt audio")
    flags = {f["id"]: f for f in map(json.loads, open(s.flags_path))}
    assert {k: v["flags"] for k, v in flags.items()} == {
        "stereo44": ["resampled: 44100 Hz -> 16000 Hz", "downmixed: 2 channels -> mono"],
        "silence": ["silent: peak below -80 dBFS"],
        "short": ["padded: 4800 samples -> 16000 (zeros at the end)"],
        "long": ["cropped: 40000 samples -> 16000 (the start kept)"]}
    assert all(f["outcome"] == "embedded" for f in flags.values())
    assert s.flag_counts == {"cropped": 1, "downmixed": 1, "padded": 1, "resampled": 1, "silent": 1}
    values = read_all(tmp_path / "cache")
    assert sorted(values) == ["long", "ok", "short", "silence", "stereo44"]
    assert_f16_close(values["long"], reference(ast, tone(2.5)[:CLIP]))  # cropped: the first second
    assert_f16_close(values["short"], reference(ast, pad(tone(0.3), CLIP)))
    # the stereo 44.1 kHz tone, converted, is the 16 kHz mono tone's sound
    mono16 = reference(ast, tone(1.0))
    assert np.abs(values["stereo44"] - mono16).mean() < np.abs(values["silence"] - mono16).mean() / 3
    # a rerun retries the failures, keeps the earlier flags, and recomputes nothing
    s2 = embed(config(tmp_path / "list.txt", tmp_path / "cache", ast))
    assert (s2.skipped, s2.embedded, s2.failed, s2.flagged) == (5, 0, 6, 4)


def test_windows_split_a_long_file_under_derived_ids(tmp_path, ast):
    d = tmp_path / "sounds"
    d.mkdir()
    x = tone(2.5)
    sf.write(d / "long.wav", x, SR)
    sf.write(d / "tiny.wav", tone(0.2), SR)
    s = embed(config(d, tmp_path / "cache", ast, windows=True, batch_size=1))
    assert (s.embedded, s.values, s.failed) == (2, 4, 0)
    values = read_all(tmp_path / "cache")
    assert sorted(values) == ["long#w0", "long#w1", "long#w2", "tiny#w0"]
    for k in range(3):
        assert_f16_close(values[f"long#w{k}"], reference(ast, pad(x[k * CLIP:(k + 1) * CLIP], CLIP)))
    flags = {f["id"]: f for f in map(json.loads, open(s.flags_path))}
    assert flags["long"]["ids"] == ["long#w0", "long#w1", "long#w2"]
    assert flags["long"]["flags"] == ["windowed: 40000 samples -> 3 windows of 16000"]
    assert embed(config(d, tmp_path / "cache", ast, windows=True)).skipped == 2  # resume by window 0


def test_features_in_the_workers_or_on_the_batch_give_the_same_values(tmp_path, ast):
    d = tmp_path / "sounds"
    d.mkdir()
    for i in range(5):
        sf.write(d / f"s{i}.wav", tone(0.4 + 0.5 * i, freq=300 + 50 * i), SR)
    on_batch = embed(config(d, tmp_path / "batch", ast, windows=True, features_on="batch"))
    in_workers = embed(config(d, tmp_path / "workers", ast, windows=True, features_on="workers", num_workers=1))
    assert on_batch.values == in_workers.values == 9  # 1 + 1 + 2 + 2 + 3 windows (0.4, 0.9, ... 2.4 s)
    a, b = read_all(tmp_path / "batch"), read_all(tmp_path / "workers")
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    with CacheReader(tmp_path / "workers") as r:
        assert r.meta.producer["features_on"] == "workers"


def test_a_cache_of_another_encoder_or_sample_rate_is_refused(tmp_path, ast):
    sf.write(tmp_path / "a.wav", tone(1.0), SR)
    embed(config(tmp_path / "a.wav", tmp_path / "cache", ast))
    other = save_ast(tmp_path / "other", seed=5)
    with pytest.raises(MetadataMismatch, match="weights_hash"):
        embed(config(tmp_path / "a.wav", tmp_path / "cache", other))
    rate = save_ast(tmp_path / "rate", sampling_rate=8000)
    with pytest.raises(MetadataMismatch, match="sample_rate: cache has 16000, expected 8000"):
        embed(config(tmp_path / "a.wav", tmp_path / "cache", rate))
    with pytest.raises(MetadataMismatch, match="clip_seconds: cache has 1.0, expected 0.5"):
        embed(config(tmp_path / "a.wav", tmp_path / "cache", ast, clip_seconds=0.5))


def test_layer_is_that_hidden_state_without_prefix_tokens(tmp_path, ast):
    from transformers import ASTModel, AutoFeatureExtractor

    sf.write(tmp_path / "a.wav", tone(1.0), SR)
    embed(config(tmp_path / "a.wav", tmp_path / "cache", ast, layer=1))
    fe, model = AutoFeatureExtractor.from_pretrained(ast), ASTModel.from_pretrained(ast).eval()
    with torch.inference_mode():
        out = model(**fe([tone(1.0)], sampling_rate=SR, return_tensors="pt"), output_hidden_states=True)
    assert_f16_close(read_all(tmp_path / "cache")["a"], out.hidden_states[1][0, 2:].numpy())


def save_kind(kind: str, folder: Path) -> SimpleNamespace:
    """A tiny random model of ``kind`` saved with its feature extractor; and how to run it by hand."""
    import transformers as tf

    torch.manual_seed(0)
    if kind == "whisper":
        model = tf.WhisperModel(tf.WhisperConfig(d_model=32, encoder_layers=1, decoder_layers=1,
                                                 encoder_attention_heads=2, decoder_attention_heads=2,
                                                 encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=80,
                                                 max_source_positions=1500, vocab_size=100, pad_token_id=0,
                                                 bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
                                                 max_target_positions=16))
        fe = tf.WhisperFeatureExtractor()
        run = lambda m, x: m.get_encoder()(**x).last_hidden_state[0]
    elif kind in ("wav2vec2", "hubert"):
        cls, cfg = (tf.Wav2Vec2Model, tf.Wav2Vec2Config) if kind == "wav2vec2" else (tf.HubertModel, tf.HubertConfig)
        model = cls(cfg(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                        conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 4), num_conv_pos_embeddings=16,
                        num_conv_pos_embedding_groups=2))
        fe = tf.Wav2Vec2FeatureExtractor()
        run = lambda m, x: m(**x).last_hidden_state[0]
    else:
        model = tf.ClapModel(tf.ClapConfig(
            text_config=dict(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=64, projection_dim=16),
            audio_config=dict(spec_size=256, patch_size=16, num_mel_bins=64, window_size=4, depths=[1, 1],
                              num_heads=[2, 2], hidden_size=64, patch_embeds_hidden_size=16, projection_dim=16),
            projection_dim=16))
        fe = tf.ClapFeatureExtractor(feature_size=64, sampling_rate=SR, max_length_s=1, truncation="rand_trunc")
        run = lambda m, x: m.audio_model(**x).last_hidden_state[0].flatten(1).T
    model.save_pretrained(folder)
    fe.save_pretrained(folder)
    return SimpleNamespace(cls=type(model), run=run)


@pytest.mark.parametrize("kind, shape", [
    ("whisper", [1500, 32]),  # the feature extractor pads every clip to 30 s
    ("wav2vec2", [799, 32]), ("hubert", [799, 32]),  # a frame per 20 samples (the tiny conv strides 5 x 4)
    ("clap", [1024, 32])])  # HTSAT's last_hidden_state (B, C, freq, time) as (freq * time, C)
def test_whisper_wav2vec2_hubert_and_clap_by_their_model_type(tmp_path, kind, shape):
    m = save_kind(kind, tmp_path / kind)
    sf.write(tmp_path / "a.wav", tone(0.6), SR)
    s = embed(config(tmp_path / "a.wav", tmp_path / "cache", tmp_path / kind, clip_seconds=1.0))
    assert s.shape == shape and s.embedded == 1
    from transformers import AutoFeatureExtractor

    fe = AutoFeatureExtractor.from_pretrained(tmp_path / kind)
    model = m.cls.from_pretrained(tmp_path / kind).eval()
    x = fe([pad(sf.read(tmp_path / "a.wav", dtype="float32")[0], SR)], sampling_rate=SR, return_tensors="pt")
    x = {k: v for k, v in x.items() if k in ("input_values", "input_features", "is_longer")}
    with torch.inference_mode():
        ref = m.run(model, x).numpy()
    assert_f16_close(read_all(tmp_path / "cache")["a"], ref)
    with CacheReader(tmp_path / "cache") as r:
        assert r.meta.producer["clip_seconds"] == 1.0 and r.meta.producer["sample_rate"] == SR
        assert r.meta.producer["model"].startswith({"hubert": "wav2vec2"}.get(kind, kind))


def test_shipped_short_name_loads_or_says_not_shipped(tmp_path):
    sf.write(tmp_path / "a.wav", tone(1.0), SR)
    folder = SHIPPED["ast_sounds_demo"]
    if (folder / "config.json").is_file():
        s = embed(config(tmp_path / "a.wav", tmp_path / "cache", "ast_sounds_demo"))
        assert s.embedded == 1 and s.weights == f"pretrained:{folder.resolve()}"
    else:
        with pytest.raises(EmbedError, match="--model ast_sounds_demo: not shipped with this installation"):
            embed(config(tmp_path / "a.wav", tmp_path / "cache", "ast_sounds_demo"))


def test_decode_audio_reads_a_container_track_at_its_rate():
    import io

    buf = io.BytesIO()
    sf.write(buf, tone(0.5, 22050, channels=2), 22050, format="WAV")
    samples, rate = decode_audio(buf.getvalue())
    assert (samples.shape, rate) == ((2, 11025), 22050)


def run_cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.parametrize("args, message", [
    (["--windows"], "--windows does not apply to --modality image"),
    (["--modality", "audio", "--clip-seconds", "-1"], "--clip-seconds -1.0: must be a positive number of seconds"),
    (["--modality", "audio", "--img-size", "32"], "--img-size does not apply to --modality audio"),
    (["--modality", "audio", "--frames", "4"], "--frames does not apply to --modality audio"),
    (["--modality", "sound"], "Invalid value for '--modality'"),
])
def test_cli_usage_errors_exit_2_naming_the_flag(tmp_path, args, message):
    r = run_cli(tmp_path, "--out", tmp_path / "cache", *args)
    assert r.exit_code == 2, r.output
    assert message in r.output


def test_cli_errors_exit_1_and_strict_counts_failures_not_flags(tmp_path, ast):
    d = tmp_path / "sounds"
    d.mkdir()
    sf.write(d / "short.wav", tone(0.3), SR)
    base = [d, "--modality", "audio", "--model", ast, "--device", "cpu", "--num-workers", "0", "--no-progress"]
    r = run_cli(*base, "--out", tmp_path / "c1", "--clip-seconds", "5")
    assert r.exit_code == 1 and f"--clip-seconds 5: {ast} reads at most 1 s" in r.output, r.output
    r = run_cli(*base, "--out", tmp_path / "c2", "--strict")
    assert r.exit_code == 0 and "flagged    1: padded 1 (embedded; see" in r.output, r.output
    (d / "bad.wav").write_text("nope")
    r = run_cli(*base, "--out", tmp_path / "c2", "--strict")
    assert r.exit_code == 1 and "1 clip(s) failed (--strict)" in r.output, r.output
    r = run_cli(*base, "--out", tmp_path / "c3", "--model", tmp_path / "nowhere")
    assert r.exit_code == 1 and f"--model {tmp_path / 'nowhere'}: cannot load its config" in r.output


def embed_cmd(sources, out, model, *extra) -> list:
    return [sys.executable, "-m", "embed", str(sources), "--modality", "audio", "--out", str(out), "--model",
            str(model), "--device", "cpu", "--no-progress", *extra]


def test_sigkill_then_rerun_gives_the_values_of_an_uninterrupted_run(tmp_path, ast):
    d = tmp_path / "sounds"
    d.mkdir()
    n = 120
    for i in range(n):
        sf.write(d / f"s{i:03d}.wav", tone(0.5, freq=200 + 5 * i, seed=i), SR)
    cache = tmp_path / "cache"
    proc = subprocess.Popen(embed_cmd(d, cache, ast, "--batch-size", "2", "--num-workers", "1", "-q"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env())
    kill_when(proc, lambda: count(cache) >= 10)
    done = count(cache)
    assert 10 <= done < n
    s = embed(config(d, cache, ast, batch_size=16))
    assert (s.skipped, s.embedded, s.failed) == (done, n - done, 0)
    assert verify(cache)["bad"] == []
    whole = embed(config(d, tmp_path / "whole", ast, batch_size=16))
    assert whole.embedded == n
    a, b = read_all(cache), read_all(tmp_path / "whole")
    assert sorted(a) == sorted(b) and len(a) == n
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_two_process_accelerate_launch_equals_one_process(tmp_path, ast):
    d = tmp_path / "sounds"
    d.mkdir()
    for i in range(9):
        sf.write(d / f"s{i}.wav", tone(0.5 + 0.2 * i, freq=300 + 40 * i), SR)
    (d / "bad.wav").write_bytes(b"RIFF")
    single = embed(config(d, tmp_path / "single", ast, windows=True))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port())]
    r = subprocess.run(launch + embed_cmd(d, tmp_path / "multi", ast, "--windows", "--batch-size", "2",
                                          "--json")[1:], capture_output=True, env=env(), timeout=240)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    summary = json.loads(r.stdout)
    assert (summary["processes"], summary["embedded"], summary["failed"], summary["values"]) == \
        (2, single.embedded, 1, single.values)
    assert (tmp_path / "multi.flags.jsonl").read_text() == (tmp_path / "single.flags.jsonl").read_text()
    a, b = read_all(tmp_path / "single"), read_all(tmp_path / "multi")
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-3, atol=1e-3)
