"""Official Direct3D-S2 parameter names <-> d3ds2 names, with the tensor reshapes between them.

One explicit rule table per model kind, matched on d3ds2 state-dict names (never on module classes). A rule
gives the official name and a :class:`Layout` (how the tensor is stored there):

* ``same``: identical name and tensor (dense models and refiners, every Linear / norm / PE buffer);
* ``subm``: a torchsparse submanifold conv ``X.conv.kernel`` [k³, Cin, Cout] <-> our ``X.weight``
  [Cout, Cin, k, k, k]. torchsparse lists odd-kernel offsets with x fastest (its MinkowskiEngine-compatible
  order: index = (dz + 1) k² + (dy + 1) k + (dx + 1)) and pairs output u with input u + offset, as our
  :class:`~d3ds2.sparse.SubMConv3d` (cross-correlation) does;
* ``pointwise``: a 1x1 torchsparse conv kernel [Cin, Cout] <-> our [Cout, Cin, 1, 1, 1];
* ``linear_t``: a 1x1 torchsparse conv kernel [Cin, Cout] <-> our Linear weight [Cout, Cin].
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Entry:
    """One tensor: our name, the official name, and the official storage layout."""

    ours: str
    official: str
    layout: str

    def official_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Official shape of a tensor of our ``shape``."""
        if self.layout == "subm":
            cout, cin, k = shape[0], shape[1], shape[2]
            return (k**3, cin, cout)
        if self.layout == "pointwise":
            return (shape[1], shape[0])
        if self.layout == "linear_t":
            return (shape[1], shape[0])
        return tuple(shape)

    def to_official(self, t: torch.Tensor) -> torch.Tensor:
        if self.layout == "subm":
            cout, cin, k = t.shape[0], t.shape[1], t.shape[2]
            return t.permute(4, 3, 2, 1, 0).reshape(k**3, cin, cout).contiguous()
        if self.layout == "pointwise":
            return t.reshape(t.shape[0], t.shape[1]).t().contiguous()
        if self.layout == "linear_t":
            return t.t().contiguous()
        return t

    def to_ours(self, t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Official tensor -> ours, of our ``shape``."""
        if self.layout == "subm":
            k, (cin, cout) = shape[2], t.shape[1:]
            return t.reshape(k, k, k, cin, cout).permute(4, 3, 2, 1, 0)
        if self.layout in ("pointwise", "linear_t"):
            return t.t().reshape(shape)
        return t


# (pattern on our name, official name template, layout); the first matching rule wins, unmatched names are 'same'
_SPARSE_VAE_RULES = (
    (r"(encoder\.downsample\.\d+\.out_layers\.[03])\.weight", r"\1.conv.kernel", "subm"),
    (r"(encoder\.downsample\.\d+\.out_layers\.[03])\.bias", r"\1.conv.bias", "same"),
    (r"(encoder\.downsample\.\d+\.skip_connection)\.weight", r"\1.conv.kernel", "pointwise"),
    (r"(encoder\.downsample\.\d+\.skip_connection)\.bias", r"\1.conv.bias", "same"),
    (r"(decoder\.upsample\.\d+\.(?:act|out)_layers\.0)\.weight", r"\1.conv.kernel", "subm"),
    (r"(decoder\.upsample\.\d+\.(?:act|out)_layers\.0)\.bias", r"\1.conv.bias", "same"),
)
_CMP = r"(blocks\.\d+\.self_attn\.compression_(?:key|value))"
_SPARSE_DIT_RULES = (
    (_CMP + r"\.proj\.weight", r"\1.act_layers.0.conv.kernel", "linear_t"),  # v1
    (_CMP + r"\.proj\.bias", r"\1.act_layers.0.conv.bias", "same"),
    (_CMP + r"\.norm1\.(weight|bias)", r"\1.act_layers.0.\2", "same"),  # v2
    (_CMP + r"\.conv1\.weight", r"\1.out_layers.0.conv.kernel", "subm"),
    (_CMP + r"\.conv1\.bias", r"\1.out_layers.0.conv.bias", "same"),
    (_CMP + r"\.norm2\.(weight|bias)", r"\1.out_layers.1.\2", "same"),
    (_CMP + r"\.conv2\.weight", r"\1.out_layers.3.conv.kernel", "subm"),
    (_CMP + r"\.conv2\.bias", r"\1.out_layers.3.conv.bias", "same"),
)
RULES = {"dense_vae": (), "dense_dit": (), "sparse_vae": _SPARSE_VAE_RULES, "sparse_dit": _SPARSE_DIT_RULES,
         "refiner": (), "refiner_1024": ()}


def key_map(kind: str, ours: dict[str, torch.Tensor]) -> list[Entry]:
    """Entries for every tensor of our state dict ``ours`` (names -> tensors or shapes) of a ``kind`` model."""
    if kind not in RULES:
        raise ValueError(f"no key map for model kind {kind!r}; kinds: {sorted(RULES)}")
    compiled = [(re.compile(p + r"\Z"), t, lay) for p, t, lay in RULES[kind]]
    entries = []
    for name in ours:
        for pat, template, layout in compiled:
            m = pat.match(name)
            if m:
                entries.append(Entry(name, m.expand(template), layout))
                break
        else:
            entries.append(Entry(name, name, "same"))
    return entries


def shape_of(t) -> tuple[int, ...]:
    return tuple(t.shape) if hasattr(t, "shape") else tuple(t)
