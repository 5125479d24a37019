"""The compiled extension: it is built and loaded, its registered ops pass torch.library.opcheck, the public
API takes the fused path for every input it should, and torch.compile(fullgraph=True) traces it."""

import pytest
import torch
import torch.nn.functional as F
from helpers import LOW_PRECISION, REDUCTIONS, cpu_and_cuda, fused_only, make_triplet

import tripletloss_cuda as tl

REDUCTION_ENUM = {"none": 0, "mean": 1, "sum": 2}


def test_extension_is_built():
    """The one test that says why everything else fails when the C++ extension is missing."""
    assert "cpu" in tl.ops.KERNEL_DEVICES, f"the C++ extension is not built or not loaded: {tl.ops.EXTENSION_ERROR}"


def test_info():
    info = tl.info()
    assert {"kernels", "torch"} <= info.keys()
    assert info["torch"] == torch.__version__
    assert info["kernels"] == sorted(tl.ops.KERNEL_DEVICES)
    assert info["extension_loaded"] == (tl.ops._C is not None)


# --- opcheck ---------------------------------------------------------------------------------------------


def _op_samples(device):
    """(anchor, positive, negative, margin, p, eps, swap, reduction) samples that do not require grad (the ops
    get autograd from an autograd.Function, not from a registered autograd kernel)."""
    samples = []
    for dtype, shape, p, swap, reduction in [
        (torch.float32, (5, 7), 2.0, False, 1),
        (torch.float64, (4, 3), 1.0, True, 0),
        (torch.float16, (6, 16), 3.0, True, 2),
        (torch.bfloat16, (3, 9), 1.5, False, 0),
        (torch.float32, (1, 1), 0.5, True, 1),
    ]:
        samples.append((*make_triplet(shape, dtype, device, seed=len(samples)), 1.0, p, 1e-6, swap, reduction))
    rows = make_triplet((5, 7), torch.float32, device, layout="rows", seed=9)
    samples.append((*rows, 0.5, 2.0, 1e-6, True, 2))
    transposed = make_triplet((5, 7), torch.float64, device, layout="transposed", seed=10)
    samples.append((*transposed, 1.0, 2.0, 0.0, False, 0))
    return samples


def _op_sample_ids():
    return [f"sample{i}" for i in range(7)]


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("sample", range(7), ids=_op_sample_ids())
def test_opcheck_forward(kernel, device, sample):
    args = _op_samples(device)[sample]
    torch.library.opcheck(torch.ops.tripletloss_cuda.triplet_margin_forward, args)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("sample", range(7), ids=_op_sample_ids())
def test_opcheck_backward(kernel, device, sample):
    anchor, positive, negative, margin, p, eps, swap, reduction = _op_samples(device)[sample]
    loss, dist = torch.ops.tripletloss_cuda.triplet_margin_forward(*_op_samples(device)[sample])
    grad = torch.randn(loss.shape, generator=torch.Generator().manual_seed(sample)).to(anchor.dtype).to(device)
    args = (grad, anchor, positive, negative, dist, margin, p, eps, swap, reduction, tl.ops.GRAD_AT_ZERO_HINGE)
    torch.library.opcheck(torch.ops.tripletloss_cuda.triplet_margin_backward, args)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_forward_op_outputs(kernel, device, reduction):
    """loss: (N,) or () in the inputs' dtype; dist: (N, 3) d(a,p), d(a,n), d(p,n) in float32 (float64 for
    float64 inputs)."""
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        a, pos, neg = make_triplet((6, 5), dtype, device, seed=1)
        loss, dist = torch.ops.tripletloss_cuda.triplet_margin_forward(a, pos, neg, 1.0, 2.0, 1e-6, True, 0)
        assert loss.shape == (6,) and loss.dtype == dtype
        assert dist.shape == (6, 3) and dist.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        expected = [F.pairwise_distance(x.double(), y.double()) for x, y in ((a, pos), (a, neg), (pos, neg))]
        torch.testing.assert_close(dist.double(), torch.stack(expected, 1), rtol=1e-5, atol=1e-5)
        loss, _ = torch.ops.tripletloss_cuda.triplet_margin_forward(
            a, pos, neg, 1.0, 2.0, 1e-6, False, REDUCTION_ENUM[reduction]
        )
        assert loss.shape == ((6,) if reduction == "none" else ())


