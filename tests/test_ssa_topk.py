"""SSA block scoring and top-k selection (Triton kernels, the interpreter on CPU) against the PyTorch references."""
from __future__ import annotations

import pytest
import torch

from d3ds2.attention.ssa import build_ssa_layout
from d3ds2.kernels.span_reference import span_attention_reference
from d3ds2.kernels.ssa_topk import block_scores_reference, score_chunks, score_topk, shared_score_topk, topk_reference
from sparse_helpers import assert_rel_close, ssa_coords


def _scoring_inputs(gen, m_cmp, m_slc, hq=8, hkv=2, d=16):
    lay = build_ssa_layout(ssa_coords(gen), m_cmp, m_slc)
    n, nc = lay.num_tokens, lay.cmp_counts.numel()
    q = torch.randn(n, hq, d, generator=gen)
    kc = torch.randn(nc, hkv, d, generator=gen)
    vc = torch.randn(nc, hkv, d, generator=gen)
    _, lse = span_attention_reference(q, kc, vc, lay.sample_of_token.view(-1, 1, 1), lay.sample_cmp_offsets)
    return lay, q, kc, lse


@pytest.mark.parametrize("m_cmp,m_slc,topk,width", [(4, 4, 3, None), (2, 4, 5, None), (4, 4, 9, None),
                                                    (2, 4, 4, 16), (1, 4, 4, 64)])
def test_score_topk_kernel_selects_reference_topk(gen, m_cmp, m_slc, topk, width):
    lay, q, kc, lse = _scoring_inputs(gen, m_cmp, m_slc)
    args = (q, kc, lse, lay.sample_of_token, lay.sample_block_offsets, lay.block_of_cmp)
    chunks = lay.score_chunks()
    if width is not None:  # narrow chunks (many per sample) / blocks that fill a whole chunk (1 + 63 slots)
        chunks = score_chunks(lay.block_of_cmp, lay.sample_block_offsets, (m_slc // m_cmp) ** 3, width=width)
    idx, val = score_topk(*args, topk, chunks=chunks, backend="triton")
    scores = block_scores_reference(q.double(), kc.double(), lse.double(), lay.sample_of_token,
                                    lay.sample_block_offsets, lay.block_of_cmp)
    idx_ref, val_ref = topk_reference(scores, topk)
    # same values (robust to ties), and the kernel's values are the reference scores of its blocks
    assert_rel_close(val.sort(-1).values, val_ref.sort(-1).values)
    assert torch.equal((idx >= 0).sum(-1), (idx_ref >= 0).sum(-1))
    picked = torch.gather(scores, 2, idx.long().clamp(min=0))
    assert not bool(((idx >= 0) & (picked < 0)).any())  # only blocks of the query's own sample
    assert_rel_close(torch.where(idx >= 0, picked, -2.0), torch.where(idx >= 0, val.double(), -2.0))
    # top-k larger than a sample's block count: every block of that sample, then -1
    per_sample = (lay.sample_block_offsets[1:] - lay.sample_block_offsets[:-1]).long()
    assert torch.equal((idx >= 0).sum(-1)[:, 0], per_sample[lay.sample_of_token.long()].clamp(max=topk))


@pytest.mark.parametrize("m_cmp,m_slc,width", [(2, 4, 64), (2, 4, 16), (1, 4, 64), (2, 8, 64)])
def test_score_chunks_cover_whole_blocks_within_width(gen, m_cmp, m_slc, width):
    lay = build_ssa_layout(ssa_coords(gen), m_cmp, m_slc)
    per_block = (m_slc // m_cmp) ** 3
    ch = score_chunks(lay.block_of_cmp, lay.sample_block_offsets, per_block, width=width)
    cmp, blk, soff = ch.chunk_cmp.long(), ch.chunk_block.long(), ch.sample_chunk_offsets.long()
    nc, m = lay.cmp_counts.numel(), int(lay.sample_block_offsets[-1])
    # chunks tile the compressed tokens and the blocks in order, each within `width` tokens
    assert cmp[0] == 0 and cmp[-1] == nc and blk[0] == 0 and blk[-1] == m
    assert bool((cmp[1:] > cmp[:-1]).all()) and bool((blk[1:] > blk[:-1]).all())
    assert int((cmp[1:] - cmp[:-1]).max()) <= width
    # a chunk holds exactly the tokens of its blocks (no block is split), and stays in one sample
    block_first = torch.searchsorted(lay.block_of_cmp.long(), torch.arange(m + 1))
    assert torch.equal(block_first[blk], cmp)
    sbo = lay.sample_block_offsets.long()
    assert torch.equal(blk[soff], sbo)


def test_shared_score_topk_kernel_matches_reference(gen):
    lay, q, kc, lse = _scoring_inputs(gen, 2, 4)
    args = (q, kc, lse, lay.cmp_offsets, lay.sample_of_cmp, lay.sample_block_offsets, lay.slots, lay.block_of_cmp, 3)
    idx, val = shared_score_topk(*args, backend="triton")
    idx_ref, val_ref = shared_score_topk(*[a.double() if torch.is_tensor(a) and a.is_floating_point() else a
                                           for a in args], backend="torch")
    assert_rel_close(val.sort(-1).values, val_ref.sort(-1).values)
    assert torch.equal((idx >= 0).sum(-1), (idx_ref >= 0).sum(-1))
