import math

import torch

from d3ds2.models.embeddings import AbsolutePositionEmbedder


def test_ape_layout_matches_formula():
    ape = AbsolutePositionEmbedder(1024, 3)
    pos = torch.randint(0, 64, (10, 3)).float() * 0.5
    out = ape(pos)
    assert out.shape == (10, 1024) and ape.freq_dim == 170
    i, axis = 37, 1
    f = 1.0 / 10000 ** (i / 170)
    torch.testing.assert_close(out[:, axis * 340 + i], torch.sin(pos[:, axis] * f))
    torch.testing.assert_close(out[:, axis * 340 + 170 + i], torch.cos(pos[:, axis] * f))
    assert (out[:, 1020:] == 0).all()
    assert math.isclose(float(out[:, 0].abs().max()), float(torch.sin(pos[:, 0]).abs().max()), rel_tol=1e-6)
