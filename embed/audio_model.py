"""The frozen audio encoder of stage 1, from transformers: hub id, local folder or a shipped name.

The default is the AudioSet-finetuned Audio Spectrogram Transformer
(``MIT/ast-finetuned-audioset-10-10-0.4593``, Gong et al. 2021): trained on AudioSet, the source
of the audio-visual sets the thesis names (VGGSound, AudioSet, VALOR), and its output is patch
tokens of a ViT-B/16 (768 wide, 16x16 spectrogram patches): 1214x768 for 10 s once its two prefix
tokens (cls and distillation) are dropped, as the ViT's class token is. The others are accepted by
their config's ``model_type``:

============================  ==================================  ==============================
model_type                    model                               tokens
============================  ==================================  ==============================
audio-spectrogram-transformer ``ASTModel``                        patch tokens, 2 prefix dropped
whisper                       ``WhisperModel``'s encoder          1500 frames per 30 s
wav2vec2, hubert, wavlm       the model's ``last_hidden_state``   one frame per 20 ms
clap, clap_audio_model        ``ClapModel.audio_model`` (HTSAT)   the last Swin stage's grid
============================  ==================================  ==============================

The feature extractor (``AutoFeatureExtractor``: log-mel filterbanks, or normalised samples for
wav2vec2) runs either in the DataLoader workers, one call per file (all its windows at once), in
parallel with the forward pass: the choice with CUDA, where the main process must only feed the GPU;
or on each batch in the main process, the workers only decoding: the choice on the CPU, where with a
small encoder the workers (one per spare core) otherwise become the bottleneck
(``--features-on``; bench/embed_audio_bench.py measures both).
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import EmbedConfig
from .errors import ModelError
from .model import state_dict_hash

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).parent / "weights"
# Registered short names -> folders shipped with the package (save_pretrained: config.json,
# model.safetensors, preprocessor_config.json).
SHIPPED = {"ast_sounds_demo": WEIGHTS_DIR / "ast_sounds_demo"}
KINDS = {"audio-spectrogram-transformer": "ast", "whisper": "whisper", "wav2vec2": "wav2vec2",
         "hubert": "wav2vec2", "wavlm": "wav2vec2", "clap": "clap", "clap_audio_model": "clap"}
_INPUTS = {"ast": ("input_values",), "whisper": ("input_features",), "wav2vec2": ("input_values",),
           "clap": ("input_features", "is_longer")}
_PREFIX = {"ast": 2}  # cls + distillation tokens
_DEFAULT_SECONDS = 10.0  # AudioSet's clip length, for encoders without a natural one


class FeatureFn:
    """Clips ``[(samples,) float32]`` -> ``{input name: (n, ...) array}``, the feature extractor's
    own output; a module-level class so DataLoader workers can receive it."""

    def __init__(self, extractor, sample_rate: int, keys: tuple):
        self.extractor = extractor
        self.sample_rate = sample_rate
        self.keys = keys

    def __call__(self, clips: list) -> dict:
        out = self.extractor(clips, sampling_rate=self.sample_rate, return_tensors="np")
        return {k: np.asarray(out[k], dtype=np.bool_ if k == "is_longer" else np.float32) for k in self.keys}


class Waveforms:
    """Clips -> ``{"waveform": (n, samples)}``: the dataset's output when the feature extractor runs
    on the batch (``--features-on batch``) instead of in the workers."""

    def __call__(self, clips: list) -> dict:
        return {"waveform": np.stack(clips).astype(np.float32, copy=False)}


@dataclass
class LoadedAudioModel:
    """An audio encoder ready to embed, with everything the cache's metadata records about it.

    Attributes:
        model: the encoder module, in eval mode, on its device.
        kind: ``ast``, ``whisper``, ``wav2vec2`` or ``clap``.
        source: the hub id or folder it was loaded from.
        weights: ``pretrained:<source>`` or ``random``.
        weights_hash: sha256 of the loaded state dict.
        extractor: the transformers feature extractor.
        sample_rate: the encoder's sample rate.
        clip_seconds: the fixed clip length.
        windows: whether long files become several windows.
        layer: None for the final output, else the index into ``hidden_states``.
        token_shape: ``(tokens, dim)`` of one clip.
    """

    model: torch.nn.Module
    kind: str
    source: str
    weights: str
    weights_hash: str
    extractor: object
    sample_rate: int
    clip_seconds: float
    windows: bool
    layer: int | None
    token_shape: tuple = ()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def clip_samples(self) -> int:
        return round(self.clip_seconds * self.sample_rate)

    @property
    def features(self) -> FeatureFn:
        return FeatureFn(self.extractor, self.sample_rate, _INPUTS[self.kind])

    def tokens_description(self) -> str:
        where = "last_hidden_state" if self.layer is None else f"hidden_states[{self.layer}]"
        return where + (f", {_PREFIX[self.kind]} prefix tokens dropped" if self.kind in _PREFIX else "")

    def extractor_settings(self) -> dict:
        """The feature extractor's scalar settings (mel bins, lengths, normalisation), JSON-ready."""
        d = self.extractor.to_dict()
        keep = {k: v for k, v in d.items() if k != "processor_class" and
                (isinstance(v, (str, int, float, bool)) or v is None)}
        return json.loads(json.dumps(keep))

    def identity(self) -> dict:
        """Producer fields that decide the values: a cache differing in any of them is refused."""
        return json.loads(json.dumps({
            "modality": "audio", "model": f"{self.kind} ({type(self.model).__name__})",
            "weights_hash": self.weights_hash, "sample_rate": self.sample_rate,
            "clip_seconds": self.clip_seconds, "windows": self.windows, "layer": self.layer,
            "feature_extractor": self.extractor_settings(), "tokens": self.tokens_description()}))

    def forward_tokens(self, inputs: dict) -> torch.Tensor:
        """The feature extractor's output (tensors on the device) -> tokens ``(B, L, D)``."""
        hidden = self.layer is not None
        if self.kind == "clap":
            out = self.model(input_features=inputs["input_features"], is_longer=inputs["is_longer"])
            return out.last_hidden_state.flatten(2).transpose(1, 2)  # (B, D, H, W) -> (B, H*W, D)
        out = self.model(**inputs, output_hidden_states=hidden)
        y = out.hidden_states[self.layer] if hidden else out.last_hidden_state  # (B, P + L, D)
        return y[:, _PREFIX.get(self.kind, 0):]  # (B, L, D)


