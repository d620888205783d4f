"""Random sparse batches and dense references shared by the sparse-engine tests."""
from __future__ import annotations

import torch

from d3ds2.sparse import SparseTensor


def random_sparse(
    sizes: list[int], res: int, channels: int, generator: torch.Generator, dtype=torch.float64
) -> SparseTensor:
    """A batch with ``sizes[b]`` distinct random voxels in a res³ grid per sample (0 allowed)."""
    feats, coords = [], []
    for n in sizes:
        if n > res**3:
            raise ValueError(f"cannot place {n} distinct voxels in a {res}^3 grid")
        flat = torch.randperm(res**3, generator=generator)[:n]
        xyz = torch.stack([flat // (res * res), (flat // res) % res, flat % res], 1).int()
        coords.append(xyz)
        feats.append(torch.randn(n, channels, generator=generator, dtype=dtype))
    return SparseTensor.from_samples(feats, coords)


def shell(res: int, radius: float, thickness: float = 1.0, batch: int = 0) -> torch.Tensor:
    """[N, 4] int32 coords of a sphere shell of a res³ grid (a surface-like voxel set)."""
    g = torch.arange(res, dtype=torch.float32) + 0.5 - res / 2
    x, y, z = torch.meshgrid(g, g, g, indexing="ij")
    r = (x * x + y * y + z * z).sqrt()
    xyz = torch.nonzero((r - radius).abs() < thickness).int()
    return torch.cat([torch.full_like(xyz[:, :1], batch), xyz], 1)


def to_dense(x: SparseTensor, res: int) -> torch.Tensor:
    """Differentiable scatter of x into [B, C, res, res, res]."""
    c = x.coords.long()
    flat = ((c[:, 0] * res + c[:, 1]) * res + c[:, 2]) * res + c[:, 3]
    out = x.feats.new_zeros(x.batch_size * res**3, x.feats.shape[1])
    out = out.index_add(0, flat, x.feats)
    return out.view(x.batch_size, res, res, res, -1).permute(0, 4, 1, 2, 3)


def read_dense(dense: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Values of a dense [B, C, X, Y, Z] grid at coords [N, 4] -> [N, C]."""
    c = coords.long()
    return dense[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]]


def ssa_coords(gen: torch.Generator, shuffle: bool = True) -> torch.Tensor:
    """Two shells of different sizes and a sample made of one voxel (a single 1-token block), shuffled."""
    c = torch.cat([shell(10, 3.5, 0.7, 0), shell(6, 2.0, 0.6, 1), torch.tensor([[2, 5, 6, 7]], dtype=torch.int32)])
    return c[torch.randperm(len(c), generator=gen)] if shuffle else c


def assert_rel_close(a: torch.Tensor, b: torch.Tensor, tol: float = 2e-5) -> None:
    """||a - b|| / ||b|| < tol, in float64."""
    a, b = a.double(), b.double()
    err = (a - b).norm() / b.norm().clamp_min(1e-12)
    assert err < tol, f"relative error {err:.3g} >= {tol}"
