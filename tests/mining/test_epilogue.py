"""The distance epilogue op gram_distances_ (csrc/epilogue.cpp; distances.block on CUDA): the CPU op equals the torch
passes it replaces (distances.epilogue) bitwise, with a correctly rounded square root for "euclidean" (torch's CPU
sqrt_ is not one: see distances.EPILOGUE_DEVICES); torch.library.opcheck; the same argument checks in the C++ op and
the fake kernel; block()'s choice between the op and the passes. The CUDA kernel on the emulator:
tests/emulated/test_emulated_epilogue.py; on a GPU: test_cuda_block_is_the_torch_passes (`-m cuda`)."""

from unittest import mock

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tripletloss_cuda import _library, distances

OP = getattr(torch.ops, _library.NAMESPACE).gram_distances_
needs_op = pytest.mark.skipif("cpu" not in distances.EPILOGUE_KERNELS, reason="_C without gram_distances_")


def inputs_of(x, y, distance):
    rx, ry = distances.rows(x, distance), distances.rows(y, distance)
    sq_x, sq_y = distances.squared_norms(rx, distance), distances.squared_norms(ry, distance)
    return rx @ ry.T, sq_x, sq_y, distances.row_keys(rx), distances.row_keys(ry)


def sample(b, m, distance, dtype, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 5, generator=gen, dtype=dtype)
    y = torch.randn(m, 5, generator=gen, dtype=dtype)
    if b and m:
        y[: min(b, m) // 2] = x[: min(b, m) // 2]  # identical rows: exactly 0 apart
    return inputs_of(x.to(device), y.to(device), distance)


def code(distance):
    return distances.OP_CODES[distances.op_name(distance)]


def op(inputs, distance):
    gram = inputs[0].clone()
    OP(gram, *inputs[1:], code(distance))
    return gram


def same_bits(a, b):
    nan = a.isnan()
    ints = torch.int32 if a.dtype == torch.float32 else torch.int64
    return torch.equal(nan, b.isnan()) and torch.equal(
        a.masked_fill(nan, 0).view(ints), b.masked_fill(nan, 0).view(ints)
    )


@needs_op
@pytest.mark.parametrize("shape", [(0, 4), (4, 0), (1, 1), (7, 13), (300, 200), (1, 5000)], ids=str)
@pytest.mark.parametrize("distance", distances.NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_op_is_the_torch_passes(dtype, distance, shape):
    inputs = sample(*shape, distance, dtype, seed=sum(shape))
    flat = inputs[0].view(-1)
    flat[:2] = torch.tensor([torch.nan, torch.inf], dtype=dtype)[: flat.numel()]  # NaN and inf entries
    ours = op(inputs, distance)
    if distance == "euclidean":  # the passes of the squared distance, then a correctly rounded square root
        d2 = distances.epilogue(inputs[0].clone(), *inputs[1:], "squared_euclidean")
        expected = torch.from_numpy(np.sqrt(d2.numpy()))
    else:
        expected = distances.epilogue(inputs[0].clone(), *inputs[1:], distance)
    assert same_bits(ours, expected)
    same = inputs[3][:, None] == inputs[4][None, :]
    assert (ours[same] == 0).all()


@needs_op
@pytest.mark.parametrize("distance", distances.NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype, distance):
    for shape in ((6, 9), (1, 3), (0, 2)):
        torch.library.opcheck(OP, (*sample(*shape, distance, dtype, seed=1), code(distance)))


def bad_arguments():
    """(arguments, message) of calls the op and its fake kernel reject, with the same messages."""
    gram, sq_x, sq_y, keys_x, keys_y = sample(4, 3, "euclidean", torch.float32, seed=2)
    return [
        ((gram[0], sq_x, sq_y, keys_x, keys_y, 0), r"gram should be a 2D tensor \(B, M\), got shape \[3\]"),
        ((gram.half(), sq_x, sq_y, keys_x, keys_y, 0), r"gram should be float32 or float64, got"),
        ((gram.t(), sq_y, sq_x, keys_y, keys_x, 0), r"gram should be contiguous .*, got strides \[1, 3\]"),
        ((gram, sq_x, sq_y, keys_x, keys_y, -1), r"distance should be 0 \(euclidean\), 1 \(squared .*, got -1"),
        ((gram, None, sq_y, keys_x, keys_y, 0), r"sq_x and sq_y should be given for distance 0 \(euclidean\)"),
        ((gram, sq_x, None, keys_x, keys_y, 2), r"sq_x and sq_y should be None for distance 2 \(dot\)"),
        ((gram, sq_x, sq_y[1:], keys_x, keys_y, 1), r"sq_y should have shape \(3,\) \(gram's columns\), got \[2\]"),
        ((gram, sq_x.double(), sq_y, keys_x, keys_y, 1), r"sq_x should be Float, got Double"),
        ((gram, sq_x, sq_y, keys_x, keys_y.float(), 0), r"keys_y should be Long, got Float"),
        ((gram, sq_x, sq_y, keys_x[:2], keys_y, 0), r"keys_x should have shape \(4,\) \(gram's rows\), got \[2\]"),
    ]


@needs_op
@pytest.mark.parametrize("index", range(10))
def test_errors(index):
    """The C++ op and the fake kernel (run on meta tensors) raise the same message; gram is left as it was."""
    args, message = bad_arguments()[index]
    before = args[0].clone()
    with pytest.raises(RuntimeError, match=message):
        OP(*args)
    assert torch.equal(args[0], before)
    meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
    with pytest.raises(RuntimeError, match=message):
        OP(*meta)


@needs_op
def test_devices_must_agree():
    gram, sq_x, sq_y, keys_x, keys_y = sample(3, 2, "squared_euclidean", torch.float64, seed=3)
    with pytest.raises(RuntimeError, match=r"keys_x should be on gram's device meta, got cpu"):
        OP(gram.to("meta"), sq_x.to("meta"), sq_y.to("meta"), keys_x, keys_y.to("meta"), 1)


class OpLog(TorchDispatchMode):
    """The names of the ops dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def block_of(x, distance):
    rx = distances.rows(x, distance)
    sq, keys = distances.squared_norms(rx, distance), distances.row_keys(rx)
    with OpLog() as log:
        out = distances.block(rx, rx, sq, sq, keys, keys, distance)
    return out, log.names, distances.epilogue(rx @ rx.T, sq, sq, keys, keys, distance)


@pytest.mark.parametrize("distance", distances.NAMES)
def test_block_keeps_the_torch_passes_on_the_cpu(distance):
    """block() on the CPU: the torch passes, bitwise what it was before the op (EPILOGUE_DEVICES has no "cpu")."""
    assert "cpu" not in distances.EPILOGUE_DEVICES
    x = torch.randn(20, 5, generator=torch.Generator().manual_seed(4))
    out, names, expected = block_of(x, distance)
    assert same_bits(out, expected) and not any("gram_distances_" in n for n in names)


@needs_op
@pytest.mark.parametrize("distance", distances.NAMES)
def test_block_uses_the_op_where_listed_and_not_under_compile(distance):
    """With the CPU listed in EPILOGUE_DEVICES (as CUDA is), block() is one matrix product and the op; while
    torch.compile traces (is_compiling), the torch passes."""
    x = torch.randn(20, 5, generator=torch.Generator().manual_seed(5))
    x[3] = x[7]
    with mock.patch.object(distances, "EPILOGUE_DEVICES", frozenset({"cpu", "cuda"})):
        out, names, expected = block_of(x, distance)
        assert names == ["aten.permute", "aten.mm", f"{_library.NAMESPACE}.gram_distances_"], names  # y.T, @, the op
        if distance != "euclidean":
            assert same_bits(out, expected)
        assert out[3, 7] == 0 and (out.diagonal() == 0).all()
        with mock.patch.object(torch.compiler, "is_compiling", return_value=True):
            _, names, _ = block_of(x, distance)
        assert not any("gram_distances_" in n for n in names)


@pytest.mark.cuda
@pytest.mark.parametrize("distance", distances.NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_block_is_the_torch_passes(dtype, distance):
    """On a GPU: block() runs the op, bitwise equal to the torch passes on CUDA and to the CPU op on the same gram
    (one correctly rounded square root everywhere, no FMA contraction)."""
    if "cuda" not in distances.EPILOGUE_DEVICES:
        pytest.skip("_C without the CUDA kernels")
    inputs = sample(500, 300, distance, dtype, seed=6, device="cuda")
    ours = op(inputs, distance)
    assert same_bits(ours.cpu(), distances.epilogue(inputs[0].clone(), *inputs[1:], distance).cpu())
    cpu = [t.cpu() if t is not None else None for t in inputs]
    assert same_bits(ours.cpu(), op(cpu, distance))
    x = torch.randn(64, 8, device="cuda", dtype=dtype)
    with OpLog() as log:
        rx = distances.rows(x, distance)
        sq, keys = distances.squared_norms(rx, distance), distances.row_keys(rx)
        distances.block(rx, rx, sq, sq, keys, keys, distance)
    assert f"{_library.NAMESPACE}.gram_distances_" in log.names
