"""Forward + backward of tripletloss_cuda on small cases, for compute-sanitizer (memcheck, racecheck).

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python3 tools/sanitize_cases.py

Every dtype × D × N once (54 cases; the cosine distance over every dtype × D × layout, 54 more; the distance
epilogue gram_distances_ over both dtypes, the three distances and four block shapes, 24 more), with p, swap,
reduction and the row layout (contiguous, a strided row view x.view(N, 3, D)[:, 0], rows at storage offset 1)
cycling so that every pair of values occurs. float64
results are compared with the PyTorch reference; the others are checked for shape and finiteness (rounding
makes hinge ties possible; the tests compare them). Exit status 1 on a mismatch, 2 when there is no kernel.
"""

import argparse
import itertools
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import tripletloss_cuda as tl

DTYPES = (torch.float32, torch.bfloat16, torch.float64)
DIMS = (1, 3, 64, 130, 1000, 4100)
ROWS = (1, 7, 300)
LAYOUTS = ("contiguous", "strided", "offset")


def make_input(n, d, dtype, device, layout, gen):
    """A leaf tensor that requires grad, and the (n, d) view of it that goes into the loss."""
    size = {"contiguous": n * d, "strided": n * 3 * d, "offset": n * d + 1}[layout]
    leaf = torch.randn(size, dtype=dtype, device=device, generator=gen).requires_grad_()
    if layout == "strided":
        return leaf, leaf.view(n, 3, d)[:, 0]
    return leaf, leaf[size - n * d :].view(n, d)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    device = parser.parse_args(argv).device
    if device not in tl.info()["kernels"]:
        print(f"no compiled {device} kernel: {tl.info()}")
        return 2
    gen = torch.Generator(device).manual_seed(0)
    failures = []
    cases = list(itertools.product(DTYPES, DIMS, ROWS))
    for i, (dtype, d, n) in enumerate(cases):
        # Cycled so that every pair of values of any two parameters occurs in some case.
        p, reduction = (1.0, 2.0, 3.0)[(i + i // 3) % 3], ("none", "mean", "sum")[(i + 2 * (i // 3) + i // 18) % 3]
        swap, layout = bool((i + i // 3 + i // 18) % 2), LAYOUTS[(i + i // 9) % 3]
        leaves, rows = zip(*(make_input(n, d, dtype, device, layout, gen) for _ in range(3)))
        args = {"p": p, "swap": swap, "reduction": reduction}
        loss = tl.triplet_margin_loss(*rows, **args)
        grad_out = torch.randn(loss.shape, dtype=dtype, device=device, generator=gen)
        grads = torch.autograd.grad(loss, leaves, grad_out)
        name = f"{str(dtype).removeprefix('torch.')} N={n} D={d} p={p:g} swap={swap} {reduction} {layout}"
        try:
            assert all(g.shape == x.shape and g.isfinite().all() for g, x in zip(grads, leaves))
            assert loss.isfinite().all()
            if dtype == torch.float64:
                expected = tl.reference.triplet_margin_loss(*rows, **args)
                torch.testing.assert_close(loss, expected)
                torch.testing.assert_close(grads, torch.autograd.grad(expected, leaves, grad_out))
        except AssertionError as err:
            failures.append(name)
            print(f"FAIL {name}: {str(err).strip().splitlines()[0] if str(err) else 'not finite or wrong shape'}")
    indexed_failures, indexed_count = indexed_cases(device, gen)
    cosine_failures, cosine_count = cosine_cases(device, gen)
    epilogue_failures, epilogue_count = epilogue_cases(device, gen)
    failures += indexed_failures + cosine_failures + epilogue_failures
    indexed_count += cosine_count + epilogue_count
    if device == "cuda":
        torch.cuda.synchronize()  # an asynchronous kernel error surfaces here at the latest
    print(f"{len(cases) + indexed_count - len(failures)}/{len(cases) + indexed_count} cases ok on {device}")
    return 1 if failures else 0


def cosine_cases(device, gen):
    """The cosine distance (F.cosine_similarity's and F.normalize's conventions) over every dtype, D and layout
    once, swap and reduction cycling; float64 against the reference: (failures, number of cases)."""
    failures = []
    cases = list(itertools.product(DTYPES, DIMS, LAYOUTS))
    for i, (dtype, d, layout) in enumerate(cases):
        n, swap, reduction, distance = ROWS[i % 3], bool(i % 2), i % 3, 1 + (i // 2) % 2
        leaves, rows = zip(*(make_input(n, d, dtype, device, layout, gen) for _ in range(3)))
        args = (1.0, 2.0, 1e-8, swap, reduction)
        loss = tl.ops.fused_triplet_margin_loss(*rows, *args, distance=distance)
        grad_out = torch.randn(loss.shape, dtype=dtype, device=device, generator=gen)
        grads = torch.autograd.grad(loss, leaves, grad_out)
        name = f"cosine {str(dtype).removeprefix('torch.')} N={n} D={d} distance={distance} swap={swap} {layout}"
        try:
            assert all(g.shape == x.shape and g.isfinite().all() for g, x in zip(grads, leaves))
            assert loss.isfinite().all()
            if dtype == torch.float64:
                expected = tl.reference.triplet_margin_loss(*rows, *args, distance=distance)
                torch.testing.assert_close(loss, expected)
                torch.testing.assert_close(grads, torch.autograd.grad(expected, leaves, grad_out))
        except AssertionError as err:
            failures.append(name)
            print(f"FAIL {name}: {str(err).strip().splitlines()[0] if str(err) else 'not finite or wrong shape'}")
    return failures, len(cases)


def epilogue_cases(device, gen):
    """The distance epilogue gram_distances_ (distances.block's one pass on CUDA) on blocks of 1 to a few thousand
    rows and columns, anchor blocks that are row views of the batch (as the chunked mining takes them), each distance
    and dtype, identical rows included: the op writes exactly the (B, M) block it is given, equal to the torch passes
    (bitwise for the squared and dot distances, to rounding for euclidean): (failures, number of cases)."""
    failures, count = [], 0
    for dtype, distance, (n, m, i0, i1) in itertools.product(
        (torch.float32, torch.float64),
        tl.distances.NAMES,
        ((1, 1, 0, 1), (300, 7, 0, 300), (40, 3000, 10, 13), (2000, 900, 1000, 2000)),
    ):
        x = torch.randn(n, 16, dtype=dtype, device=device, generator=gen)
        y = torch.randn(m, 16, dtype=dtype, device=device, generator=gen)
        y[: min(n, m) // 2] = x[: min(n, m) // 2]
        rx, ry = tl.distances.rows(x, distance), tl.distances.rows(y, distance)
        sq_x, sq_y = tl.distances.squared_norms(rx, distance), tl.distances.squared_norms(ry, distance)
        keys_x, keys_y = tl.distances.row_keys(rx), tl.distances.row_keys(ry)
        sq_b = None if sq_x is None else sq_x[i0:i1]
        gram = rx[i0:i1] @ ry.T
        expected = tl.distances.epilogue(gram.clone(), sq_b, sq_y, keys_x[i0:i1], keys_y, distance)
        code = tl.distances.OP_CODES[tl.distances.op_name(distance)]
        torch.ops.tripletloss_cuda.gram_distances_(gram, sq_b, sq_y, keys_x[i0:i1], keys_y, code)
        count += 1
        name = f"epilogue {str(dtype).removeprefix('torch.')} {distance} rows [{i0}, {i1}) of {n} x {m}"
        try:
            if distance == "euclidean":
                torch.testing.assert_close(gram, expected, rtol=4 * torch.finfo(dtype).eps, atol=0)
            else:
                assert torch.equal(gram, expected), "not bitwise the torch passes"
        except AssertionError as err:
            failures.append(name)
            print(f"FAIL {name}: {str(err).strip().splitlines()[0]}")
    return failures, count


def indexed_cases(device, gen):
    """tl.triplet_margin_loss_from_indices with and without a reference set, duplicate indices, and (on CUDA) an
    out-of-range index, which must read nothing (NaN loss, no illegal access): (failures, number of cases)."""
    failures, count = [], 0
    for ref_rows, swap, distance in itertools.product((None, 9), (False, True), ("euclidean", "cosine")):
        x = torch.randn(11, 37, dtype=torch.float64, device=device, generator=gen).requires_grad_()
        ref = None if ref_rows is None else torch.randn(ref_rows, 37, dtype=torch.float64, device=device, generator=gen)
        rows = 11 if ref is None else ref_rows
        a, p, n = (torch.randint(0, m, (300,), device=device, generator=gen) for m in (11, rows, rows))
        kwargs = {"ref_embeddings": ref, "swap": swap, "distance": distance, "reduction": "sum"}
        loss = tl.triplet_margin_loss_from_indices(x, a, p, n, **kwargs)
        (grad,) = torch.autograd.grad(loss, x)
        count += 1
        if not (loss.isfinite() and grad.isfinite().all()):
            failures.append(f"indexed ref={ref_rows} swap={swap} {distance}")
        if device == "cuda":
            bad = n.clone()
            bad[5] = rows + 1000
            count += 1
            if not tl.triplet_margin_loss_from_indices(x, a, p, bad, **kwargs).isnan():
                failures.append(f"indexed out-of-range ref={ref_rows} swap={swap} {distance}: not NaN")
    for name in failures:
        print(f"FAIL {name}")
    return failures, count


if __name__ == "__main__":
    sys.exit(main())
