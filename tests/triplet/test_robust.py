"""Robustness beyond the value matrix: mixed precision (autocast, GradScaler), torch.func transforms, memory
that stays flat over many steps, calls from several threads (and CUDA streams), and pickling / state_dict /
torch.save of the module. The property-based (hypothesis) tests are in test_robust_properties.py."""

import gc
import io
import pickle
import threading

import pytest
import torch
import torch.nn.functional as F
from helpers import REDUCTIONS, cpu_and_cuda, fused_only, ids, make_triplet, upstream_grad, value_scale
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vmap
from torch.utils._python_dispatch import TorchDispatchMode

import tripletloss_cuda as tl
from benchmarks.leak_check import training_step

# ---------------------------------------------------------------------------------------------------------------
# Mixed precision


def _autocast_dtypes(device):
    """The autocast dtypes to test on a device: bfloat16 on CPU (its default), float16 and bfloat16 on CUDA."""
    return (torch.bfloat16,) if device == "cpu" else (torch.float16, torch.bfloat16)


def _loss_and_grads_under_autocast(fn, inputs, device, autocast_dtype, **kwargs):
    leaves = [x.detach().requires_grad_() for x in inputs]
    with torch.autocast(device, dtype=autocast_dtype):
        loss = fn(*leaves, **kwargs)
    grads = torch.autograd.grad(loss, leaves, upstream_grad(loss.shape, loss.dtype, device))
    return loss.detach(), grads


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("p", "swap"), [(2.0, False), (1.0, True), (3.0, False)], ids=("p2", "p1-swap", "p3"))
@pytest.mark.parametrize(
    "dtypes",
    [
        (torch.bfloat16,) * 3,
        (torch.float16,) * 3,
        (torch.float32,) * 3,
        (torch.float64,) * 3,
        (torch.bfloat16, torch.float32, torch.bfloat16),
    ],
    ids=("bf16", "fp16", "fp32", "fp64", "mixed"),
)
def test_autocast_matches_pytorch(kernel, device, reduction, p, swap, dtypes):
    """Under autocast the loss has PyTorch's dtype (float32 for 16-bit inputs: triplet_margin_loss is on
    autocast's float32 list; float64 stays float64) and PyTorch's value, computed in float32 from the same
    16-bit values; the gradients have the inputs' dtypes."""
    inputs = [x.to(dt) for x, dt in zip(make_triplet((37, 19), torch.float32, device, seed=3), dtypes)]
    kwargs = {"p": p, "swap": swap, "reduction": reduction}
    for autocast_dtype in _autocast_dtypes(device):
        theirs, their_grads = _loss_and_grads_under_autocast(
            F.triplet_margin_loss, inputs, device, autocast_dtype, **kwargs
        )
        with fused_only():
            ours, our_grads = _loss_and_grads_under_autocast(
                tl.triplet_margin_loss, inputs, device, autocast_dtype, **kwargs
            )
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        scale = float(value_scale(inputs, p=p, swap=swap, reduction=reduction).max())
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * scale)
        for g, g_theirs, x in zip(our_grads, their_grads, inputs):
            assert g.dtype == g_theirs.dtype == x.dtype
            # 16-bit gradients: PyTorch rounds its float32 gradient once; the fused backward rounds the
            # upstream gradient to the inputs' dtype too (one more rounding).
            tol = 1e-5 if x.dtype in (torch.float32, torch.float64) and dtypes[0] == dtypes[1] else 2e-2
            torch.testing.assert_close(g, g_theirs, rtol=tol, atol=tol * float(g_theirs.abs().max()))


