"""tl.triplet_margin_with_distance_loss / tl.TripletMarginWithDistanceLoss against PyTorch's (the same distance
function given to F.triplet_margin_with_distance_loss) and the float64 reference (tl.reference with the distance
code): values and gradients for every recognized distance function, the inputs PyTorch takes (broadcasting,
strided rows, 1-D and 3-D, D = 1, N = 0, special values), PyTorch's errors, gradcheck, torch.compile, torch.func,
autocast, and PyTorch's own OpInfo samples and error inputs.

Deliberate differences from PyTorch (docs/semantics.md): 16-bit inputs are accumulated in float32 (judged against
a float64 reference, as helpers.check_against_pytorch does); the cosine's squared norms overflow float32 above
|x| ~ 1.8e19 (PyTorch's vector_norm scales and does not; its cosine is 0 there already, see test_huge_norms)."""

import contextlib
import functools
import inspect
import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    LOW_PRECISION,
    REDUCTIONS,
    assert_close,
    assert_low_precision_close,
    assert_same_error,
    cpu_and_cuda,
    fused_only,
    loss_and_grads,
    make_triplet,
    seed_of,
    value_scale,
)
from torch import nn

import tripletloss_cuda as tl

PAIRWISE, COSINE = tl.distances.TRIPLET_CODES["pairwise"], tl.distances.TRIPLET_CODES["cosine"]
# name -> (distance_function, its code, p, eps)
DISTANCES = {
    "default": (None, PAIRWISE, 2.0, 1e-6),
    "F.pairwise_distance": (F.pairwise_distance, PAIRWISE, 2.0, 1e-6),
    "PairwiseDistance": (nn.PairwiseDistance(), PAIRWISE, 2.0, 1e-6),
    "PairwiseDistance(p=1.5,eps=1e-3)": (nn.PairwiseDistance(p=1.5, eps=1e-3), PAIRWISE, 1.5, 1e-3),
    "cosine_distance": (tl.cosine_distance, COSINE, 2.0, 1e-8),
    "CosineDistance(eps=1e-4)": (tl.CosineDistance(eps=1e-4), COSINE, 2.0, 1e-4),
}
# A subset for the shape and value cases: one of each kind.
SOME = ("default", "PairwiseDistance(p=1.5,eps=1e-3)", "cosine_distance", "CosineDistance(eps=1e-4)")


def _refuse(*args, **kwargs):
    raise AssertionError("PyTorch's F.triplet_margin_with_distance_loss ran instead of the fused op")


@contextlib.contextmanager
def fused(distance):
    """The call must run the fused op (with the distance code ``distance``), not PyTorch's loss nor the reference."""
    spy = mock.patch.object(tl.ops, "fused_triplet_margin_loss", wraps=tl.ops.fused_triplet_margin_loss)
    theirs = mock.patch.object(F, "triplet_margin_with_distance_loss", _refuse)
    with fused_only(), spy as op, theirs:
        yield
    assert op.call_count == 1, op.call_args_list
    assert op.call_args.kwargs["distance"] == distance, op.call_args


def ours(*inputs, **kwargs):
    return tl.triplet_margin_with_distance_loss(*inputs, **kwargs)


def theirs(*inputs, **kwargs):
    return F.triplet_margin_with_distance_loss(*inputs, **kwargs)


_ERRORS = (RuntimeError, TypeError, ValueError, AttributeError, NotImplementedError)


def assert_same_outcome(mine, torch_call, **tol):
    """mine() gives torch_call()'s result (dtype included), or raises its error (type and message)."""
    try:
        want = torch_call()
    except _ERRORS:
        assert_same_error(mine, torch_call)
        return
    got = mine()
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, **tol)


