"""What a per-model profile holds, one typed schema per kind.

Some methods need facts measured once per model (which heads retrieve, which RoPE frequency chunks dominate):
a *profile*. Its file (JSON, read and written by :mod:`tokensieve.adapters.profiles`, made by the
``profile`` commands of the lab) carries the measurement as plain data; the classes here are what a method sees,
validated when the file is read so that a malformed profile fails before any work, with the field that is wrong.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import ConfigError


def _ints(x: Any, what: str) -> tuple[int, ...]:
    if not isinstance(x, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in x):
        raise ConfigError(f"{what} must be a list of whole numbers.")
    return tuple(int(v) for v in x)


def _floats(x: Any, what: str) -> tuple[float, ...]:
    if not isinstance(x, (list, tuple)) or not all(isinstance(v, (int, float)) for v in x):
        raise ConfigError(f"{what} must be a list of numbers.")
    return tuple(float(v) for v in x)


@dataclass(frozen=True)
class ProfileData:
    """Base of the typed profile contents; ``kind`` names the file kind it is read from."""

    kind: ClassVar[str] = ""
    # the command that makes this kind of profile for a model ({model}: the model's name or folder)
    command: ClassVar[str] = "tokensieve profile {kind} --model {model}"
    trained: ClassVar[bool] = False  # holds trained weights (a learned method's), made by `tokensieve train`

    @classmethod
    def make_command(cls, model: str = "<model>") -> str:
        return cls.command.format(kind=cls.kind, model=model)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], shape: Any) -> ProfileData:
        """Validate a profile file's ``data`` table against the model's shape (a ``ModelShape``)."""
        raise NotImplementedError


@dataclass(frozen=True)
class RetrievalHeads(ProfileData):
    """Retrieval heads (RazorAttention): KV heads ranked by echo / induction scores.

    Attributes:
        ranked: ``(layer, kv_head)`` pairs, most retrieval-like first (every head once).
        count: how many of the ranked heads are retrieval heads.
    """

    kind: ClassVar[str] = "retrieval-heads"
    ranked: tuple[tuple[int, int], ...]
    count: int

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], shape: Any) -> RetrievalHeads:
        what = f"The '{cls.kind}' profile"
        ranked = tuple(_ints(pair, f"{what}: each entry of 'ranked'") for pair in data.get("ranked", ()))
        if not ranked or any(len(p) != 2 for p in ranked):
            raise ConfigError(f"{what} needs 'ranked': a list of [layer, kv_head] pairs.")
        if any(not (0 <= p[0] < shape.num_layers and 0 <= p[1] < shape.num_kv_heads) for p in ranked):
            raise ConfigError(f"{what} names a head outside the model's {shape.num_layers} x {shape.num_kv_heads}.")
        count = data.get("count")
        if not isinstance(count, int) or not 0 <= count <= len(ranked):
            raise ConfigError(f"{what} needs 'count': a whole number of heads in [0, {len(ranked)}].")
        return cls(tuple((p[0], p[1]) for p in ranked), count)


@dataclass(frozen=True)
class SemanticHeads(ProfileData):
    """CompressKV's calibration: semantic retrieval query heads per layer, and per-layer eviction error scores.

    Attributes:
        srh: per layer, query heads ranked best first.
        layer_score: per layer, the L1-normalised eviction error (larger: the layer gets a larger budget).
    """

    kind: ClassVar[str] = "compresskv"
    srh: tuple[tuple[int, ...], ...]
    layer_score: tuple[float, ...]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], shape: Any) -> SemanticHeads:
        what = f"The '{cls.kind}' profile"
        srh = tuple(_ints(row, f"{what}: each row of 'srh'") for row in data.get("srh", ()))
        score = _floats(data.get("layer_score", ()), f"{what}: 'layer_score'")
        if len(srh) != shape.num_layers or len(score) != shape.num_layers:
            raise ConfigError(f"{what} needs 'srh' and 'layer_score' for each of the {shape.num_layers} layers.")
        if any(not 0 <= h < shape.num_q_heads for row in srh for h in row):
            raise ConfigError(f"{what}: 'srh' names a query head outside 0..{shape.num_q_heads - 1}.")
        return cls(srh, score)


@dataclass(frozen=True)
class FrequencyChunks(ProfileData):
    """FASA's calibration: contextual agreement of every RoPE frequency chunk, per top-K size.

    Attributes:
        ks: the top-K sizes measured.
        ca: ``ca[k][layer][kv_head][chunk]`` agreement in [0, 1], ``head_dim / 2`` chunks.
    """

    kind: ClassVar[str] = "fasa"
    ks: tuple[int, ...]
    ca: tuple[tuple[tuple[tuple[float, ...], ...], ...], ...]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], shape: Any) -> FrequencyChunks:
        what = f"The '{cls.kind}' profile"
        ks = _ints(data.get("ks", ()), f"{what}: 'ks'")
        raw = data.get("ca", ())
        if not ks or not isinstance(raw, (list, tuple)) or len(raw) != len(ks):
            raise ConfigError(f"{what} needs 'ks' and one 'ca' table per K.")
        ca = tuple(tuple(tuple(_floats(head, f"{what}: 'ca'") for head in layer) for layer in table) for table in raw)
        want = (shape.num_layers, shape.num_kv_heads, shape.head_dim // 2)
        for table in ca:
            if (
                len(table) != want[0]
                or any(len(layer) != want[1] for layer in table)
                or any(len(head) != want[2] for layer in table for head in layer)
            ):
                raise ConfigError(f"{what}: each 'ca' table must be layers x KV heads x chunks = {want}.")
        return cls(ks, ca)


@dataclass(frozen=True)
class DuoGates(ProfileData):
    """DuoAttention's calibration: one gate per (layer, KV head), optimised so that ``α·full + (1 − α)·streaming``
    attention reproduces the full model.

    Attributes:
        gates: ``gates[layer][kv_head]`` in [0, 1]; near 1: a retrieval head (needs the whole cache).
        sink, recent: the streaming window the gates were optimised for.
    """

    kind: ClassVar[str] = "duo"
    trained: ClassVar[bool] = True
    gates: tuple[tuple[float, ...], ...]
    sink: int
    recent: int

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], shape: Any) -> DuoGates:
        what = f"The '{cls.kind}' profile"
        gates = tuple(_floats(row, f"{what}: each row of 'gates'") for row in data.get("gates", ()))
        if len(gates) != shape.num_layers or any(len(row) != shape.num_kv_heads for row in gates):
            raise ConfigError(f"{what} needs 'gates': layers x KV heads = {shape.num_layers} x {shape.num_kv_heads}.")
        if any(not 0.0 <= g <= 1.0 for row in gates for g in row):
            raise ConfigError(f"{what}: every gate must be in [0, 1].")
        sink, recent = data.get("sink"), data.get("recent")
        if not isinstance(sink, int) or not isinstance(recent, int) or sink < 0 or recent < 1:
            raise ConfigError(f"{what} needs 'sink' >= 0 and 'recent' >= 1: the window the gates were made for.")
        return cls(gates, sink, recent)


@dataclass(frozen=True)
class HeadPatterns(ProfileData):
    """MInference's offline search: one sparse pattern per (layer, query head).

    Attributes:
        patterns: ``patterns[layer][q_head] = (kind, v, s)``: ``("vs", vertical tokens, slash tokens)``,
            ``("a", sink tokens, local tokens)`` or ``("block", key blocks per query block, 0)``.
    """

    kind: ClassVar[str] = "minference"
    patterns: tuple[tuple[tuple[str, int, int], ...], ...]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], shape: Any) -> HeadPatterns:
        what = f"The '{cls.kind}' profile"
        raw = data.get("patterns", ())
        if (
            not isinstance(raw, (list, tuple))
            or len(raw) != shape.num_layers
            or any(not isinstance(row, (list, tuple)) or len(row) != shape.num_q_heads for row in raw)
        ):
            raise ConfigError(
                f"{what} needs 'patterns': layers x query heads = {shape.num_layers} x {shape.num_q_heads}."
            )
        out = []
        for row in raw:
            heads = []
            for p in row:
                if not isinstance(p, (list, tuple)) or len(p) != 3 or p[0] not in ("vs", "a", "block"):
                    raise ConfigError(f"{what}: each head is [kind, v, s] with kind 'vs', 'a' or 'block'; got {p!r}.")
                v, s = _ints(p[1:], f"{what}: a head's [v, s]")
                if v < 0 or s < 0:
                    raise ConfigError(f"{what}: a head's v and s must be >= 0; got {p!r}.")
                heads.append((str(p[0]), v, s))
            out.append(tuple(heads))
        return cls(tuple(out))


PROFILE_KINDS: dict[str, type[ProfileData]] = {
    c.kind: c for c in (RetrievalHeads, SemanticHeads, FrequencyChunks, DuoGates, HeadPatterns)
}