class _RecordOps(TorchDispatchMode):
    """Records every op that reaches the dispatcher below autograd and autocast: (name, output dtypes/shapes)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        arg_dtypes = [a.dtype for a in args if isinstance(a, torch.Tensor)]
        self.calls.append(
            (str(func), arg_dtypes, [(o.dtype, tuple(o.shape)) for o in outs if isinstance(o, torch.Tensor)])
        )
        return out


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=ids)
def test_autocast_reads_16bit_inputs_without_a_float32_copy(kernel, device, dtype):
    """The fused ops receive the 16-bit tensors themselves: no float32 (N, D) tensor is made, forward or
    backward (PyTorch's autocast copies the three inputs to float32)."""
    shape = (64, 48)
    inputs = [x.requires_grad_() for x in make_triplet(shape, dtype, device, seed=5)]
    with _RecordOps() as ops, torch.autocast(device, dtype=torch.bfloat16):
        loss = tl.triplet_margin_loss(*inputs)
    loss.backward()
    assert loss.dtype == torch.float32
    names = [name for name, _, _ in ops.calls]
    assert "tripletloss_cuda.triplet_margin_forward.default" in names, names
    for name, arg_dtypes, outs in ops.calls:
        if name.startswith("tripletloss_cuda."):
            assert arg_dtypes[-3:] == [dtype] * 3 or arg_dtypes[:3] == [dtype] * 3, (name, arg_dtypes)
        assert (torch.float32, shape) not in outs, f"{name} made a float32 copy of an input: {outs}"
    # The check itself sees PyTorch's copies.
    with _RecordOps() as ops, torch.autocast(device, dtype=torch.bfloat16):
        F.triplet_margin_loss(*inputs)
    assert any((torch.float32, shape) in outs for _, _, outs in ops.calls)


def _train_steps(loss_fn, device, autocast_dtype, steps=3):
    """A few GradScaler training steps of a small embedding model under autocast: its final weights."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        a, p, n = (torch.randn(24, 16, generator=gen).to(device) for _ in range(3))
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=autocast_dtype):
            loss = loss_fn(model(a), model(p), model(n), margin=2.0)
        assert loss.dtype == torch.float32
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    assert scaler.get_scale() == 2.0**10  # no step skipped for inf/nan gradients
    return [w.detach().float() for w in model.parameters()]


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_grad_scaler_training_step(kernel, device):
    for autocast_dtype in _autocast_dtypes(device):
        with fused_only():
            ours = _train_steps(tl.triplet_margin_loss, device, autocast_dtype)
        theirs = _train_steps(F.triplet_margin_loss, device, autocast_dtype)
        for w, w_theirs in zip(ours, theirs):
            torch.testing.assert_close(w, w_theirs, rtol=2e-2, atol=2e-2)


def test_autocast_reference_fallback_matches_pytorch():
    """Calls outside the fused path (p = inf here) follow autocast's float32 policy too."""
    inputs = make_triplet((9, 5), torch.bfloat16, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = tl.triplet_margin_loss(*inputs, p=float("inf"))
        theirs = F.triplet_margin_loss(*inputs, p=float("inf"))
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs)


# ---------------------------------------------------------------------------------------------------------------
# torch.func


def _func_results(f, inputs, batched, reduction, swap):
    a, p, n = inputs
    A, P, N = batched
    kw = {"swap": swap, "reduction": reduction}

    def total(a, p, n):
        return f(a, p, n, **kw).sum()

    return {
        "grad": grad(total, argnums=(0, 1, 2))(a, p, n),
        "vmap": vmap(lambda a, p, n: f(a, p, n, **kw))(A, P, N),
        "vmap in_dims": vmap(lambda a, p, n: f(a, p, n, **kw), in_dims=(1, None, 0))(A.transpose(0, 1), p, N),
        "vmap(grad) per-sample": vmap(grad(total, argnums=(0, 2)))(A, P, N),
        "grad(vmap)": grad(lambda A: vmap(lambda a, p, n: f(a, p, n, **kw))(A, P, N).sum())(A),
        "jacrev": jacrev(lambda a, p, n: f(a, p, n, **kw), argnums=(0, 1, 2))(a, p, n),
    }


def _higher_order_results(f, inputs, reduction, swap):
    a, p, n = inputs
    kw = {"swap": swap, "reduction": reduction}

    def total(a):
        return f(a, p, n, **kw).sum()

    return {
        "jacrev(jacrev)": jacrev(jacrev(lambda a: f(a, p, n, **kw)))(a),
        "grad(grad)": grad(lambda a: grad(total)(a).pow(2).sum())(a),
        "jvp": jvp(lambda a, p: f(a, p, n, **kw), (a, p), (torch.ones_like(a), -p))[1],
        "jacfwd": jacfwd(lambda a: f(a, p, n, **kw))(a),
        "hessian": hessian(total)(a),
    }


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("swap", (False, True), ids=("noswap", "swap"))
def test_torch_func_matches_pytorch(kernel, reduction, swap):
    """grad, vmap (any in_dims), per-sample gradients, grad of vmap and jacrev run the fused kernels (through
    the ops' vmap rules) and give PyTorch's results."""
    inputs = make_triplet((6, 5), torch.float64, seed=7)
    batched = make_triplet((3, 6, 5), torch.float64, seed=8)
    with fused_only():
        ours = _func_results(tl.triplet_margin_loss, inputs, batched, reduction, swap)
    theirs = _func_results(F.triplet_margin_loss, inputs, batched, reduction, swap)
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("reduction", ("mean", "none"))
@pytest.mark.parametrize("swap", (False, True), ids=("noswap", "swap"))
def test_torch_func_higher_order_and_forward_mode(kernel, reduction, swap):
    """Second order (jacrev of jacrev, grad of grad) and forward mode (jvp, jacfwd, hessian) differentiate the
    reference around the fused first order: PyTorch's results, never a silent zero."""
    inputs = make_triplet((5, 4), torch.float64, seed=9)
    ours = _higher_order_results(tl.triplet_margin_loss, inputs, reduction, swap)
    theirs = _higher_order_results(F.triplet_margin_loss, inputs, reduction, swap)
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], msg=lambda m, name=name: f"{name}: {m}")
        assert theirs[name].abs().sum() > 0, name


