"""Audio files -> fixed-length mono clips at the encoder's rate, decoded in DataLoader workers.

Decoders that ship their codecs: ``soundfile`` (libsndfile 1.2: wav, flac, ogg/vorbis/opus, mp3,
aiff, ...) first, and PyAV (FFmpeg bundled in its wheel) for containers (the audio track of
mp4/webm/mkv/mov) and whatever libsndfile cannot read. TorchCodec is not used: it needs the
system's FFmpeg libraries, which these machines lack.

Channels are averaged to mono (the downmix the AST, Whisper and wav2vec2 feature extractors expect
of a mono input), then libswresample (PyAV's ``AudioResampler``) converts the rate. The clip is
cropped or zero-padded to ``clip_seconds``; with ``windows`` a longer file becomes consecutive,
non-overlapping windows (the last one padded), stored under ``{id}#w{k}`` (k = 0, 1, ...).

Nothing here raises for a bad file: :class:`AudioDataset` returns a :class:`Clip` whose ``reason``
says why it failed, and remarks (``flags``) about files it embedded anyway: converted rate or
channels, silence, padding, cropping, windows.
"""

import io
import re
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from .sources import ImageRef, read_bytes

# libsndfile's header log of a WAV/AIFF whose data chunk is shorter than its header says, e.g.
# "data : 22400 (should be 11178)": it reads what is there without an error.
_CUT_CHUNK = re.compile(r"^(data|SSND)\s*:\s*(\d+) \(should be (\d+)\)", re.MULTILINE)
SILENCE_PEAK = 1e-4  # -80 dBFS: below it a clip is flagged silent
WINDOW_SEP = "#w"


class BadAudio(Exception):
    """A file that cannot be embedded as audio; ``str(e)`` is the reason for the failures report."""


def window_id(source_id: str, k: int) -> str:
    """The cache id of window ``k`` of ``source_id`` under ``--windows``: ``{id}#w{k}``."""
    return f"{source_id}{WINDOW_SEP}{k}"


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    """Encoded bytes -> ``((channels, samples) float32 in [-1, 1], sample rate)``.

    Raises:
        BadAudio: empty, not audio, no audio stream, truncated or corrupt.
    """
    if not data:
        raise BadAudio("empty file (0 bytes)")
    try:
        return _decode_soundfile(data)
    except BadAudio:
        raise
    except Exception:  # libsndfile does not know the format: FFmpeg may
        return _decode_av(data)


def _decode_soundfile(data: bytes) -> tuple[np.ndarray, int]:
    import soundfile as sf

    with sf.SoundFile(io.BytesIO(data)) as f:
        expected = f.frames
        try:
            samples = f.read(dtype="float32", always_2d=True)  # (n, channels)
        except sf.LibsndfileError as e:
            raise BadAudio(f"truncated or corrupt audio: {e}") from None
        rate = f.samplerate
        cut = _CUT_CHUNK.search(f.extra_info)
    if cut and int(cut.group(3)) < int(cut.group(2)):
        raise BadAudio(f"truncated audio: the {cut.group(1)} chunk holds {cut.group(3)} of the {cut.group(2)} "
                       "bytes its header announces")
    if 0 < expected and len(samples) < expected:
        raise BadAudio(f"truncated audio: {len(samples)} of the {expected} samples its header announces")
    return np.ascontiguousarray(samples.T), rate