def check(inputs, name, margin=1.0, swap=False, reduction="mean"):
    """Values and gradients against PyTorch and the reference (float64 on the same values for 16-bit inputs)."""
    fn, code, p, eps = DISTANCES[name]
    kwargs = {"distance_function": fn, "margin": margin, "swap": swap, "reduction": reduction}
    dtype = inputs[0].dtype
    torch_loss, torch_grads = loss_and_grads(theirs, inputs, **kwargs)
    low = dtype in LOW_PRECISION
    ref_inputs = [x.double() for x in inputs] if low else inputs

    def reference(*x):
        return tl.reference.triplet_margin_loss(*x, margin, p, eps, swap, reduction, distance=code)

    ref_loss, ref_grads = loss_and_grads(reference, ref_inputs, grad_dtype=dtype if low else None)
    with fused(code):
        loss, grads = loss_and_grads(ours, inputs, **kwargs)
    assert loss.dtype == torch_loss.dtype and loss.shape == torch_loss.shape, (loss, torch_loss)
    assert all(g.shape == x.shape and g.dtype == x.dtype for g, x in zip(grads, inputs))
    if low:
        assert_low_precision_close(loss, torch_loss, ref_loss, dtype, "loss")
        for g, g_torch, g_ref in zip(grads, torch_grads, ref_grads):
            assert_low_precision_close(g, g_torch, g_ref, dtype, "grad")
        return
    scale = value_scale(inputs, margin, p, eps, swap, reduction, distance=code)
    for expected, expected_grads, who in ((torch_loss, torch_grads, "PyTorch"), (ref_loss, ref_grads, "reference")):
        assert_close(loss, expected, dtype, scale, f"loss vs {who}")
        grad_scale = max((g.abs().max().item() for g in expected_grads if g.numel()), default=1.0)
        if code == COSINE:  # its gradients are O(1 / |x|) (1 here), even where they cancel to ~0 (D = 1)
            grad_scale = max(grad_scale, 1.0)
        for g, g_expected in zip(grads, expected_grads):
            assert_close(g, g_expected, dtype, grad_scale, f"grad vs {who}")


def test_signatures_and_defaults_match_pytorch():
    def parameters(fn):
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    assert parameters(tl.triplet_margin_with_distance_loss) == parameters(F.triplet_margin_with_distance_loss)
    for attr in ("__init__", "forward"):
        mine, torch_one = (
            getattr(tl.TripletMarginWithDistanceLoss, attr),
            getattr(nn.TripletMarginWithDistanceLoss, attr),
        )
        assert parameters(mine) == parameters(torch_one)
    mine, torch_one = tl.TripletMarginWithDistanceLoss(), nn.TripletMarginWithDistanceLoss()
    for attr in ("margin", "swap", "reduction"):
        assert getattr(mine, attr) == getattr(torch_one, attr)
    assert type(mine.distance_function) is nn.PairwiseDistance
    assert vars(mine.distance_function) == vars(torch_one.distance_function)
    assert parameters(tl.CosineDistance.__init__) == [
        ("self", inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty),
        ("dim", inspect.Parameter.POSITIONAL_OR_KEYWORD, -1),
        ("eps", inspect.Parameter.POSITIONAL_OR_KEYWORD, 1e-8),
    ]
    assert isinstance(tl.CosineDistance(), nn.CosineSimilarity)


def test_cosine_distance_is_one_minus_cosine_similarity():
    x, y = torch.randn(2, 5, 7, dtype=torch.float64).unbind()
    torch.testing.assert_close(tl.cosine_distance(x, y), 1 - F.cosine_similarity(x, y, dim=-1), rtol=0, atol=0)
    torch.testing.assert_close(tl.cosine_distance(x, y, 0.5), 1 - F.cosine_similarity(x, y, dim=-1, eps=0.5))
    torch.testing.assert_close(tl.CosineDistance(dim=0, eps=1e-3)(x, y), 1 - nn.CosineSimilarity(0, 1e-3)(x, y))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("name", DISTANCES)
def test_matches_pytorch(kernel, device, dtype, reduction, swap, name):
    inputs = make_triplet((17, 24), dtype, device, seed=seed_of(name, swap, reduction, str(dtype)))
    check(inputs, name, margin=0.7, swap=swap, reduction=reduction)