def test_torch_func_float32_loss_under_autocast(kernel):
    inputs = make_triplet((6, 5), torch.bfloat16, seed=4)
    with torch.autocast("cpu", dtype=torch.bfloat16), fused_only():
        ours = grad(lambda a: tl.triplet_margin_loss(a, *inputs[1:]))(inputs[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theirs = grad(lambda a: F.triplet_margin_loss(a, *inputs[1:]))(inputs[0])
    assert ours.dtype == theirs.dtype == torch.bfloat16
    torch.testing.assert_close(ours, theirs, rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------------------------------------------------------
# Memory


def _rss():
    psutil = pytest.importorskip("psutil")
    gc.collect()
    return psutil.Process().memory_info().rss


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_no_memory_growth(kernel, device):
    """Forward + backward steps (eager, module, swap, 16-bit under autocast, torch.func) keep host memory
    (and CUDA allocated memory) flat after a warm-up. benchmarks/leak_check.py runs 10,000 steps."""
    module = tl.TripletMarginLoss(swap=True, reduction="sum")
    shapes = ((256, 256), (33, 7))
    inputs = [
        [x.requires_grad_() for x in make_triplet(s, dtype, device, seed=1)]
        for s in shapes
        for dtype in (torch.float32, torch.bfloat16)
    ]

    def steps(count):
        for i in range(count):
            training_step(inputs[i % len(inputs)], module, device, i)

    steps(50)  # warm-up: allocator caches, the gradient buffer cache
    rss, cuda = _rss(), torch.cuda.memory_allocated() if device == "cuda" else 0
    steps(200)  # a step allocates about 2 MB: a leak of one 256 KiB tensor per step would show as 50 MB
    growth = _rss() - rss
    assert growth < 16 * 2**20, f"host memory grew by {growth / 2**20:.1f} MiB over 200 steps"
    if device == "cuda":
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == cuda


# ---------------------------------------------------------------------------------------------------------------
# Threads and streams


def _thread_cases(device):
    cases = []
    for i, (shape, dtype, kwargs) in enumerate(
        [
            ((2048, 128), torch.float32, {}),  # large enough for the kernels' own parallel loop
            ((300, 129), torch.bfloat16, {"swap": True, "reduction": "sum"}),
            ((1000, 64), torch.float64, {"p": 1.0, "reduction": "none"}),
            ((17, 3), torch.float16, {"p": 3.0}),
        ]
    ):
        cases.append((make_triplet(shape, dtype, device, seed=i), kwargs))
    return cases


def _run_case(inputs, kwargs):
    leaves = [x.detach().requires_grad_() for x in inputs]
    loss = tl.triplet_margin_loss(*leaves, **kwargs)
    grads = torch.autograd.grad(loss, leaves, torch.ones_like(loss))
    return loss.detach(), grads


def _run_in_threads(work, count=4):
    errors, threads = [], []

    def target(k):
        try:
            work(k)
        except Exception as e:  # noqa: BLE001 (re-raised by the main thread)
            errors.append(e)

    threads = [threading.Thread(target=target, args=(k,)) for k in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def test_threads_match_serial_calls(kernel):
    """4 Python threads calling at once (forward and backward, several shapes and dtypes) get bitwise the
    results of serial calls."""
    cases = _thread_cases("cpu")
    expected = [_run_case(*case) for case in cases]
    results = {}

    def work(k):
        results[k] = [_run_case(*cases[(i + k) % len(cases)]) for i in range(2 * len(cases))]

    _run_in_threads(work)
    for k, got in results.items():
        for i, result in enumerate(got):
            torch.testing.assert_close(result, expected[(i + k) % len(cases)], rtol=0, atol=0, equal_nan=True)


@pytest.mark.cuda
def test_cuda_streams_match_serial_calls(kernel):
    """4 threads, each on its own CUDA stream, get bitwise the results of serial calls on the default stream."""
    cases = _thread_cases("cuda")
    expected = [_run_case(*case) for case in cases]
    streams = [torch.cuda.Stream() for _ in range(4)]
    results = {}
    torch.cuda.synchronize()

    def work(k):
        with torch.cuda.stream(streams[k]):
            results[k] = [_run_case(*cases[(i + k) % len(cases)]) for i in range(2 * len(cases))]
        streams[k].synchronize()

    _run_in_threads(work)
    for k, got in results.items():
        for i, result in enumerate(got):
            torch.testing.assert_close(result, expected[(i + k) % len(cases)], rtol=0, atol=0, equal_nan=True)


# ---------------------------------------------------------------------------------------------------------------
# Pickling, state_dict, torch.save


class _Model(torch.nn.Module):
    def __init__(self, criterion):
        super().__init__()
        self.embed = torch.nn.Linear(8, 4)
        self.criterion = criterion

    def forward(self, a, p, n):
        return self.criterion(self.embed(a), self.embed(p), self.embed(n))


_CONFIG = {"margin": 0.5, "p": 1.5, "eps": 1e-4, "swap": True, "reduction": "sum"}


def _assert_same_criterion(loaded, original):
    assert type(loaded) is type(original)
    for name in ("margin", "p", "eps", "swap", "reduction"):
        assert getattr(loaded, name) == getattr(original, name), name
    inputs = make_triplet((10, 8), seed=3)
    torch.testing.assert_close(loaded(*inputs), original(*inputs), rtol=0, atol=0)


def test_module_pickles():
    criterion = tl.TripletMarginLoss(**_CONFIG)
    _assert_same_criterion(pickle.loads(pickle.dumps(criterion)), criterion)


def test_module_state_dict_round_trip():
    """Like torch.nn.TripletMarginLoss, the module has no parameters or buffers: an empty state_dict that
    loads strictly, and a model holding it round-trips its weights through torch.save(weights_only=True)."""
    criterion = tl.TripletMarginLoss(**_CONFIG)
    assert dict(criterion.state_dict()) == dict(torch.nn.TripletMarginLoss().state_dict()) == {}
    criterion.load_state_dict(criterion.state_dict(), strict=True)

    model = _Model(tl.TripletMarginLoss(**_CONFIG))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = _Model(tl.TripletMarginLoss(**_CONFIG))
    fresh.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    inputs = make_triplet((10, 8), seed=4)
    torch.testing.assert_close(fresh(*inputs), model(*inputs), rtol=0, atol=0)


@pytest.mark.parametrize("criterion_type", (tl.TripletMarginLoss, torch.nn.TripletMarginLoss), ids=("ours", "torch"))
def test_whole_model_save_and_load(criterion_type):
    """torch.save of a whole model holding the loss loads with weights_only=False and gives the same results;
    with weights_only=True (the default) both ours and PyTorch's refuse the model object alike."""
    model = _Model(criterion_type(**_CONFIG))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    _assert_same_criterion(loaded.criterion, model.criterion)
    inputs = make_triplet((10, 8), seed=5)
    torch.testing.assert_close(loaded(*inputs), model(*inputs), rtol=0, atol=0)
    buffer.seek(0)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        torch.load(buffer, weights_only=True)


def test_torch_compile_under_autocast(kernel):
    """torch.compile(fullgraph=True) traces the autocast path (the dtype test and the float32 loss)."""
    inputs = [x.requires_grad_() for x in make_triplet((16, 8), torch.bfloat16, seed=6)]
    compiled = torch.compile(tl.triplet_margin_loss, fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = compiled(*inputs, swap=True), F.triplet_margin_loss(*inputs, swap=True)
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs)
    ours.backward()
    assert all(x.grad.dtype == torch.bfloat16 for x in inputs)


# ---------------------------------------------------------------------------------------------------------------
# Non-finite values (the property tests cover them broadly; these are the cases they found)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("p", (1.5, 3.0, 0.5), ids=lambda p: f"p{p:g}")
def test_nan_gradient_of_a_zero_component(kernel, device, p):
    """A component with zero difference (eps = 0) in a row whose distance is NaN: PyTorch's gradient is
    0 * NaN = NaN there, not 0."""
    nan = float("nan")
    a = torch.tensor([[nan, 2.0], [1.0, 2.0]], device=device)
    pos = torch.tensor([[nan, 0.5], [0.5, 0.5]], device=device)
    neg = torch.tensor([[nan, 2.0], [1.0, 2.0]], device=device)  # d(a, n) has a zero component
    inputs = (a, pos, neg)
    theirs = torch.autograd.grad(F.triplet_margin_loss(*[x.requires_grad_() for x in inputs], p=p, eps=0.0), inputs)
    leaves = [x.detach().requires_grad_() for x in inputs]
    with fused_only():
        ours = torch.autograd.grad(tl.triplet_margin_loss(*leaves, p=p, eps=0.0), leaves)
    torch.testing.assert_close(ours, theirs, equal_nan=True)


@pytest.mark.parametrize("p", (2.0, 3.0, 7.0), ids=lambda p: f"p{p:g}")
def test_one_component_does_not_overflow(kernel, p):
    """D = 1: PyTorch's distance is |s| for every p; |s|^p would overflow float32 for |s| > 3e38^(1/p). (PyTorch's
    gradient formula for p > 2, s |s|^(p-2) / n^(p-1), overflows to NaN for such rows; ours is the exact sgn(s):
    compared where PyTorch's is finite.)"""
    a = torch.tensor([[1e30], [3e5], [-2.0]])
    pos, neg = torch.zeros_like(a), torch.full_like(a, 5.0)
    kwargs = {"p": p, "reduction": "none"}
    theirs = loss_and_grads_simple(F.triplet_margin_loss, (a, pos, neg), **kwargs)
    with fused_only():
        ours = loss_and_grads_simple(tl.triplet_margin_loss, (a, pos, neg), **kwargs)
    assert all(torch.isfinite(x).all() for x in (ours[0], *ours[1]))
    torch.testing.assert_close(ours[0], theirs[0])
    for g, g_theirs in zip(ours[1], theirs[1]):
        finite = torch.isfinite(g_theirs)
        torch.testing.assert_close(g[finite], g_theirs[finite])
        assert (g.abs() <= 1).all()  # sgn(s) times the upstream gradient 1


def loss_and_grads_simple(fn, inputs, **kwargs):
    leaves = [x.detach().requires_grad_() for x in inputs]
    loss = fn(*leaves, **kwargs)
    return loss.detach(), torch.autograd.grad(loss.sum(), leaves)