def _decode_av(data: bytes) -> tuple[np.ndarray, int]:
    import av

    try:
        container = av.open(io.BytesIO(data), mode="r")
    except av.error.FFmpegError as e:
        raise BadAudio(f"not audio or video, or truncated (no decoder recognises the data: {av_reason(e)})") from None
    with container:
        if not container.streams.audio:
            kinds = sorted({s.type for s in container.streams}) or ["no"]
            raise BadAudio(f"no audio stream (the file has {', '.join(kinds)} streams)")
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate or stream.rate
        # format conversion only (same layout and rate): frames come as s16, fltp, ... per codec
        to_float = av.AudioResampler(format="fltp", layout=stream.layout.name, rate=rate)
        chunks = []
        try:
            for frame in container.decode(stream):
                chunks += [f.to_ndarray() for f in to_float.resample(frame)]
            chunks += [f.to_ndarray() for f in to_float.resample(None)]
        except av.error.FFmpegError as e:
            raise BadAudio(f"truncated or corrupt audio stream: {e}") from None
    if not chunks:
        raise BadAudio("the audio stream holds no samples")
    return np.concatenate(chunks, axis=1).astype(np.float32, copy=False), rate


def av_reason(e) -> str:
    """FFmpeg's own words for an error, without its errno and file name decoration."""
    return getattr(e, "strerror", None) or str(e)


def to_mono(samples: np.ndarray) -> np.ndarray:
    """``(channels, n)`` -> ``(n,)``, the mean of the channels."""
    return samples.mean(axis=0, dtype=np.float32) if samples.shape[0] > 1 else samples[0]


def resample(wave: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Mono ``(n,)`` at ``rate`` -> ``(m,)`` at ``target`` with libswresample (PyAV)."""
    if rate == target:
        return wave
    import av

    resampler = av.AudioResampler(format="flt", layout="mono", rate=target)
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(wave, dtype=np.float32)[None, :], format="flt",
                                       layout="mono")
    frame.sample_rate = rate
    out = [f.to_ndarray()[0] for f in resampler.resample(frame)]
    out += [f.to_ndarray()[0] for f in resampler.resample(None)]  # flush the filter's tail
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def cut(wave: np.ndarray, length: int, windows: bool) -> tuple[list[np.ndarray], list[str]]:
    """``wave`` -> clips of exactly ``length`` samples, and the flags saying what was done.

    Shorter: zero-padded. Longer: the start kept, or, with ``windows``, consecutive windows (the
    last one padded; a remainder under a tenth of a clip is dropped).
    """
    n = len(wave)
    flags = []
    if n > length and windows:
        # a last piece under a tenth of a clip (an encoder's padding, a trailing click) is dropped
        count = n // length + (n % length >= max(1, length // 10))
        clips = [wave[k * length:(k + 1) * length] for k in range(count)]
        dropped = n - count * length if n > count * length else 0
        flags.append(f"windowed: {n} samples -> {count} windows of {length}"
                     + (f", the last {dropped} dropped" if dropped else ""))
    elif n > length:
        clips = [wave[:length]]
        flags.append(f"cropped: {n} samples -> {length} (the start kept)")
    else:
        clips = [wave]
        if n < length:
            flags.append(f"padded: {n} samples -> {length} (zeros at the end)")
    clips = [np.pad(c, (0, length - len(c))) if len(c) < length else c for c in clips]
    return clips, flags


@dataclass
class Clip:
    """One decoded (or failed) file: its windows' features, or the reason it failed."""

    id: str
    path: str
    ids: list = field(default_factory=list)  # cache ids, in the order of the rows of ``features``
    features: dict | None = None  # name -> (windows, ...) array, the feature extractor's output
    flags: list = field(default_factory=list)
    reason: str | None = None
    seconds: dict = field(default_factory=dict)  # read, decode, resample, features


class AudioDataset(Dataset):
    """Map-style dataset over refs; each item is a :class:`Clip`, never an exception.

    Args:
        refs: the files, in order.
        sample_rate: the encoder's rate.
        clip_samples: samples per clip.
        windows: keep every window of a long file instead of its start.
        features: callable ``(list of (clip_samples,) arrays) -> {name: (n, ...) array}`` (the
            loaded model's feature extractor).
    """

    def __init__(self, refs: list[ImageRef], sample_rate: int, clip_samples: int, windows: bool, features):
        self.refs = refs
        self.sample_rate = sample_rate
        self.clip_samples = clip_samples
        self.windows = windows
        self.features = features

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int) -> Clip:
        ref = self.refs[index]
        clip = Clip(ref.id, ref.describe())
        t = time.perf_counter()
        try:
            data = read_bytes(ref)
            clip.seconds["read"] = time.perf_counter() - t
            clip.features, clip.ids, clip.flags = self.load(data, ref.id, clip.seconds)
        except FileNotFoundError:
            clip.reason = "file not found"
        except IsADirectoryError:
            clip.reason = "a directory, not an audio file"
        except BadAudio as e:
            clip.reason = str(e)
        except OSError as e:
            clip.reason = f"cannot read: {e.strerror or e}"
        except Exception as e:  # a file no decoder step anticipated: reported and counted, never fatal
            clip.reason = f"unexpected {type(e).__name__} while decoding: {e}"
        return clip

    def load(self, data: bytes, source_id: str, seconds: dict) -> tuple[dict, list, list]:
        """Bytes -> (features, cache ids, flags)."""
        t = time.perf_counter()
        samples, rate = decode_audio(data)
        channels = samples.shape[0]
        wave = to_mono(samples)
        t, seconds["decode"] = time.perf_counter(), time.perf_counter() - t
        wave = resample(wave, rate, self.sample_rate)
        t, seconds["resample"] = time.perf_counter(), time.perf_counter() - t
        flags = []
        if rate != self.sample_rate:
            flags.append(f"resampled: {rate} Hz -> {self.sample_rate} Hz")
        if channels != 1:
            flags.append(f"downmixed: {channels} channels -> mono")
        if not len(wave) or float(np.abs(wave).max()) < SILENCE_PEAK:
            flags.append("silent: peak below -80 dBFS")
        clips, cut_flags = cut(wave, self.clip_samples, self.windows)
        flags += cut_flags
        features = self.features(clips)
        seconds["features"] = time.perf_counter() - t
        ids = [window_id(source_id, k) for k in range(len(clips))] if self.windows else [source_id]
        if len(ids) > 1:  # window 0 last: it is the resume marker, so its commit implies the others'
            order = list(range(1, len(ids))) + [0]
            ids = [ids[k] for k in order]
            features = {name: v[order] for name, v in features.items()}
        return features, ids, flags


