"""Fusion and pooling specifications: where each modality joins the encoder, and how it is pooled.

A fusion spec maps encoder layers to the modalities that join there, in the thesis "Where to Fuse"
(Lund University, 2024) notation ``{0: ["question"], 6: ["image"]}``. Layer ``k`` means "before
encoder block ``k``"; ``k == num_layers`` means late fusion (appended to the encoder's output).

Three interchangeable forms:

- dict: ``{0: ["question"], 6: ["image"]}`` (JSON keys may be strings: ``{"0": [...]}``);
- CLI string: ``"0:question 6:image"``; several modalities at one layer with commas
  (``"0:question,image"``) or by repeating the layer (``"0:question 0:image"``);
- JSON: ``'{"0": ["question"], "6": ["image"]}'``.

A pool spec maps vector modalities to a pooling type and a target length; CLI form
``"image:attention:14 audio:mean:4"`` (``image:none`` keeps every token).

Everything here raises :class:`FusionSpecError` / :class:`PoolSpecError` (both ``ValueError``) with
a message that starts with the CLI flag form of the offending value.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

POOL_TYPES = ("none", "mean", "max", "attention")


class FusionConfigError(ValueError):
    """Base class of every configuration error raised by ``fuse``."""


class FusionSpecError(FusionConfigError):
    """An impossible or malformed ``--fuse`` specification."""


class PoolSpecError(FusionConfigError):
    """An impossible or malformed ``--pool`` specification."""


class DecoderDepthError(FusionConfigError):
    """An impossible ``--decoder-layers`` value."""


class FusionInputError(ValueError):
    """The inputs given to the model do not match its fusion spec."""


@dataclass(frozen=True)
class FusionSpec:
    """Which modalities join the encoder before which block.

    Attributes:
        layers: layer index -> modality names joining there, sorted by layer; names keep the
            given order, which is the order their tokens are concatenated in.
    """

    layers: tuple[tuple[int, tuple[str, ...]], ...]

    def __post_init__(self) -> None:
        seen: dict[str, int] = {}
        for layer, names in self.layers:
            if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
                raise FusionSpecError(f"--fuse {layer}:{','.join(names)}: a layer must be an integer >= 0")
            if not names:
                raise FusionSpecError(f"--fuse {layer}:: no modality given for layer {layer}")
            for name in names:
                word = isinstance(name, str) and name.replace("_", "a").replace("-", "a").isalnum()
                if not word:
                    raise FusionSpecError(f"--fuse {layer}:{name}: a modality name must be a non-empty word")
                if name in seen:
                    raise FusionSpecError(
                        f"--fuse {self}: modality '{name}' joins twice (layers {seen[name]} and {layer})"
                    )
                seen[name] = layer
        if not self.layers:
            raise FusionSpecError("--fuse '': at least one modality must join the encoder")

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_dict(cls, spec: Mapping[int | str, Iterable[str] | str]) -> FusionSpec:
        """Builds a spec from ``{layer: [modality, ...]}``; layers may be ints or digit strings."""
        if isinstance(spec, FusionSpec):
            return spec
        if not isinstance(spec, Mapping):
            raise FusionSpecError(f"--fuse {spec!r}: expected a mapping of layer -> modalities")
        merged: dict[int, list[str]] = {}
        for key, names in spec.items():
            layer = _parse_layer(key, f"{key}:{names}")
            if isinstance(names, str):
                names = [names]
            merged.setdefault(layer, []).extend(list(names))
        return cls(tuple((layer, tuple(merged[layer])) for layer in sorted(merged)))

    @classmethod
    def parse(cls, text: str) -> FusionSpec:
        """Parses the CLI form, e.g. ``"0:question 6:image"`` or ``"0:question,image 12:audio"``."""
        merged: dict[int, list[str]] = {}
        for item in text.replace(";", " ").split():
            layer_text, sep, names = item.partition(":")
            if not sep or not names:
                raise FusionSpecError(
                    f"--fuse {item}: expected LAYER:MODALITY[,MODALITY...], e.g. 0:question 6:image"
                )
            layer = _parse_layer(layer_text, item)
            merged.setdefault(layer, []).extend(n for n in names.split(",") if n)
        if not merged:
            raise FusionSpecError(f"--fuse {text!r}: at least one modality must join the encoder")
        return cls(tuple((layer, tuple(merged[layer])) for layer in sorted(merged)))

    @classmethod
    def from_json(cls, text: str) -> FusionSpec:
        """Parses the JSON form ``'{"0": ["question"], "6": ["image"]}'``."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise FusionSpecError(f"--fuse {text}: not valid JSON ({err.msg})") from err
        return cls.from_dict(data)

    @classmethod
    def coerce(cls, spec: FusionSpec | Mapping | str) -> FusionSpec:
        """Accepts any of the three forms (a string starting with ``{`` is JSON)."""
        if isinstance(spec, FusionSpec):
            return spec
        if isinstance(spec, str):
            return cls.from_json(spec) if spec.lstrip().startswith("{") else cls.parse(spec)
        return cls.from_dict(spec)

    # ----------------------------------------------------------------- views
    def to_dict(self) -> dict[str, list[str]]:
        """JSON-ready dict form (string keys), as stored in the model config."""
        return {str(layer): list(names) for layer, names in self.layers}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def __str__(self) -> str:
        return " ".join(f"{layer}:{','.join(names)}" for layer, names in self.layers)

    def as_mapping(self) -> dict[int, tuple[str, ...]]:
        """``{layer: (modality, ...)}`` with int keys."""
        return dict(self.layers)

    def modalities(self) -> tuple[str, ...]:
        """Every modality, in the order its tokens join."""
        return tuple(name for _, names in self.layers for name in names)

    def layer_of(self, name: str) -> int:
        for layer, names in self.layers:
            if name in names:
                return layer
        raise KeyError(name)

    def validate(
        self, num_layers: int, text_modalities: Iterable[str], vector_modalities: Iterable[str]
    ) -> None:
        """Checks the spec against an encoder of ``num_layers`` blocks and the declared modalities.

        Raises:
            FusionSpecError: a layer out of 0..num_layers, or a modality neither text nor vector.
        """
        text, vector = set(text_modalities), set(vector_modalities)
        for name in text & vector:
            raise FusionSpecError(
                f"--fuse {self}: modality '{name}' is declared both as text and as a vector"
            )
        for layer, names in self.layers:
            if layer > num_layers:
                raise FusionSpecError(
                    f"--fuse {layer}:{','.join(names)}: the encoder has {num_layers} layers (0..{num_layers})"
                )
            for name in names:
                if name not in text and name not in vector:
                    raise FusionSpecError(
                        f"--fuse {layer}:{name}: unknown modality '{name}'; text modalities: "
                        f"{sorted(text) or 'none'}, vector modalities (with a dimension): "
                        f"{sorted(vector) or 'none'}"
                    )


