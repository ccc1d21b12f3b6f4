"""Video files -> T frames per clip through the timm ViT, decoded with PyAV in DataLoader workers.

Sampling: ``frames`` T spread uniformly over the clip (frame i is the one shown at
``(i + 0.5) * duration / T``), or with ``fps`` F the frames shown at ``0, 1/F, 2/F, ...`` from the
start, at most T; a clip with fewer distinct frames than T repeats frames (uniform) or its last
frame (fps) so every value has the same shape, and is flagged. Each frame goes through the image
path's own preprocessing (timm's PIL transform, :mod:`embed.model`).

Stored per clip: ``(T * N', D)``, frame-major (frame 0's N' tokens, then frame 1's, ...), where N'
is the patch tokens per frame, or what ``--frame-pool`` keeps of them: ``mean`` (1) or ``grid:K``
(K, adaptive average pooling of the patch grid), so a 10 s clip need not be 30 x 196 tokens.
"""

import io
import time
from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset

from .audio import av_reason
from .sources import ImageRef, read_bytes


class BadVideo(Exception):
    """A file that cannot be embedded as video; ``str(e)`` is the reason for the failures report."""


def sample_times(duration: float, frames: int) -> list[float]:
    """``frames`` instants spread evenly over ``duration`` seconds: the middle of each of T equal parts."""
    return [(i + 0.5) * duration / frames for i in range(frames)]


def decode_frames(data: bytes, frames: int, fps: float | None) -> tuple[list, list[str]]:
    """Encoded bytes -> ``frames`` RGB ``PIL.Image`` frames, and flags.

    Raises:
        BadVideo: empty, not a video, no video stream, truncated or corrupt.
    """
    import av

    if not data:
        raise BadVideo("empty file (0 bytes)")
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except av.error.FFmpegError as e:
        raise BadVideo(f"not a video, or truncated (no decoder recognises the data: {av_reason(e)})") from None
    with container:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["no"]
            raise BadVideo(f"no video stream (the file has {', '.join(kinds)} streams)")
        stream = container.streams.video[0]
        duration = _duration(container, stream)
        if fps is None and duration is None:  # uniform sampling needs the length: decode all, then pick
            picker = _Picker(None, frames, None)
            decoded = _decode(container, stream, picker, keep_all=True)
            picker.targets = sample_times(picker.duration(), frames)
            picker.replay()
        else:
            picker = _Picker(sample_times(duration, frames) if fps is None else
                             [i / fps for i in range(frames)], frames, fps)
            decoded = _decode(container, stream, picker)
    if not decoded:
        raise BadVideo("the video stream holds no frames")
    picks, images = picker.finish()
    flags = [picker.cut] if picker.cut else []
    if len(picks) < frames:
        flags.append(f"padded: {len(picks)} frames at {fps:g} fps, the last repeated to {frames}")
        picks += [picks[-1]] * (frames - len(picks))
    elif len(set(picks)) < frames:
        flags.append(f"short: {len(set(picks))} distinct frames for {frames}, frames repeated")
    return [images[k] for k in picks], flags