@dataclass
class ClipBatch:
    """Features of the clips of one batch (all windows), the failures and the flags."""

    ids: list = field(default_factory=list)
    inputs: dict | None = None  # name -> (B', ...) tensor
    failed: list = field(default_factory=list)  # [{"id", "path", "reason"}]
    flagged: list = field(default_factory=list)  # [{"id", "path", "outcome", "flags", ("ids")}]
    sources: int = 0
    decode_s: float = 0.0
    seconds: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.sources

    def pin_memory(self):
        if self.inputs is not None:
            self.inputs = {k: v.pin_memory() for k, v in self.inputs.items()}
        return self


def collate_clips(clips: list[Clip]) -> ClipBatch:
    """Concatenate the clips' windows; list failures with their reasons and flags with their ids."""
    batch = ClipBatch(sources=len(clips))
    parts = []
    for c in clips:
        for k, v in c.seconds.items():
            batch.seconds[k] = batch.seconds.get(k, 0.0) + v
        if c.reason is not None:
            batch.failed.append({"id": c.id, "path": c.path, "reason": c.reason})
            continue
        batch.ids += c.ids
        parts.append(c.features)
        if c.flags:
            entry = {"id": c.id, "path": c.path, "outcome": "embedded", "flags": c.flags}
            if c.ids != [c.id]:
                entry["ids"] = sorted(c.ids, key=lambda i: int(i.rsplit(WINDOW_SEP, 1)[1]))
            batch.flagged.append(entry)
    batch.decode_s = sum(batch.seconds.values())
    if parts:
        batch.inputs = {k: torch.from_numpy(np.concatenate([p[k] for p in parts])) for k in parts[0]}
    return batch