def test_module_matches_pytorch(kernel):
    inputs = make_triplet((9, 6), torch.float64, seed=3)
    for kwargs in ({}, {"margin": 0.3, "swap": True, "reduction": "none"}, {"distance_function": tl.CosineDistance()}):
        torch_module = nn.TripletMarginWithDistanceLoss(**kwargs)
        with fused(COSINE if kwargs.get("distance_function") else PAIRWISE):
            got = loss_and_grads(tl.TripletMarginWithDistanceLoss(**kwargs), inputs)
        torch.testing.assert_close(got, loss_and_grads(torch_module, inputs), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "shapes",
    [
        ((7, 5), (1, 5), (7, 5)),  # broadcast rows: stride 0
        ((3, 1, 5), (1, 4, 5), (3, 4, 5)),
        ((6,), (6,), (6,)),  # 1-D: a 0-d loss
        ((2, 3, 5), (2, 3, 5), (2, 3, 5)),  # 3-D: a (2, 3) loss for 'none'
        ((6, 1), (6, 1), (6, 1)),  # D = 1
        ((6, 5), (6, 1), (6, 5)),  # one input 1 wide: broadcast within the pairs too
    ],
    ids=lambda s: "-".join("x".join(map(str, x)) for x in s),
)
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("name", SOME)
def test_shapes(kernel, shapes, reduction, name):
    g = torch.Generator().manual_seed(seed_of(shapes, name))
    inputs = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    check(inputs, name, swap=True, reduction=reduction)


@pytest.mark.parametrize("layout", ["rows", "transposed", "offset"])
@pytest.mark.parametrize("name", SOME)
def test_layouts(kernel, layout, name):
    check(make_triplet((11, 8), torch.float32, layout=layout, seed=4), name, swap=True, reduction="none")


@pytest.mark.parametrize("name", SOME)
def test_last_dimension_broadcast_in_two_inputs_runs_pytorch(name):
    """(4, 1) anchor and positive with a (4, 3) negative: PyTorch's d(a, p) is over one column (not fused)."""
    fn = DISTANCES[name][0]
    a, pos, neg = torch.randn(4, 1), torch.randn(4, 1), torch.randn(4, 3)
    want = theirs(a, pos, neg, distance_function=fn, reduction="none", swap=True)
    torch.testing.assert_close(ours(a, pos, neg, distance_function=fn, reduction="none", swap=True), want)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", SOME)
def test_empty_batch(kernel, reduction, name):
    fn, code = DISTANCES[name][:2]
    inputs = [torch.randn(0, 5, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    with fused(code):
        loss = ours(*inputs, distance_function=fn, reduction=reduction)
    torch.testing.assert_close(loss, theirs(*inputs, distance_function=fn, reduction=reduction), equal_nan=True)
    loss.sum().backward()
    assert all(x.grad.shape == (0, 5) for x in inputs)


def special_rows(kind, dtype):
    """(8, 6) anchor, positive, negative with some rows of the given kind (float64 values rounded to dtype)."""
    g = torch.Generator().manual_seed(seed_of(kind))
    a, pos, neg = (torch.randn(8, 6, generator=g, dtype=torch.float64) for _ in range(3))
    if kind == "zeros":
        a[0], pos[1], neg[2], a[3], pos[3] = 0, 0, 0, 0, 0
    elif kind == "duplicates":  # anchor == positive, and positive == negative (swap ties)
        pos[:3] = a[:3]
        neg[2:5] = pos[2:5]
    elif kind == "tiny":  # norms below the cosine's eps (1e-8) and below the pairwise eps (1e-6)
        a[:3] *= 1e-10
        pos[2:5] *= 1e-12
        neg[5] = a[5] + 1e-9
    elif kind == "huge":
        a[:4] *= 1e15
        pos[2:6] *= 1e12
    elif kind == "nan":
        a[0, 1], pos[2, 0], neg[4, 5] = math.nan, math.nan, math.nan
    elif kind == "inf":
        a[0, 1], pos[2, 0], neg[4, 5], neg[6] = math.inf, -math.inf, math.inf, math.inf
    return [x.to(dtype) for x in (a, pos, neg)]


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("kind", ["zeros", "duplicates", "tiny", "huge", "nan", "inf"])
@pytest.mark.parametrize("name", SOME)
def test_special_values(kernel, name, kind, dtype, swap):
    """Zero rows, duplicate rows, norms below eps (the cosine's gradient where ATen's clamp acts: its no_grad clamp
    passes the norm's gradient on), huge norms, NaN and Inf: PyTorch's values and gradients (NaN where PyTorch's)."""
    fn, code = DISTANCES[name][:2]
    inputs = special_rows(kind, dtype)
    kwargs = {"distance_function": fn, "swap": swap, "reduction": "none"}
    want, want_grads = loss_and_grads(theirs, inputs, **kwargs)
    with fused(code):
        got, got_grads = loss_and_grads(ours, inputs, **kwargs)
    rtol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * 10, equal_nan=True)
    for g, w in zip(got_grads, want_grads):
        scale = w[torch.isfinite(w)].abs().max().item() if torch.isfinite(w).any() else 1.0
        torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * max(scale, 1.0), equal_nan=True)