def resolve_source(name: str) -> str:
    """A shipped short name -> its folder; anything else (hub id, folder) as given.

    Raises:
        ModelError: a shipped name whose folder is not in this installation.
    """
    if name not in SHIPPED:
        return name
    folder = SHIPPED[name]
    if not (folder / "config.json").is_file():
        raise ModelError(f"--model {name}: not shipped with this installation (no {folder}/config.json)")
    return str(folder)


def _natural_seconds(kind: str, extractor) -> float:
    """The clip length the encoder was trained on (what its feature extractor pads or cuts to)."""
    if kind == "ast":  # max_length fbank frames at a 10 ms shift: 1024 -> 10.24 s, AudioSet's 10 s clips
        seconds = extractor.max_length / 100
        return float(int(seconds)) if seconds >= 1 else seconds
    if kind == "whisper":
        return float(extractor.n_samples / extractor.sampling_rate)
    if kind == "clap":
        return float(extractor.nb_max_samples / extractor.sampling_rate)
    return _DEFAULT_SECONDS


def _model_class(kind: str, model_type: str):
    import transformers as tf

    if kind == "clap":
        return tf.ClapAudioModel if model_type == "clap_audio_model" else tf.ClapModel
    return {"ast": tf.ASTModel, "whisper": tf.WhisperModel}.get(kind, tf.AutoModel)


