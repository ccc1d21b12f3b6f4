"""The frozen timm model of stage 1: weights, preprocessing and which tokens are kept.

Preprocessing is timm's own eval transform for the model (``resolve_data_config`` +
``create_transform``), split the way timm's prefetching loader splits it: the PIL part (resize,
centre crop, to uint8) runs in the DataLoader workers, and ``ToTensor``'s scaling and ``Normalize``
run on the whole batch on the device (the same operations in the same order, so the pixels equal
timm's unsplit transform's).

Tokens: ``forward_features`` (which ends with the final norm) with the ``num_prefix_tokens``
class/register tokens dropped: 196x768 for ViT-B/16 at 224. ``layer=k`` takes transformer block
k's output instead (no final norm, as LLaVA takes CLIP's ``hidden_states[-2]``) through timm's
``forward_intermediates``. Feature maps of convolutional models, ``(B, C, H, W)``, become
``(B, H*W, C)``.
"""

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import EmbedConfig
from .errors import ModelError

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model ready to embed, with everything the cache's metadata records about it.

    Attributes:
        model: the timm model, in eval mode, on its device.
        name: the timm model name.
        create_kwargs: keyword arguments it was created with (besides ``pretrained``).
        weights: ``random``, ``pretrained:<hub id or model.tag>`` or ``checkpoint:<path>``.
        weights_hash: sha256 of the loaded state dict (names, dtypes, shapes and bytes).
        data_config: timm's resolved data config (input_size, interpolation, mean, std, crop).
        pil_transform: the PIL part of timm's eval transform; ends with a uint8 ``(3, H, W)`` tensor.
        layer: None for the final-norm tokens, else the block index.
        token_shape: ``(tokens, dim)`` of one image's output.
    """

    model: torch.nn.Module
    name: str
    create_kwargs: dict
    weights: str
    weights_hash: str
    data_config: dict
    pil_transform: object
    layer: int | None
    token_shape: tuple = ()

    @property
    def num_prefix_tokens(self) -> int:
        return int(getattr(self.model, "num_prefix_tokens", 0) or 0)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokens_description(self) -> str:
        if self.layer is not None:
            return f"block {self.layer} output (no final norm), prefix tokens dropped"
        return "final-norm, prefix tokens dropped"

    def preprocessing(self) -> dict:
        """The resolved timm data config, JSON-ready."""
        return _jsonable({k: self.data_config[k] for k in
                          ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")})

    def identity(self) -> dict:
        """Producer fields that decide the values: a cache differing in any of them is refused."""
        return _jsonable({
            "model": self.name,
            "model_kwargs": self.create_kwargs,
            "weights_hash": self.weights_hash,
            "preprocessing": self.preprocessing(),
            "tokens": self.tokens_description(),
        })

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` pixels in 0..255 (uint8 or float) -> the model's float input.

        The same operations as torchvision's ``ToTensor`` + ``Normalize``: /255, -mean, /std.
        """
        mean = torch.tensor(self.data_config["mean"], device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.data_config["std"], device=x.device).view(1, -1, 1, 1)
        return x.to(torch.float32).div_(255).sub_(mean).div_(std)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised pixels ``(B, 3, H, W)`` -> tokens ``(B, L, D)``."""
        if self.layer is not None:
            out = self.model.forward_intermediates(x, indices=[self.layer], norm=False, stop_early=True,
                                                   output_fmt="NLC", intermediates_only=True)
            return out[0]  # (B, L, D); forward_intermediates drops the prefix tokens itself
        y = self.model.forward_features(x)
        if y.ndim == 4:
            return y.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)
        return y[:, self.num_prefix_tokens:]  # (B, P + L, D) -> (B, L, D)


def load_model(config: EmbedConfig, device="cpu") -> LoadedModel:
    """Create ``config.model`` with its weights, on ``device``, in eval mode.

    Raises:
        ModelError: unknown model, unreachable hub, or a checkpoint that does not fit.
    """
    import timm
    from timm.data import create_transform, resolve_data_config

    from . import registry  # registers the project's own timm models (vit_shapes_patch16_48)

    name, kwargs = config.model, config.create_kwargs()
    if not timm.is_model(name):
        raise ModelError(f"--model {name}: timm has no such model (see timm.list_models())")
    pretrained = config.pretrained
    if pretrained is None:  # the default: weights that ship with the project, else random ones
        pretrained = not config.checkpoint and registry.shipped_weights(name) is not None
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)  # random init is reproducible: every process, every rerun
            model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:
        raise ModelError(f"--model-kwargs {json.dumps(config.model_kwargs)}: {name} does not accept them "
                         f"({e})") from None
    except Exception as e:  # the hub path raises many types (HTTP, offline, cache, timeout)
        if not pretrained:
            raise ModelError(f"--model {name}: timm could not create it ({type(e).__name__}: {e})") from None
        raise ModelError(f"--pretrained: cannot fetch the weights of {name} ({type(e).__name__}: {e}); "
                         "without internet, download them elsewhere and pass --checkpoint FILE") from None
    if config.checkpoint:
        _load_checkpoint(model, config.checkpoint, name)
        weights = f"checkpoint:{Path(config.checkpoint).resolve()}"
    elif pretrained:
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        tag = cfg.get("hf_hub_id") or ".".join(filter(None, [cfg.get("architecture", name), cfg.get("tag")]))
        weights = f"pretrained:{tag}"
    else:
        weights = "random"
        if config.pretrained is False:
            log.warning("RANDOM WEIGHTS: %s is randomly initialised (seed %d), as --no-pretrained asks: "
                        "its embeddings carry no meaning.", name, config.seed)
        else:
            log.warning("RANDOM WEIGHTS: %s is randomly initialised (seed %d): its embeddings carry no "
                        "meaning. Pass --pretrained or --checkpoint FILE for real ones.", name, config.seed)
    model.eval().requires_grad_(False)
    weights_hash = state_dict_hash(model)

    args = {"input_size": (3, config.img_size, config.img_size)} if config.img_size else {}
    data_config = resolve_data_config(args, model=model)
    pil_transform = create_transform(**data_config, is_training=False, use_prefetcher=True)
    loaded = LoadedModel(model.to(device), name, kwargs, weights, weights_hash, data_config, pil_transform,
                         _resolve_layer(model, config.layer))
    with torch.inference_mode():
        probe = torch.zeros(1, *data_config["input_size"], device=device)
        loaded.token_shape = tuple(loaded.forward_tokens(probe).shape[1:])
    return loaded


def _load_checkpoint(model, path: str, name: str) -> None:
    """Load a local state dict; safetensors or ``torch.load(weights_only=True)``, never unpickling.

    The architecture's own ``checkpoint_filter_fn`` is applied first, as timm does for pretrained
    weights: it resamples position embeddings to another ``--img-size``, for one.
    """
    import sys

    from timm.models import load_state_dict

    try:
        state_dict = load_state_dict(path, use_ema=True, weights_only=True)
    except Exception as e:  # safetensors header errors, UnpicklingError for pickled objects, ...
        raise ModelError(f"--checkpoint {path}: cannot read weights ({type(e).__name__}: {e})") from None
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state_dict = filter_fn(state_dict, model)
        except Exception as e:  # the filter's own assertions on foreign layouts
            raise ModelError(f"--checkpoint {path}: does not fit {name}: {type(e).__name__}: {e}") from None
    missing, unexpected = [], []
    try:
        result = model.load_state_dict(state_dict, strict=False)
        missing, unexpected = result.missing_keys, result.unexpected_keys
    except RuntimeError as e:  # shape mismatches
        raise ModelError(f"--checkpoint {path}: does not fit {name}: {_first_line(e)}") from None
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s), e.g. {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {', '.join(unexpected[:3])}")
        raise ModelError(f"--checkpoint {path}: does not fit {name}: {'; '.join(parts)} "
                         "(another model or --model-kwargs?)")


def _first_line(e) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return " ".join(lines[:3])


def _resolve_layer(model, layer):
    if layer is None:
        return None
    if not hasattr(model, "forward_intermediates") or not hasattr(model, "blocks"):
        raise ModelError(f"--layer {layer}: {type(model).__name__} has no transformer blocks to take "
                         "an output from (use a ViT-family model or leave --layer out)")
    n = len(model.blocks)
    if not -n <= layer < n:
        raise ModelError(f"--layer {layer}: the model has {n} blocks (-{n}..{n - 1})")
    return layer


def state_dict_hash(model: torch.nn.Module) -> str:
    """sha256 over the state dict's names, dtypes, shapes and raw bytes, in name order."""
    h = hashlib.sha256()
    for key, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return "sha256:" + h.hexdigest()


def _jsonable(x):
    """``x`` as it comes back from JSON (tuples -> lists), so stored and fresh values compare equal."""
    return json.loads(json.dumps(x))