def test_huge_norms_in_the_cosine():
    """Rows above |x| ~ 1.8e19 in float32: the fused cosine's squared norms overflow (inf, a NaN cosine) where
    PyTorch's vector_norm does not; at such magnitudes PyTorch's own float32 cosine is already wrong (its products
    of unit rows still hold, but x / |x| rounds), so this is a documented difference, not tested for equality.
    Below it (1e18) the two agree."""
    a, pos, neg = (torch.randn(4, 8, generator=torch.Generator().manual_seed(i)) * 1e18 for i in range(3))
    kwargs = {"distance_function": tl.cosine_distance, "reduction": "none"}
    torch.testing.assert_close(ours(a, pos, neg, **kwargs), theirs(a, pos, neg, **kwargs), rtol=1e-5, atol=1e-5)


def test_unrecognized_distance_functions_run_pytorch():
    """A lambda, a module with a hook, a subclass, keepdim=True, p outside the fused range, a CosineDistance over
    another dimension: PyTorch's loss itself, bit for bit, and the fused op is not called."""

    class Subclass(nn.PairwiseDistance):
        def forward(self, x1, x2):
            return super().forward(x1, x2) * 2

    hooked = nn.PairwiseDistance()
    hooked.register_forward_hook(lambda module, args, out: out * 3)
    functions = [
        lambda x, y: (x - y).abs().sum(-1),
        lambda x, y: 1 - F.cosine_similarity(x, y),  # dim=1: the same on 2-D rows, still PyTorch's own
        hooked,
        Subclass(),
        nn.PairwiseDistance(keepdim=True),
        nn.PairwiseDistance(p=0),
        nn.PairwiseDistance(p=math.inf),
        nn.PairwiseDistance(p=-1.0),
        tl.CosineDistance(dim=0),
        nn.CosineSimilarity(),
    ]
    inputs = make_triplet((6, 5), torch.float64, seed=9)

    def run(loss_fn, fn):
        leaves = [x.detach().requires_grad_() for x in inputs]
        loss = loss_fn(*leaves, distance_function=fn, swap=True, reduction="none")
        grads = torch.autograd.grad(loss.sum(), leaves, allow_unused=True, materialize_grads=True)
        return loss, grads

    for fn in functions:
        with mock.patch.object(tl.ops, "fused_triplet_margin_loss", side_effect=AssertionError("fused")):
            got = run(ours, fn)
        torch.testing.assert_close(got, run(theirs, fn), rtol=0, atol=0)


