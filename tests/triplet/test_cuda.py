"""CUDA-only properties of the kernels: CUDA-graph capture and replay, bitwise determinism at a large
shape, and 64-bit indexing past 2^31 elements. (The value/gradient matrix runs on CUDA through the
device parametrization of test_correctness.py.) Run with `pytest -m cuda tests`."""

import pytest
import torch
from helpers import REDUCTIONS, assert_close, fused_only, ids, make_triplet, upstream_grad, value_scale

import tripletloss_cuda as tl

pytestmark = pytest.mark.cuda


@pytest.fixture
def device():
    """Every test here needs the CUDA kernels (the `kernel` fixture fails without them)."""
    return "cuda"


def _step(inputs, grad, **kwargs):
    loss = tl.triplet_margin_loss(*inputs, **kwargs)
    return loss, torch.autograd.grad(loss, inputs, grad)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("p", "swap"), [(2.0, False), (1.0, True), (3.0, True)], ids=("p2", "p1-swap", "p3-swap"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=ids)
def test_cuda_graph_capture_and_replay(kernel, reduction, p, swap, dtype):
    """Forward and backward captured in one CUDA graph (no host synchronization, current stream only) and
    replayed on new data copied into the static inputs give the eager results."""
    shape = (1000, 130)
    kwargs = {"p": p, "swap": swap, "reduction": reduction}
    static = [x.requires_grad_() for x in make_triplet(shape, dtype, "cuda", seed=1)]
    grad = upstream_grad((shape[0],) if reduction == "none" else (), dtype, "cuda")

    with fused_only():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up (allocator, occupancy queries) off the capture
            for _ in range(3):
                _step(static, grad, **kwargs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_loss, static_grads = _step(static, grad, **kwargs)

        for seed in (2, 3):
            new = make_triplet(shape, dtype, "cuda", seed=seed)
            with torch.no_grad():
                for s, x in zip(static, new):
                    s.copy_(x)
            graph.replay()
            eager_loss, eager_grads = _step([x.requires_grad_() for x in new], grad, **kwargs)
            torch.testing.assert_close(static_loss, eager_loss, rtol=0, atol=0)
            torch.testing.assert_close(static_grads, eager_grads, rtol=0, atol=0)
    torch.cuda.synchronize()


@pytest.mark.parametrize("reduction", ("mean", "sum"))
@pytest.mark.parametrize("swap", (False, True), ids=("noswap", "swap"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=ids)
def test_cuda_determinism(kernel, reduction, swap, dtype):
    """mean/sum over 65536 rows: per-block partials added in a fixed order (no float atomics), so two runs
    of forward and backward are bitwise equal; and the value is right."""
    inputs = [x.requires_grad_() for x in make_triplet((65536, 256), dtype, "cuda", seed=4)]
    grad = upstream_grad((), dtype, "cuda")
    with fused_only():
        first = _step(inputs, grad, swap=swap, reduction=reduction)
        second = _step(inputs, grad, swap=swap, reduction=reduction)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(g, h) for g, h in zip(first[1], second[1]))
    if dtype == torch.float32:
        ref = tl.reference.triplet_margin_loss(*(x.detach().double() for x in inputs), swap=swap, reduction=reduction)
        assert_close(first[0].double(), ref, torch.float32, value_scale(inputs, swap=swap, reduction=reduction))


@pytest.mark.parametrize("layout", ("contiguous", "rows"))
def test_more_than_2_31_elements(kernel, layout):
    """64-bit indexing: bfloat16 inputs of just over 2^31 elements (contiguous: three (N, 4096) tensors;
    rows: one (N, 3, 4096) tensor); rows on both sides of element 2^31 match the reference computed on those
    rows alone, and the mean matches the mean of the per-row losses. Forward only, to stay lean."""
    d = 4096
    n = 2**31 // d + 3 if layout == "contiguous" else 2**31 // (3 * d) + 3
    gen = torch.Generator(device="cuda").manual_seed(0)
    try:
        if layout == "contiguous":
            inputs = [torch.randn(n, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3)]
            assert inputs[0].numel() > 2**31
        else:
            base = torch.randn(n, 3, d, device="cuda", dtype=torch.bfloat16, generator=gen)
            assert base.numel() > 2**31
            inputs = [base[:, i] for i in range(3)]
        with fused_only():
            loss = tl.triplet_margin_loss(*inputs, swap=True, reduction="none")
            mean = tl.triplet_margin_loss(*inputs, swap=True, reduction="mean")
        # the rows around element 2^31: the last row that ends before it, the next ones (straddling or past it)
        last_small_row = 2**31 // (d if layout == "contiguous" else 3 * d) - 1
        rows = torch.tensor([0, 1, n // 2, last_small_row - 1, last_small_row, last_small_row + 1, n - 2, n - 1])
        rows = rows.cuda()
        ref = tl.reference.triplet_margin_loss(*(x[rows].double() for x in inputs), swap=True, reduction="none")
        torch.testing.assert_close(loss[rows].double(), ref, rtol=1e-2, atol=1e-2)
        # mean is rounded to bfloat16 once, the per-row losses each: a bfloat16 rounding apart
        torch.testing.assert_close(mean.double(), loss.double().mean(), rtol=1e-2, atol=1e-2)
    finally:
        inputs = base = loss = None
        torch.cuda.empty_cache()
