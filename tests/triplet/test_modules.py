"""The nn.Module and the functional are drop-ins for PyTorch's (signatures, defaults, results), and the
naive baseline module computes what its docstring says."""

import inspect

import pytest
import torch
import torch.nn.functional as F
from helpers import make_triplet

import tripletloss_cuda as tl


def _parameters(fn):
    """Names, kinds and defaults (annotations aside)."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def test_functional_signature_matches_pytorch():
    assert _parameters(tl.triplet_margin_loss) == _parameters(F.triplet_margin_loss)


def test_module_signature_matches_pytorch():
    assert _parameters(tl.TripletMarginLoss.__init__) == _parameters(torch.nn.TripletMarginLoss.__init__)
    assert _parameters(tl.TripletMarginLoss.forward) == _parameters(torch.nn.TripletMarginLoss.forward)


def test_module_defaults_match_pytorch():
    ours, theirs = tl.TripletMarginLoss(), torch.nn.TripletMarginLoss()
    for name in ("margin", "p", "eps", "swap", "reduction"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert isinstance(ours, torch.nn.Module)


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"margin": 0.5, "p": 1.0, "swap": True, "reduction": "sum"},
        {"margin": 2.0, "p": 3.0, "eps": 1e-3, "reduction": "none"},
        {"p": 1.5, "swap": True},
        {"p": float("inf"), "reduction": "none"},  # through the reference
    ],
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "defaults",
)
def test_module_matches_pytorch(config):
    inputs = make_triplet((16, 10), torch.float64, seed=1)
    results = []
    for module in (tl.TripletMarginLoss(**config), torch.nn.TripletMarginLoss(**config)):
        leaves = [x.clone().requires_grad_() for x in inputs]
        loss = module(*leaves)
        results.append((loss.detach(), torch.autograd.grad(loss, leaves, torch.ones_like(loss))))
    torch.testing.assert_close(results[0], results[1], rtol=1e-10, atol=1e-12)


def test_module_repr_and_state():
    module = tl.TripletMarginLoss(margin=0.5, swap=True)
    assert module.state_dict() == {}
    assert list(module.parameters()) == []


def test_naive_module():
    """tl.naive.TripletLoss (margin 0.1 by default): relu(d(a, p) - d(a, n) + margin).mean()."""
    assert inspect.signature(tl.naive.TripletLoss).parameters["margin"].default == 0.1
    a, pos, neg = make_triplet((32, 8), torch.float64, seed=2)
    for margin, module in ((0.1, tl.naive.TripletLoss()), (0.7, tl.naive.TripletLoss(margin=0.7))):
        expected = torch.relu(F.pairwise_distance(a, pos) - F.pairwise_distance(a, neg) + margin).mean()
        torch.testing.assert_close(module(a, pos, neg), expected, rtol=0, atol=0)
        # ... which is the triplet margin loss with that margin
        torch.testing.assert_close(module(a, pos, neg), tl.triplet_margin_loss(a, pos, neg, margin=margin))
