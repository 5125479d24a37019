"""The cosine distance in the fused triplet ops (distance codes 1-3 of tripletloss_cuda.distances.TRIPLET_CODES):
torch.library.opcheck, the (N, 6) saved distances, values and gradients against PyTorch's own composites
(1 - F.cosine_similarity; sentence-transformers' 1 - <F.normalize(x), F.normalize(y)>), gradcheck in float64,
the clamp of tiny norms at eps with each convention's gradient, create_graph and torch.func, and bad codes.
The public API on top (tl.triplet_margin_with_distance_loss) is tested in test_with_distance.py."""

import pytest
import torch
import torch.nn.functional as F
from helpers import cpu_and_cuda, make_triplet, upstream_grad

import tripletloss_cuda as tl

CODES = {"cosine": 1, "normalized": 2}


def pytorch_loss(a, pos, neg, distance, eps, swap, reduction, margin=0.5):
    """PyTorch's composite for the code: F.triplet_margin_with_distance_loss with the distance as users write it."""
    if distance == 1:
        fn = lambda x, y: 1 - F.cosine_similarity(x, y, dim=-1, eps=eps)
    else:
        fn = lambda x, y: 1 - (F.normalize(x, dim=-1, eps=eps) * F.normalize(y, dim=-1, eps=eps)).sum(-1)
    red = ("none", "mean", "sum")[reduction]
    return F.triplet_margin_with_distance_loss(
        a, pos, neg, distance_function=fn, margin=margin, swap=swap, reduction=red
    )


def fused(a, pos, neg, distance, eps, swap, reduction, margin=0.5):
    return tl.ops.fused_triplet_margin_loss(a, pos, neg, margin, 2.0, eps, swap, reduction, distance=distance)


def _samples(device):
    out = []
    for i, (dtype, shape, swap, reduction, distance) in enumerate(
        [
            (torch.float32, (5, 7), False, 1, 1),
            (torch.float64, (4, 3), True, 0, 2),
            (torch.float16, (6, 16), True, 2, 1),
            (torch.bfloat16, (3, 9), False, 0, 3),
            (torch.float32, (1, 1), True, 1, 1),
        ]
    ):
        out.append((*make_triplet(shape, dtype, device, seed=40 + i), 1.0, 2.0, 1e-8, swap, reduction, distance))
    return out


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("sample", range(5))
def test_opcheck(kernel, device, sample):
    args = _samples(device)[sample]
    torch.library.opcheck(torch.ops.tripletloss_cuda.triplet_margin_forward, args)
    loss, dist = torch.ops.tripletloss_cuda.triplet_margin_forward(*args)
    a, pos, neg, margin, p, eps, swap, reduction, distance = args
    grad = upstream_grad(loss.shape, a.dtype, device)
    backward_args = (grad, a, pos, neg, dist, margin, p, eps, swap, reduction, tl.ops.GRAD_AT_ZERO_HINGE, distance)
    torch.library.opcheck(torch.ops.tripletloss_cuda.triplet_margin_backward, backward_args)


def test_saved_distances(kernel):
    """dist is (N, 6): d(a,p), d(a,n), d(p,n) (with swap), |a|, |p|, |n|."""
    a, pos, neg = make_triplet((6, 5), torch.float64, seed=2)
    _, dist = torch.ops.tripletloss_cuda.triplet_margin_forward(a, pos, neg, 1.0, 2.0, 1e-8, True, 0, 1)
    assert dist.shape == (6, 6) and dist.dtype == torch.float64
    cos = [1 - F.cosine_similarity(x, y, dim=-1) for x, y in ((a, pos), (a, neg), (pos, neg))]
    norms = [x.norm(dim=-1) for x in (a, pos, neg)]
    torch.testing.assert_close(dist, torch.stack(cos + norms, 1))


@pytest.mark.parametrize("reduction", (0, 1, 2))
@pytest.mark.parametrize("swap", (False, True))
@pytest.mark.parametrize("distance", CODES.values(), ids=CODES.keys())
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_matches_pytorch(kernel, device, dtype, distance, swap, reduction):
    """Values and gradients equal PyTorch's composite, with zero rows, norms below eps, equal rows and a row at
    the other's scale (a = 1e-3 p) among ordinary ones."""
    a, pos, neg = make_triplet((40, 24), dtype, device, seed=distance * 10 + swap)
    pos[0] = 0
    a[1] *= 1e-10
    neg[2] *= 3e-11
    a[3] = pos[3]
    a[4] = pos[4] * 1e-3
    neg[5] = 0
    eps = 1e-8 if distance == 1 else 1e-12
    leaves = [x.clone().requires_grad_() for x in (a, pos, neg)]
    ref_leaves = [x.clone().requires_grad_() for x in (a, pos, neg)]
    loss = fused(*leaves, distance, eps, swap, reduction)
    ref = pytorch_loss(*ref_leaves, distance, eps, swap, reduction)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(loss, ref, rtol=tol, atol=tol)
    g = upstream_grad(loss.shape, dtype, device)
    grads = torch.autograd.grad(loss, leaves, g)
    ref_grads = torch.autograd.grad(ref, ref_leaves, g)
    for x, y in zip(grads, ref_grads):
        # Rows of norm ~1e-10 have gradients ~1e10: compare each row relative to its own scale.
        scale = y.abs().amax(1, keepdim=True).clamp_min(1)
        torch.testing.assert_close(x / scale, y / scale, rtol=tol, atol=10 * tol)


