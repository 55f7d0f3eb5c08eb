"""Typed configuration of an MMH-DiT and its named presets.

The defining trait of oboro is the *progressive head schedule*: few wide heads in early blocks
(global layout) and many narrow heads in late blocks (texture). Every block therefore has its own
head dim, so RoPE is split per block by ratio rather than by fixed sizes.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field


def head_schedule(depth: int, groups: tuple[int, ...] = (8, 16, 24, 48)) -> tuple[int, ...]:
    """Per-layer head counts: `groups` repeated in equal consecutive runs over `depth` layers.

    With depth not divisible by len(groups), the earlier groups get the extra layers, so the
    schedule never grows narrower with depth.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    base, extra = divmod(depth, len(groups))
    out: list[int] = []
    for i, h in enumerate(groups):
        out += [h] * (base + (1 if i < extra else 0))
    return tuple(out)


def parse_heads(spec: str, depth: int) -> tuple[int, ...]:
    """"8,16,24,48" -> equal groups over depth; a single "16" -> uniform; depth entries -> as is."""
    values = tuple(int(v) for v in spec.replace(" ", "").split(",") if v)
    if len(values) == depth:
        return values
    return head_schedule(depth, values)


@dataclass(frozen=True)
class OboroConfig:
    in_channels: int = 16          # FLUX VAE latent; 3 for a pixel-space model
    patch_size: int = 2            # pixel-unshuffle factor
    hidden_size: int = 1536
    depth: int = 32
    heads: tuple[int, ...] = field(default_factory=lambda: head_schedule(32))
    mlp_hidden: int = 4096         # SwiGLU inner size
    text_dim: int = 4096           # T5 v1.1 XXL hidden size
    adaln_dim: int = 1024          # timestep embedding width (Lumina: min(hidden, 1024))
    rope_theta: float = 10000.0
    rope_axes: tuple[int, int, int] = (2, 3, 3)  # ratio of head dim given to (text idx, row, col)
    norm_eps: float = 1e-5
    qk_norm: bool = True

    def __post_init__(self):
        object.__setattr__(self, "heads", tuple(int(h) for h in self.heads))
        object.__setattr__(self, "rope_axes", tuple(int(a) for a in self.rope_axes))
        self.validate()

    def validate(self) -> None:
        if self.in_channels < 1 or self.patch_size < 1:
            raise ValueError(f"in_channels and patch_size must be >= 1, got {self.in_channels}, {self.patch_size}")
        if len(self.heads) != self.depth:
            raise ValueError(f"heads lists {len(self.heads)} layers but depth is {self.depth}")
        if len(self.rope_axes) != 3:
            raise ValueError(f"rope_axes must have 3 entries (text, row, col), got {self.rope_axes}")
        for i, h in enumerate(self.heads):
            if h < 1 or self.hidden_size % h:
                raise ValueError(f"layer {i}: {h} heads do not divide hidden_size {self.hidden_size}")
            try:
                self.rope_dims(self.hidden_size // h)
            except ValueError as e:
                raise ValueError(f"layer {i} ({h} heads): {e}") from None

    def rope_dims(self, head_dim: int) -> tuple[int, int, int]:
        """Split a head dim over the 3 RoPE axes by `rope_axes`; each part must be even."""
        total = sum(self.rope_axes)
        dims = tuple(head_dim * a // total for a in self.rope_axes)
        if sum(dims) != head_dim or any(d % 2 for d in dims):
            raise ValueError(
                f"head dim {head_dim} cannot be split by rope_axes {self.rope_axes} into even parts "
                f"(got {dims}); use a head dim divisible by {2 * total}")
        return dims

    @property
    def head_dims(self) -> tuple[int, ...]:
        return tuple(self.hidden_size // h for h in self.heads)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "OboroConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown OboroConfig fields: {unknown}")
        return cls(**d)


PRESETS: dict[str, OboroConfig] = {
    # The paper's model: 32 blocks, 8 each of 8/16/24/48 heads -> head dims 192/96/64/32.
    "oboro-base-1b": OboroConfig(),
    # The paper's pilot size.
    "oboro-small": OboroConfig(hidden_size=768, depth=20, heads=head_schedule(20, (4, 8, 12, 24)),
                               mlp_hidden=2048, adaln_dim=768),
    # For tests and the CPU demo: same code paths, a few hundred thousand parameters.
    "tiny": OboroConfig(hidden_size=64, depth=4, heads=(1, 2, 2, 4), mlp_hidden=128, text_dim=32,
                        adaln_dim=64),
}


def preset(name: str, **overrides) -> OboroConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)
