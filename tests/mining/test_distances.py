"""tripletloss_cuda/distances.py: one formula for the whole-matrix and the chunked mining paths, so that they
agree by construction: identical rows are exactly 0 apart in both (against the batch and against a reference
set), and chunk sizes 1, 3 and None mine the same triplets (equal statistics) with losses and gradients equal
up to the accumulation order, on inputs with exact ties. The codes agree with the C++ ones."""

import pathlib
import re
from unittest import mock

import pytest
import torch

import tripletloss_cuda as tl
from tripletloss_cuda import _library, distances
from tripletloss_cuda.mining import ops as mining_ops

ROOT = pathlib.Path(__file__).resolve().parents[2]
LOSSES = {
    "batch_hard": tl.batch_hard_triplet_loss,
    "batch_all": tl.batch_all_triplet_loss,
    "semi_hard": tl.semi_hard_triplet_loss,
}


def with_duplicates(n, d, dtype, seed):
    """Random rows, a third of them copies of others (in other chunks too), and their labels."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype)
    src = torch.randperm(n, generator=gen)[: n // 3]
    dst = torch.randperm(n, generator=gen)[: n // 3]
    x[dst] = x[src]
    labels = torch.randint(0, 4, (n,), generator=gen)
    return x, labels


def blocks_of(fn):
    """fn() on the dense path (the fused CPU mining computes the same entries inside its ops: test_mining_fused.py)
    with every distances.block call recorded: the list of (B, M) blocks, in order."""
    seen, block = [], distances.block

    def spy(*args):
        out = block(*args)
        seen.append(out.clone())
        return out

    with mock.patch.object(distances, "block", spy), mock.patch.object(mining_ops, "FUSED", False):
        fn()
    return seen


@pytest.mark.parametrize("refs", [False, True], ids=["batch", "reference-set"])
@pytest.mark.parametrize("distance", distances.NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_identical_rows_are_exactly_zero_apart_whole_and_chunked(dtype, distance, refs):
    x, labels = with_duplicates(30, 7, dtype, seed=5)
    r, ref_labels = (x.flip(0).clone(), labels.flip(0).clone()) if refs else (None, None)
    kwargs = {"distance": distance, "ref_embeddings": r, "ref_labels": ref_labels}
    m = 30
    for chunk in (None, 1, 3):
        matrix = torch.cat(blocks_of(lambda c=chunk: tl.batch_all_triplet_loss(x, labels, chunk_size=c, **kwargs)))
        assert matrix.shape == (30, m)
        refs_rows = x if r is None else r
        same = (x[:, None, :] == refs_rows[None, :, :]).all(-1)  # the pairs of identical rows
        assert same.sum() > 30 if not refs else same.any()
        assert (matrix[same] == 0).all(), (chunk, matrix[same].abs().max())
        assert (matrix[~same] > 0).all()


@pytest.mark.parametrize("kind", list(LOSSES))
@pytest.mark.parametrize("distance", distances.NAMES)
def test_chunk_sizes_mine_the_same_triplets(kind, distance):
    """Exact ties everywhere: rows whose every product is exact in float32, so that every path computes the same
    distances bit for bit (small integers; for cosine, four entries of +-1 and one 0, whose normalized entries
    are +-0.5), with duplicates; chunk sizes 1, 3 and None mine the same triplets."""
    gen = torch.Generator().manual_seed(11)
    if distance == "cosine":
        x = torch.randint(0, 2, (24, 5), generator=gen).float() * 2 - 1
        x[torch.arange(24), torch.randint(0, 5, (24,), generator=gen)] = 0
    else:
        x = torch.randint(-3, 4, (24, 5), generator=gen).float()
    x[12:18] = x[:6]
    labels = torch.randint(0, 3, (24,), generator=gen)
    results = []
    for chunk in (None, 1, 3):
        leaf = x.clone().requires_grad_()
        loss, stats = LOSSES[kind](leaf, labels, margin=0.5, distance=distance, chunk_size=chunk, return_stats=True)
        (grad,) = torch.autograd.grad(loss, leaf)
        results.append((loss.detach(), tuple(int(s) for s in stats[:2]), float(stats[2]), grad))
    (loss0, counts0, fraction0, grad0), *others = results
    assert counts0[0] > 0
    for loss, counts, fraction, grad in others:
        assert counts == counts0 and fraction == fraction0
        torch.testing.assert_close(loss, loss0, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad, grad0, rtol=1e-5, atol=1e-6)


def test_row_keys():
    x = torch.randn(50, 9, dtype=torch.float64)
    x[10] = x[3]
    for rows in (x, x.float()):
        keys = distances.row_keys(rows)
        assert keys.dtype == torch.int64 and keys[10] == keys[3]
        assert keys.unique().numel() == 49
    # A row that differs in one bit, or is a permutation of another, gets another key.
    y = x[:2].clone()
    y[1] = y[0].flip(0)
    assert distances.row_keys(y).unique().numel() == 2
    z = x[:1].clone().float()
    z2 = z.view(torch.int32).clone()
    z2[0, 4] ^= 1
    assert distances.row_keys(torch.cat([z, z2.view(torch.float32)])).unique().numel() == 2


def test_codes_agree_with_the_cpp_ones():
    """distances.OP_CODES and _library.REDUCTIONS are the numbers the C++ enums and schemas use."""
    header = (ROOT / "csrc" / "indexed_math.h").read_text()
    enum = re.search(r"enum Distance : int \{ kEuclidean = (\d), kSquared = (\d), kDot = (\d) \}", header)
    assert enum and tuple(map(int, enum.groups())) == tuple(distances.OP_CODES[k] for k in distances.OP_CODES)
    schemas = (ROOT / "csrc" / "schemas.h").read_text()
    assert "0 none, 1 mean, 2 sum" in schemas
    assert [_library.REDUCTIONS[k] for k in ("none", "mean", "sum")] == [0, 1, 2]
    assert tl.mining.BATCH_ALL_REDUCTIONS == {k: _library.REDUCTIONS[k] for k in ("mean_nonzero", "mean", "sum")}
    assert tl.indexed.REDUCTIONS is _library.REDUCTIONS