def _parse_layer(value: int | str, item: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        layer = value
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
        layer = int(value)
    else:
        raise FusionSpecError(f"--fuse {item}: the layer must be an integer, got {value!r}")
    if layer < 0:
        raise FusionSpecError(f"--fuse {item}: a layer must be >= 0")
    return layer


@dataclass(frozen=True)
class PoolSpec:
    """How one vector modality is pooled before it joins.

    Attributes:
        kind: one of ``none``, ``mean``, ``max``, ``attention``.
        length: the number of tokens after pooling (``None`` for ``none``).
    """

    kind: str = "none"
    length: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in POOL_TYPES:
            raise PoolSpecError(f"--pool {self}: unknown pooling '{self.kind}' ({', '.join(POOL_TYPES)})")
        if self.kind == "none":
            if self.length is not None:
                raise PoolSpecError(f"--pool {self}: pooling 'none' takes no length")
        elif not isinstance(self.length, int) or isinstance(self.length, bool) or self.length < 1:
            raise PoolSpecError(f"--pool {self}: pooling '{self.kind}' needs a length >= 1")

    def __str__(self) -> str:
        return self.kind if self.length is None else f"{self.kind}:{self.length}"

    def to_dict(self) -> dict[str, int | str | None]:
        return {"type": self.kind, "length": self.length}

    @classmethod
    def from_value(cls, value: PoolSpec | Mapping | str | tuple | list, name: str = "?") -> PoolSpec:
        """Accepts ``PoolSpec``, ``{"type": .., "length": ..}``, ``"attention:14"`` or ``("mean", 4)``."""
        if isinstance(value, PoolSpec):
            return value
        if isinstance(value, Mapping):
            kind, length = value.get("type", "none"), value.get("length")
        elif isinstance(value, str):
            kind, _, length_text = value.partition(":")
            try:
                length = int(length_text) if length_text else None
            except ValueError as err:
                raise PoolSpecError(f"--pool {name}:{value}: the length must be an integer") from err
        elif isinstance(value, (tuple, list)) and len(value) in (1, 2):
            kind, length = value[0], (value[1] if len(value) == 2 else None)
        else:
            raise PoolSpecError(f"--pool {name}:{value!r}: expected TYPE[:LENGTH]")
        try:
            return cls(str(kind), length)
        except PoolSpecError as err:
            raise PoolSpecError(str(err).replace("--pool ", f"--pool {name}:", 1)) from None


def parse_pools(text: str) -> dict[str, PoolSpec]:
    """Parses the CLI form ``"image:attention:14 audio:mean:4"`` into ``{modality: PoolSpec}``."""
    pools: dict[str, PoolSpec] = {}
    for item in text.replace(";", " ").split():
        name, sep, rest = item.partition(":")
        if not sep or not name or not rest:
            raise PoolSpecError(f"--pool {item}: expected MODALITY:TYPE[:LENGTH], e.g. image:attention:14")
        if name in pools:
            raise PoolSpecError(f"--pool {item}: modality '{name}' is pooled twice")
        pools[name] = PoolSpec.from_value(rest, name)
    return pools


def coerce_pools(pools: Mapping | str | None) -> dict[str, PoolSpec]:
    """Accepts the CLI string, JSON, or a mapping ``{modality: PoolSpec | dict | "type:len"}``."""
    if pools is None:
        return {}
    if isinstance(pools, str):
        if pools.lstrip().startswith("{"):
            try:
                pools = json.loads(pools)
            except json.JSONDecodeError as err:
                raise PoolSpecError(f"--pool {pools}: not valid JSON ({err.msg})") from err
        else:
            return parse_pools(pools)
    if not isinstance(pools, Mapping):
        raise PoolSpecError(f"--pool {pools!r}: expected a mapping of modality -> pooling")
    return {str(name): PoolSpec.from_value(value, str(name)) for name, value in pools.items()}


def pools_to_dict(pools: Mapping[str, PoolSpec]) -> dict[str, dict]:
    """JSON-ready form, as stored in the model config."""
    return {name: spec.to_dict() for name, spec in pools.items()}


def validate_pools(
    pools: Mapping[str, PoolSpec],
    vector_modalities: Iterable[str],
    lengths: Mapping[str, int] | None = None,
) -> None:
    """Checks that only vector modalities are pooled and never to more tokens than they have.

    Args:
        pools: ``{modality: PoolSpec}``.
        vector_modalities: the names of the vector modalities.
        lengths: known input lengths ``{modality: N}``; modalities absent here are checked at run time.

    Raises:
        PoolSpecError: pooling a text or unknown modality, or to a length above the input's.
    """
    vector = set(vector_modalities)
    for name, spec in pools.items():
        if name not in vector:
            raise PoolSpecError(
                f"--pool {name}:{spec}: '{name}' is not a vector modality "
                f"(vector modalities: {sorted(vector) or 'none'})"
            )
        if lengths and name in lengths and spec.length is not None and spec.length > lengths[name]:
            raise PoolSpecError(
                f"--pool {name}:{spec}: pooling to {spec.length} tokens "
                f"but '{name}' has {lengths[name]} tokens"
            )