def test_non_float_and_mixed_inputs_match_pytorch():
    ints = [torch.randint(-5, 5, (4, 3), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    for fn in (None, tl.cosine_distance):
        for inputs in (ints, [ints[0].double(), ints[1].float(), ints[2].half()]):
            kwargs = {"distance_function": fn, "reduction": "none"}
            mine, torch_call = functools.partial(ours, *inputs, **kwargs), functools.partial(theirs, *inputs, **kwargs)
            assert_same_outcome(mine, torch_call, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(
    "case",
    [
        {"reduction": "avg"},
        {"reduction": None},
        {"margin": 0.0},
        {"margin": -1},
        {"margin": 0.0, "reduction": "avg"},  # reduction first
        {"shapes": ((4, 3), (4,), (4, 3))},
        {"shapes": ((4, 3), (4, 3), (5, 3))},
        {"shapes": ((4, 3), (4, 2), (4, 3))},
        {"shapes": ((), (), ())},
        {"non_tensor": 0},
        {"non_tensor": 2},
        {"devices": ("cpu", "meta", "cpu")},
    ],
    ids=str,
)
@pytest.mark.parametrize("name", ["default", "cosine_distance"])
def test_errors_match_pytorch(case, name):
    fn = DISTANCES[name][0]
    inputs = [torch.randn(s) for s in case.get("shapes", ((4, 3),) * 3)]
    if "non_tensor" in case:
        inputs[case["non_tensor"]] = [[0.0] * 3] * 4
    if "devices" in case:
        inputs = [x.to(d) for x, d in zip(inputs, case["devices"])]
    kwargs = {k: v for k, v in case.items() if k in ("reduction", "margin")}
    kwargs["distance_function"] = fn
    assert_same_outcome(functools.partial(ours, *inputs, **kwargs), functools.partial(theirs, *inputs, **kwargs))


@pytest.mark.parametrize("margin", [0.0, -0.5])
def test_module_errors_match_pytorch(margin):
    assert_same_error(
        lambda: tl.TripletMarginWithDistanceLoss(margin=margin), lambda: nn.TripletMarginWithDistanceLoss(margin=margin)
    )
    inputs = make_triplet((3, 4))
    assert_same_error(
        lambda: tl.TripletMarginWithDistanceLoss(reduction="avg")(*inputs),
        lambda: nn.TripletMarginWithDistanceLoss(reduction="avg")(*inputs),
    )


def test_torch_function_subclasses_go_to_pytorch():
    """__torch_function__ sees PyTorch's F.triplet_margin_with_distance_loss, as it would without tl."""
    seen = []

    class Traced(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            seen.append(func)
            return super().__torch_function__(func, types, args, kwargs or {})

    inputs = [x.as_subclass(Traced) for x in make_triplet((3, 4))]
    ours(*inputs, distance_function=tl.cosine_distance)
    assert seen[0] is F.triplet_margin_with_distance_loss


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("name", ["default", "PairwiseDistance(p=1.5,eps=1e-3)", "cosine_distance"])
def test_gradcheck(kernel, name, swap):
    fn = DISTANCES[name][0]
    inputs = [x.requires_grad_() for x in make_triplet((5, 4), torch.float64, seed=seed_of(name, swap))]
    for reduction in REDUCTIONS:
        loss = functools.partial(ours, distance_function=fn, margin=0.5, swap=swap, reduction=reduction)
        assert torch.autograd.gradcheck(loss, inputs)


class _EmbedAndLoss(nn.Module):
    def __init__(self, loss):
        super().__init__()
        self.linear = nn.Linear(16, 8)
        self.loss = loss

    def forward(self, x):
        e = self.linear(x)
        return self.loss(e[:, 0], e[:, 1], e[:, 2])


@pytest.mark.parametrize(
    "make_loss",
    [
        lambda: tl.TripletMarginWithDistanceLoss(swap=True),  # the default nn.PairwiseDistance()
        lambda: lambda a, p, n: ours(a, p, n, distance_function=tl.cosine_distance, margin=0.5, reduction="sum"),
        lambda: tl.TripletMarginWithDistanceLoss(distance_function=tl.CosineDistance()),
    ],
    ids=["module-PairwiseDistance", "functional-cosine_distance", "module-CosineDistance"],
)
def test_torch_compile_fullgraph(kernel, make_loss):
    """torch.compile(fullgraph=True) through the dispatch (no graph break): the fused op is in the graph (neither
    PyTorch's loss nor the reference is traced), the same loss and parameter gradients as eager."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _EmbedAndLoss(make_loss())
    x = torch.randn(32, 3, 16)

    def step(fn):
        model.zero_grad()
        loss = fn(x)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    eager = step(model)
    with fused_only(), mock.patch.object(F, "triplet_margin_with_distance_loss", _refuse):
        compiled = step(torch.compile(model, fullgraph=True))
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


@pytest.mark.parametrize("name", ["default", "cosine_distance"])
def test_torch_func_grad(kernel, name):
    fn = DISTANCES[name][0]
    inputs = make_triplet((7, 5), torch.float64, seed=2)
    for swap in (False, True):
        got = torch.func.grad(functools.partial(ours, distance_function=fn, swap=swap), argnums=(0, 1, 2))(*inputs)
        want = torch.func.grad(functools.partial(theirs, distance_function=fn, swap=swap), argnums=(0, 1, 2))(*inputs)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("name", SOME)
def test_cpu_autocast_matches_pytorch(kernel, name, dtype):
    """CPU autocast lists neither cosine_similarity nor pairwise_distance's norm: PyTorch's loss keeps the inputs'
    dtype, and so does ours."""
    fn, code = DISTANCES[name][:2]
    inputs = make_triplet((9, 12), dtype, seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = theirs(*inputs, distance_function=fn)
        with fused(code):
            got = ours(*inputs, distance_function=fn)
    assert got.dtype == want.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", SOME)
def test_cuda_autocast_matches_pytorch(kernel, name, dtype):
    """CUDA autocast: cosine_similarity is on the fp32 list and pairwise_distance's norm(x, p, dim) is redispatched
    with dtype=float32 (fp32_append_dtype): PyTorch's loss is float32 for 16-bit inputs, and so is ours; the
    gradients keep the inputs' dtype."""
    fn, code = DISTANCES[name][:2]
    inputs = make_triplet((33, 40), dtype, "cuda", seed=6)
    with torch.autocast("cuda"):
        want, _ = loss_and_grads(theirs, inputs, distance_function=fn)
        with fused(code):
            got, got_grads = loss_and_grads(ours, inputs, distance_function=fn)
    assert got.dtype == want.dtype == torch.float32
    assert all(g.dtype == dtype for g in got_grads)
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)


def _opinfo():
    pytest.importorskip("expecttest")  # torch.testing._internal needs it
    from torch.testing._internal.common_methods_invocations import op_db

    return next(op for op in op_db if op.name == "nn.functional.triplet_margin_with_distance_loss")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_pytorch_opinfo_samples(kernel, dtype):
    """PyTorch's OpInfo samples of nn.functional.triplet_margin_with_distance_loss (margins, swap, the reductions,
    distance_function=nn.PairwiseDistance()), through the functional and the module: PyTorch's values and
    gradients. (PyTorch's module_db has no ModuleInfo for nn.TripletMarginWithDistanceLoss; the module is run on the
    OpInfo samples' keyword arguments instead.)"""
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    samples = list(_opinfo().sample_inputs("cpu", dtype, requires_grad=True))
    assert samples
    for sample in samples:
        inputs = (sample.input, *sample.args)
        want = loss_and_grads(theirs, inputs, **sample.kwargs)
        with fused(PAIRWISE):
            got = loss_and_grads(ours, inputs, **sample.kwargs)
        torch.testing.assert_close(got, want, **tol)
        with fused(PAIRWISE):
            got = loss_and_grads(tl.TripletMarginWithDistanceLoss(**sample.kwargs), inputs)
        torch.testing.assert_close(got, want, **tol)


def test_pytorch_opinfo_error_inputs():
    errors = list(_opinfo().error_inputs("cpu"))
    assert errors
    for error in errors:
        sample = error.sample_input
        inputs = (sample.input, *sample.args)
        with pytest.raises(error.error_type, match=error.error_regex):
            ours(*inputs, **sample.kwargs)
        assert_same_error(
            functools.partial(ours, *inputs, **sample.kwargs), functools.partial(theirs, *inputs, **sample.kwargs)
        )