@pytest.mark.parametrize("distance", (1, 2))
def test_the_clamp_conventions_differ_below_eps(kernel, distance):
    """Below eps, F.cosine_similarity's gradient goes through the clamped norm as if it were the norm (ATen clamps
    it under no_grad), F.normalize's (clamp_min) does not: the two codes give the two gradients."""
    a = torch.tensor([[3e-9, 5e-9, 2e-9]], dtype=torch.float64, requires_grad=True)
    pos = torch.tensor([[1.0, 2.0, -0.5]], dtype=torch.float64)
    neg = torch.tensor([[-1.0, 0.5, 0.25]], dtype=torch.float64)
    (g,) = torch.autograd.grad(fused(a, pos, neg, distance, 1e-8, False, 2, margin=5.0), a)
    a2 = a.detach().clone().requires_grad_()
    (expected,) = torch.autograd.grad(pytorch_loss(a2, pos, neg, distance, 1e-8, False, 2, margin=5.0), a2)
    torch.testing.assert_close(g, expected)
    a3 = a.detach().clone().requires_grad_()
    (other,) = torch.autograd.grad(pytorch_loss(a3, pos, neg, 3 - distance, 1e-8, False, 2, margin=5.0), a3)
    assert not torch.allclose(g, other)


@pytest.mark.parametrize("swap", (False, True))
@pytest.mark.parametrize("distance", CODES.values(), ids=CODES.keys())
def test_gradcheck(kernel, distance, swap):
    a, pos, neg = (x.requires_grad_() for x in make_triplet((6, 5), torch.float64, seed=7))
    for reduction in (0, 1, 2):
        assert torch.autograd.gradcheck(lambda *t, r=reduction: fused(*t, distance, 1e-8, swap, r), (a, pos, neg))


def test_create_graph_and_torch_func(kernel):
    """Second order through the reference; torch.func.grad and vmap over the fused ops."""
    a, pos, neg = (x.requires_grad_() for x in make_triplet((5, 4), torch.float64, seed=8))
    assert torch.autograd.gradgradcheck(lambda *t: fused(*t, 1, 1e-8, True, 1), (a, pos, neg))
    g = torch.func.grad(lambda x: fused(x, pos, neg, 1, 1e-8, True, 1))(a)
    expected = torch.func.grad(lambda x: pytorch_loss(x, pos, neg, 1, 1e-8, True, 1))(a)
    torch.testing.assert_close(g, expected)
    batch = torch.stack([a.detach(), pos.detach()])
    per = torch.func.vmap(lambda x: fused(x, pos, neg, 2, 1e-12, False, 2))(batch)
    torch.testing.assert_close(per, torch.stack([pytorch_loss(x, pos, neg, 2, 1e-12, False, 2) for x in batch]))
    jac = torch.func.jacrev(lambda x: fused(x, pos, neg, 1, 1e-8, False, 0))(a)
    expected = torch.func.jacrev(lambda x: pytorch_loss(x, pos, neg, 1, 1e-8, False, 0))(a)
    torch.testing.assert_close(jac, expected)


def test_relu_hinge_has_no_gradient_at_zero(kernel):
    """grad_at_zero_hinge=False (sentence-transformers' F.relu): an exactly-zero hinge gets no gradient."""
    a, pos, _ = (x.requires_grad_() for x in make_triplet((3, 4), torch.float64, seed=9))
    same = pos.detach().clone().requires_grad_()  # positive == negative, margin 0: every hinge is exactly 0
    args = (a, same, same, 0.0, 2.0, 1e-8, False, 2)
    loss = tl.ops.fused_triplet_margin_loss(*args, distance=1, grad_at_zero_hinge=False)
    assert loss.item() == 0
    assert all(g.abs().sum() == 0 for g in torch.autograd.grad(loss, (a, same)))


def test_bad_distance_code(kernel):
    a, pos, neg = make_triplet((3, 4))
    with pytest.raises(RuntimeError, match="distance should be 0 \\(pairwise\\), 1 \\(cosine\\)"):
        torch.ops.tripletloss_cuda.triplet_margin_forward(a, pos, neg, 1.0, 2.0, 1e-8, False, 1, 7)