def load_audio_model(config: EmbedConfig, device="cpu") -> LoadedAudioModel:
    """Load ``config.model`` and its feature extractor, on ``device``, in eval mode.

    Raises:
        ModelError: unknown name, unreachable hub, not an audio encoder, or settings it cannot take.
    """
    from transformers import AutoConfig, AutoFeatureExtractor

    source = resolve_source(config.model)
    try:
        hf_config = AutoConfig.from_pretrained(source)
        extractor = AutoFeatureExtractor.from_pretrained(source)
    except Exception as e:  # hub, offline, missing files, unknown model_type
        raise ModelError(f"--model {config.model}: cannot load its config and feature extractor "
                         f"({type(e).__name__}: {_first_line(e)}); without internet, save the model with "
                         "save_pretrained elsewhere and pass its folder") from None
    kind = KINDS.get(hf_config.model_type)
    if kind is None:
        raise ModelError(f"--model {config.model}: model_type {hf_config.model_type!r} is not an audio encoder "
                         f"this stage reads ({', '.join(sorted(KINDS))})")
    cls = _model_class(kind, hf_config.model_type)
    pretrained = config.pretrained is not False
    try:
        if pretrained:
            # float32 whatever the checkpoint's dtype (a float16 one would meet float32 features on
            # the CPU); CUDA runs use bf16 autocast (--precision)
            model = _quiet(config.progress, cls.from_pretrained, source, torch.float32)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                model = cls.from_config(hf_config) if cls.__name__ == "AutoModel" else cls(hf_config)
            log.warning("RANDOM WEIGHTS: %s is randomly initialised (seed %d), as --no-pretrained asks: its "
                        "embeddings carry no meaning.", config.model, config.seed)
    except Exception as e:
        raise ModelError(f"--model {config.model}: cannot load the weights ({type(e).__name__}: "
                         f"{_first_line(e)})") from None
    if kind == "whisper":
        model = model.get_encoder()
    elif kind == "clap" and hf_config.model_type == "clap":
        model = model.audio_model
    model.eval().requires_grad_(False)
    natural = _natural_seconds(kind, extractor)
    clip_seconds = float(config.clip_seconds) if config.clip_seconds is not None else natural
    if kind in ("ast", "whisper", "clap") and clip_seconds > natural + 0.5:
        raise ModelError(f"--clip-seconds {clip_seconds:g}: {config.model} reads at most {natural:g} s (its "
                         "feature extractor cuts the rest); add --windows to embed long files window by window")
    layer = _resolve_layer(model, kind, config.layer)
    loaded = LoadedAudioModel(model.to(device), kind, source,
                              f"pretrained:{Path(source).resolve() if Path(source).is_dir() else source}"
                              if pretrained else "random", state_dict_hash(model), extractor,
                              int(extractor.sampling_rate), clip_seconds, config.windows, layer)
    probe = loaded.features([np.zeros(loaded.clip_samples, dtype=np.float32)])
    try:
        with torch.inference_mode():
            tokens = loaded.forward_tokens({k: torch.from_numpy(v).to(device) for k, v in probe.items()})
    except Exception as e:  # a feature extractor and a model that do not fit each other
        raise ModelError(f"--model {config.model}: the model cannot read its feature extractor's output "
                         f"({type(e).__name__}: {_first_line(e)})") from None
    loaded.token_shape = tuple(tokens.shape[1:])
    return loaded


def _resolve_layer(model, kind: str, layer):
    if layer is None:
        return None
    if kind == "clap":
        raise ModelError(f"--layer {layer}: CLAP's audio tower is a Swin (stages of other shapes); leave "
                         "--layer out")
    n = model.config.num_hidden_layers if kind != "whisper" else model.config.encoder_layers
    if not -(n + 1) <= layer <= n:
        raise ModelError(f"--layer {layer}: the encoder has {n} layers (hidden_states 0..{n}, or "
                         f"-{n + 1}..-1)")
    return layer


def _quiet(progress: bool, load, source: str, dtype):
    """``load(source, dtype=dtype)`` without transformers' "Loading weights" bar unless ``progress``."""
    from transformers.utils import logging as hf_logging

    was_disabled = hf_logging.is_progress_bar_enabled() is False
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        return load(source, dtype=dtype)
    finally:
        if not progress and not was_disabled:
            hf_logging.enable_progress_bar()


def _first_line(e) -> str:
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