def _duration(container, stream) -> float | None:
    """The clip's length from the stream's or the container's header, if either gives it."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / 1_000_000  # av.time_base: microseconds
    return None


def _decode(container, stream, picker, keep_all: bool = False) -> int:
    """Decode every frame, handing each to ``picker``; returns the number of frames decoded."""
    import av

    n = 0
    try:
        for frame in container.decode(stream):
            t = float(frame.time) if frame.time is not None else n / float(stream.average_rate or 25)
            picker.add(t, frame, keep_all)
            n += 1
    except av.error.FFmpegError as e:
        if not n:
            raise BadVideo(f"truncated or corrupt video stream: {av_reason(e)}") from None
        picker.cut = f"truncated: the stream breaks after {n} frames ({av_reason(e)})"
    return n


class _Picker:
    """Keeps, of a stream of frames, the one on screen at each target instant (the last frame whose
    time is at or before it), converting only those to images: memory for T frames, not the clip."""

    def __init__(self, targets, frames: int, fps):
        self.targets = targets
        self.fps = fps
        self.picks, self.images, self.all = [], {}, []
        self.prev = None  # (index, relative time, frame)
        self.start = None
        self.step = 0.0
        self.cut = None

    def add(self, t: float, frame, keep_all: bool = False) -> None:
        if self.start is None:
            self.start = t
        t -= self.start
        index = self.prev[0] + 1 if self.prev else 0
        if self.prev and index == 1:
            self.step = t - self.prev[1]
        if keep_all:
            self.all.append((t, frame))
        else:
            while len(self.picks) < len(self.targets) and self.targets[len(self.picks)] < t:
                self._pick(*(self.prev or (index, t, frame)))
        self.prev = (index, t, frame)

    def _pick(self, index: int, t: float, frame) -> None:
        if index not in self.images:
            self.images[index] = frame.to_image()  # RGB PIL image
        self.picks.append(index)

    def duration(self) -> float:
        return self.prev[1] + self.step if self.prev and self.prev[0] else 1e-6

    def replay(self) -> None:
        frames, self.all, self.prev, self.start = self.all, [], None, None
        for t, frame in frames:
            self.add(t, frame)

    def finish(self) -> tuple[list, dict]:
        """``(picked frame indices, {index: image})``; in fps mode, instants past the clip are dropped."""
        end = self.duration()
        while len(self.picks) < len(self.targets):
            s = self.targets[len(self.picks)]
            if self.fps is not None and s >= end and self.picks:
                break
            self._pick(*self.prev)
        return self.picks, self.images


@dataclass
class VideoClip:
    """One decoded (or failed) video: ``(T, 3, H, W)`` uint8 frames, or the reason it failed."""

    id: str
    path: str
    pixels: torch.Tensor | None = None
    flags: list = field(default_factory=list)
    reason: str | None = None
    seconds: float = 0.0


class VideoDataset(Dataset):
    """Map-style dataset over refs; each item is a :class:`VideoClip`, never an exception.

    Args:
        refs: the files, in order.
        pil_transform: the PIL part of timm's eval transform (ends in a uint8 tensor).
        frames: T.
        fps: sample at this rate from the start instead of uniformly; None: uniformly.
    """

    def __init__(self, refs: list[ImageRef], pil_transform, frames: int, fps: float | None):
        self.refs = refs
        self.pil_transform = pil_transform
        self.frames = frames
        self.fps = fps

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int) -> VideoClip:
        ref = self.refs[index]
        clip = VideoClip(ref.id, ref.describe())
        t0 = time.perf_counter()
        try:
            images, clip.flags = decode_frames(read_bytes(ref), self.frames, self.fps)
            clip.pixels = torch.stack([self.pil_transform(im) for im in images])  # (T, 3, H, W) uint8
        except FileNotFoundError:
            clip.reason = "file not found"
        except IsADirectoryError:
            clip.reason = "a directory, not a video file"
        except BadVideo as e:
            clip.reason = str(e)
        except OSError as e:
            clip.reason = f"cannot read: {e.strerror or e}"
        except Exception as e:  # a file no decoder step anticipated: reported and counted, never fatal
            clip.reason = f"unexpected {type(e).__name__} while decoding: {e}"
        clip.seconds = time.perf_counter() - t0
        return clip


@dataclass
class VideoBatch:
    """Frames of the clips of one batch, the failures and the flags."""

    ids: list = field(default_factory=list)
    inputs: torch.Tensor | None = None  # (B, T, 3, H, W) uint8
    failed: list = field(default_factory=list)
    flagged: list = field(default_factory=list)
    sources: int = 0
    decode_s: float = 0.0

    def __len__(self) -> int:
        return self.sources

    def pin_memory(self):
        if self.inputs is not None:
            self.inputs = self.inputs.pin_memory()
        return self


def collate_videos(clips: list[VideoClip]) -> VideoBatch:
    batch = VideoBatch(sources=len(clips), decode_s=sum(c.seconds for c in clips))
    pixels = []
    for c in clips:
        if c.reason is not None:
            batch.failed.append({"id": c.id, "path": c.path, "reason": c.reason})
            continue
        batch.ids.append(c.id)
        pixels.append(c.pixels)
        if c.flags:
            batch.flagged.append({"id": c.id, "path": c.path, "outcome": "embedded", "flags": c.flags})
    if pixels:
        batch.inputs = torch.stack(pixels)  # (B, T, 3, H, W)
    return batch


def pool_frames(tokens: torch.Tensor, keep: int | None, grid: tuple | None) -> torch.Tensor:
    """Per-frame tokens ``(F, N, D)`` -> ``(F, N', D)``: all (None), their mean (1), or ``keep``
    tokens by adaptive average pooling of the ``grid`` (h, w) of patches to sqrt(keep) x sqrt(keep)."""
    if keep is None:
        return tokens
    if keep == 1:
        return tokens.mean(dim=1, keepdim=True)  # (F, 1, D)
    f, _, d = tokens.shape
    h, w = grid
    side = round(keep ** 0.5)
    x = tokens.transpose(1, 2).reshape(f, d, h, w)  # (F, D, h, w)
    x = torch.nn.functional.adaptive_avg_pool2d(x, side)  # (F, D, side, side)
    return x.flatten(2).transpose(1, 2)  # (F, side * side, D)