def test_op_input_checks(kernel):
    """The ops check their contract with messages naming the argument (the fake kernels give the same)."""
    fwd = torch.ops.tripletloss_cuda.triplet_margin_forward
    a, pos, neg = make_triplet((3, 4))
    with pytest.raises(RuntimeError, match="anchor should be a 2D tensor, got 1D"):
        fwd(a[0], pos[0], neg[0], 1.0, 2.0, 1e-6, False, 1)
    with pytest.raises(RuntimeError, match=r"positive should have the shape of anchor \[3, 4\], got \[3, 3\]"):
        fwd(a, pos[:, :3], neg, 1.0, 2.0, 1e-6, False, 1)
    with pytest.raises(RuntimeError, match="negative should have the dtype of anchor Float, got Double"):
        fwd(a, pos, neg.double(), 1.0, 2.0, 1e-6, False, 1)
    with pytest.raises(RuntimeError, match="anchor should be a floating tensor, got Long"):
        fwd(a.long(), pos.long(), neg.long(), 1.0, 2.0, 1e-6, False, 1)


# --- the public API takes the fused path -------------------------------------------------------------------


def _fused_cases():
    a, pos, neg = make_triplet((6, 5))
    rows = make_triplet((6, 5), layout="rows", seed=1)
    return {
        "2d": (a, pos, neg),
        "1d": (a[0], pos[0], neg[0]),
        "3d": tuple(t.reshape(2, 3, 5) for t in (a, pos, neg)),
        "strided-rows": rows,
        "transposed": tuple(t.t().contiguous().t() for t in (a, pos, neg)),
        "broadcast": (a, pos[:1], neg),
        "broadcast-3d": (a.reshape(2, 3, 5), pos[:3].reshape(1, 3, 5), neg[:2].reshape(2, 1, 5)),
        "float16": (a.half(), pos.half(), neg.half()),
        "bfloat16": (a.bfloat16(), pos.bfloat16(), neg.bfloat16()),
        "float64": (a.double(), pos.double(), neg.double()),
        "mixed-dtypes": (a.half(), pos, neg.bfloat16()),
    }


@pytest.mark.parametrize("case", list(_fused_cases()))
@pytest.mark.parametrize("p", (2.0, 1.0, 1.5), ids=lambda p: f"p{p:g}")
def test_fused_path_is_taken(kernel, case, p):
    """Every floating input with 0 < p < inf on a kernel device runs the fused kernels, forward and backward:
    the reference is not called. (Integer inputs go to the reference: see test_inputs.py.)"""
    inputs = _fused_cases()[case]
    leaves = [x.detach().requires_grad_() for x in inputs]
    with fused_only():
        loss = tl.triplet_margin_loss(*leaves, p=p, swap=True)
        assert type(loss.grad_fn).__name__ == "TripletMarginLossFunctionBackward"
        loss.backward()
    tol = 2e-2 if loss.dtype in LOW_PRECISION else 1e-5
    torch.testing.assert_close(loss, F.triplet_margin_loss(*inputs, p=p, swap=True), rtol=tol, atol=tol)


# --- torch.compile -------------------------------------------------------------------------------------------


class _EmbedAndLoss(torch.nn.Module):
    """A linear embedding of (N, 3, 16) triplets, then the loss on the strided rows of its (N, 3, 8) output."""

    def __init__(self, swap, reduction):
        super().__init__()
        self.linear = torch.nn.Linear(16, 8)
        self.swap, self.reduction = swap, reduction

    def forward(self, x):
        e = self.linear(x)
        loss = tl.triplet_margin_loss(e[:, 0], e[:, 1], e[:, 2], margin=0.5, swap=self.swap, reduction=self.reduction)
        return loss if self.reduction != "none" else (loss * torch.arange(loss.numel())).sum()


@pytest.mark.parametrize(("swap", "reduction"), [(True, "mean"), (False, "none")])
def test_torch_compile_fullgraph(kernel, swap, reduction):
    """torch.compile(fullgraph=True) (which makes a graph break an error) of a model using the loss: the same
    loss and parameter gradients as eager, and the fused ops are in the compiled graph."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _EmbedAndLoss(swap, reduction)
    x = torch.randn(32, 3, 16)

    def step(fn):
        model.zero_grad()
        loss = fn(x)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    eager = step(model)
    with fused_only():  # the reference would be traced instead of the fused ops
        compiled = step(torch.compile(model, fullgraph=True))
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    expected = step(lambda x: _reference_model(model, x))
    torch.testing.assert_close(eager, expected, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def _reference_model(model, x):
    e = model.linear(x)
    loss = F.triplet_margin_loss(e[:, 0], e[:, 1], e[:, 2], margin=0.5, swap=model.swap, reduction=model.reduction)
    return loss if model.reduction != "none" else (loss * torch.arange(loss.numel())).sum()
