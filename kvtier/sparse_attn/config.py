"""Per-head sparse patterns and the per-model JSON file that holds them.

A :class:`HeadPattern` says how one head's index is estimated for each input:

- ``a_shape``: ``sink`` and ``local`` tokens (fixed);
- ``vertical_slash``: ``vertical`` columns and ``slash`` diagonals (fixed counts), or ``mass``: the fewest
  columns and 64-offset diagonal bins, ranked together by estimated attention per cost, whose scores cover
  that share (adaptive; then ``vertical``/``slash``, if given, cap the counts: ``slash`` as ceil(slash / 64)
  bins);
- ``block_sparse``: ``blocks`` key blocks per query block (fixed), or ``mass`` (adaptive; ``blocks`` caps);
- ``dense``: every causal key (no fields): the head search keeps the few heads no sparse pattern serves well.

``pool: true`` (any kind but ``dense``) adds pooled keys: each key block a query block skips, fully visible to
it, joins its softmax as one mean key (``kvtier.kernels.index``). Off when absent. ``pool_shift`` (nats, with
``pool`` only) lowers the head's pooled logits, or raises them if negative: ``log(n_b) - pool_shift`` (0 when
absent).

A :class:`SparseConfig` holds one pattern per layer and query head of one model; ``to_json``/``load_config``
write and read it. ``kvtier/sparse_attn/configs/NAME.json`` ships with the package (``load_config(NAME)``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvtier.kernels.index import SparseAttentionError

KINDS = ("a_shape", "vertical_slash", "block_sparse", "dense")
CONFIG_DIR = Path(__file__).parent / "configs"


class SparseConfigError(SparseAttentionError):
    """A pattern or per-model config that is invalid or belongs to another model."""


@dataclass(frozen=True)
class HeadPattern:
    kind: str
    sink: int | None = None
    local: int | None = None
    vertical: int | None = None
    slash: int | None = None
    blocks: int | None = None
    mass: float | None = None
    pool: bool | None = None
    pool_shift: float | None = None

    def __post_init__(self) -> None:
        pooling = {"pool", "pool_shift"}
        allowed = {"a_shape": {"sink", "local"} | pooling, "vertical_slash": {"vertical", "slash", "mass"} | pooling,
                   "block_sparse": {"blocks", "mass"} | pooling, "dense": set()}
        if self.kind not in allowed:
            raise SparseConfigError(f"unknown sparse pattern {self.kind!r}; known patterns: {', '.join(KINDS)}")
        given = {k for k, v in asdict(self).items() if k != "kind" and v is not None}
        if given - allowed[self.kind]:
            raise SparseConfigError(f"pattern {self.kind!r} takes {sorted(allowed[self.kind])}, got {sorted(given)}")
        if self.pool is not None and not isinstance(self.pool, bool):
            raise SparseConfigError(f"{self.kind}.pool must be true or false, got {self.pool!r}")
        if self.pool_shift is not None and (not self.pool or isinstance(self.pool_shift, bool)
                                            or not isinstance(self.pool_shift, (int, float))
                                            or not math.isfinite(self.pool_shift)):
            raise SparseConfigError(f"{self.kind}.pool_shift must be a finite number on a pattern with pool: true, "
                                    f"got {self.pool_shift!r}")
        for name in given - {"mass"} - pooling:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise SparseConfigError(f"{self.kind}.{name} must be a non-negative integer, got {value!r}")
        if self.mass is not None and not 0.0 < self.mass <= 1.0:
            raise SparseConfigError(f"{self.kind}.mass must be in (0, 1], got {self.mass!r}")
        need = {"a_shape": ("sink", "local"), "vertical_slash": ("vertical", "slash"), "block_sparse": ("blocks",),
                "dense": ()}
        if self.mass is None and any(getattr(self, n) is None for n in need[self.kind]):
            raise SparseConfigError(f"pattern {self.kind!r} needs {list(need[self.kind])}"
                                    + ("" if self.kind == "a_shape" else " or mass"))

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict) -> "HeadPattern":
        if not isinstance(data, dict) or "kind" not in data:
            raise SparseConfigError(f"a head pattern must be an object with a 'kind', got {data!r}")
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise SparseConfigError(f"unknown head pattern fields {sorted(unknown)}")
        return cls(**data)

    def label(self) -> str:
        return self.kind + "(" + ", ".join(f"{k}={v}" for k, v in self.to_dict().items() if k != "kind") + ")"


@dataclass
class SparseConfig:
    """``layers[l][h]``: the pattern of query head ``h`` of layer ``l`` for model ``model``."""

    model: str
    num_heads: int
    layers: list[list[HeadPattern]]
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = [i for i, heads in enumerate(self.layers) if len(heads) != self.num_heads]
        if not self.layers or bad:
            raise SparseConfigError(f"config for {self.model!r}: every layer needs {self.num_heads} head patterns "
                                    f"(layers {bad[:5]} do not)" if bad else f"config for {self.model!r} has no layers")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def check_model(self, num_layers: int, num_heads: int, name: str = "the model") -> None:
        """Raise SparseConfigError unless this config has exactly this many layers and query heads."""
        if (self.num_layers, self.num_heads) != (num_layers, num_heads):
            raise SparseConfigError(
                f"the sparse config is for {self.model!r} ({self.num_layers} layers x {self.num_heads} heads); "
                f"{name} has {num_layers} layers x {num_heads} heads"
            )

    def to_json(self) -> str:
        data = {"model": self.model, "num_layers": self.num_layers, "num_heads": self.num_heads, "info": self.info,
                "layers": [[p.to_dict() for p in heads] for heads in self.layers]}
        return json.dumps(data, indent=1)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def from_json(cls, text: str) -> "SparseConfig":
        try:
            data = json.loads(text)
            layers = [[HeadPattern.from_dict(p) for p in heads] for heads in data["layers"]]
            config = cls(data["model"], int(data["num_heads"]), layers, data.get("info", {}))
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise SparseConfigError(f"not a kvtier sparse config: {exc!r}") from None
        if data.get("num_layers", config.num_layers) != config.num_layers:
            raise SparseConfigError(f"config says num_layers={data['num_layers']} but lists {config.num_layers}")
        return config


def load_config(name_or_path: str | Path) -> SparseConfig:
    """A shipped config by name (``"smollm2-135m"``) or a JSON file by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.json"
    if not path.exists():
        shipped = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise SparseConfigError(f"no sparse config {str(name_or_path)!r}; shipped configs: {shipped}")
    return SparseConfig.from_json(path.read_text())
