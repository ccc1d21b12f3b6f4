"""Synthetic beeps with learnable attributes: the sound half of the audio-visual shapes data
(:mod:`pipelines.data.avshapes`) and the training data of the demo audio encoder
(``scripts/demo_ast.py``).

A sound is ~1 s of 16 kHz mono audio holding 1 to 4 beeps of one voice at one pitch:

========= ====================================================================================
attribute values
========= ====================================================================================
count     1, 2, 3 or 4 beeps (70-120 ms each, 60-120 ms apart, starting anywhere that fits)
pitch     ``low`` (fundamental 220-330 Hz) or ``high`` (880-1320 Hz): two octaves apart
voice     the timbre, one per shape kind of the frames (:data:`VOICES`): ``circle`` a pure sine
          whistle; ``square`` a square-wave buzz (odd harmonics); ``triangle`` a sawtooth (every
          harmonic); ``diamond`` a chirp rising an octave within each beep; ``cross`` a burst of
          noise around the pitch that dies away fast (a click)
========= ====================================================================================

Besides the attributes, each sound varies in what a listener should ignore: loudness (peak 0.1 to
0.9), the fundamental within its range, beep lengths, gaps and onset, and a background hiss 25 to
55 dB under the peak. Every waveform is a function of its :class:`Sound` and a seed, so a dataset and
the encoder's training data draw from the same generator with different seeds.
"""

import math
import random
from dataclasses import dataclass

import numpy as np

SAMPLE_RATE = 16000
SECONDS = 1.0
COUNTS = (1, 2, 3, 4)
PITCHES = {"low": (220.0, 330.0), "high": (880.0, 1320.0)}
VOICES = ("circle", "square", "triangle", "diamond", "cross")  # the shape kinds of shapes.SHAPES
BEEP = (0.07, 0.12)  # seconds
GAP = (0.06, 0.12)
MAX_HARMONIC_HZ = 7000.0  # additive voices stop below Nyquist (8 kHz): no aliasing


@dataclass(frozen=True)
class Sound:
    """What a sound carries: its number of beeps, pitch name and voice (a shape kind)."""

    count: int
    pitch: str
    voice: str

    def __post_init__(self):
        if self.count not in COUNTS:
            raise ValueError(f"count {self.count}: choose one of {COUNTS}")
        if self.pitch not in PITCHES:
            raise ValueError(f"pitch {self.pitch!r}: choose one of {', '.join(PITCHES)}")
        if self.voice not in VOICES:
            raise ValueError(f"voice {self.voice!r}: choose one of {', '.join(VOICES)}")


def random_sound(rng: random.Random) -> Sound:
    """Attributes drawn uniformly and independently."""
    return Sound(rng.choice(COUNTS), rng.choice(list(PITCHES)), rng.choice(VOICES))


def _additive(t, f0, odd_only: bool):
    """A band-limited square (odd harmonics, 1/k) or sawtooth (every harmonic, 1/k) wave."""
    out = np.zeros_like(t)
    k = 1
    while k * f0 < MAX_HARMONIC_HZ:
        out += np.sin(2 * np.pi * k * f0 * t) / k
        k += 2 if odd_only else 1
    return out / (1.0 if odd_only else 1.5)


def _beep(voice: str, f0: float, n: int, noise: np.random.Generator) -> np.ndarray:
    """One beep of ``n`` samples, peak about 1."""
    t = np.arange(n) / SAMPLE_RATE
    if voice == "circle":
        wave = np.sin(2 * np.pi * f0 * t)
    elif voice in ("square", "triangle"):
        wave = _additive(t, f0, odd_only=voice == "square")
    elif voice == "diamond":  # frequency f0 -> 2 f0, exponential sweep
        dur = n / SAMPLE_RATE
        rate = math.log(2.0) / dur
        wave = np.sin(2 * np.pi * f0 * (np.exp(rate * t) - 1) / rate)
    else:  # cross: noise band-limited to about f0/2 around f0, shifted up by a carrier at f0
        white = noise.standard_normal(n + 64)
        width = max(2, int(SAMPLE_RATE / f0))  # moving average: low-pass at about f0 / 2
        low = np.convolve(white, np.ones(width) / width, mode="same")[32:32 + n]
        wave = low * np.sin(2 * np.pi * f0 * t)
        wave = wave / (np.abs(wave).max() + 1e-9)
        return wave * np.exp(-t / 0.025)  # a click: 25 ms decay
    attack, release = int(0.005 * SAMPLE_RATE), int(0.015 * SAMPLE_RATE)
    env = np.ones(n)
    env[:attack] = np.linspace(0, 1, attack)
    env[-release:] = np.minimum(env[-release:], np.linspace(1, 0, release))
    return wave / (np.abs(wave).max() + 1e-9) * env


def synthesize(sound: Sound, rng: random.Random) -> np.ndarray:
    """The waveform of ``sound`` (float32, ``SAMPLE_RATE * SECONDS`` samples, within -1..1), its
    nuisances (loudness, exact pitch, timing, hiss) drawn from ``rng``."""
    total = int(SAMPLE_RATE * SECONDS)
    noise = np.random.default_rng(rng.getrandbits(64))
    lo, hi = PITCHES[sound.pitch]
    f0 = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    beeps = [rng.uniform(*BEEP) for _ in range(sound.count)]
    gaps = [rng.uniform(*GAP) for _ in range(sound.count - 1)]
    span = sum(beeps) + sum(gaps)
    start = rng.uniform(0.03, SECONDS - 0.03 - span)
    out = np.zeros(total)
    for i, length in enumerate(beeps):
        a = int(start * SAMPLE_RATE)
        n = int(length * SAMPLE_RATE)
        out[a:a + n] += _beep(sound.voice, f0, n, noise)
        start += length + (gaps[i] if i < len(gaps) else 0.0)
    peak = rng.uniform(0.1, 0.9)
    hiss = peak * 10 ** (-rng.uniform(25, 55) / 20)
    out = peak * out + hiss * noise.standard_normal(total)
    return np.clip(out, -1.0, 1.0).astype(np.float32)
