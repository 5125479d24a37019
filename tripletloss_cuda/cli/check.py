"""`tripletloss-cuda check`: the verification to run after installing on a new machine.

For every available device (CPU; CUDA when present) and dtype (float32, float64, float16, bfloat16), over
p in {1, 2, 3}, swap on and off and the three reductions, on random inputs:

    kernel compiled      the device has a compiled fused kernel, and the calls below take it (no fallback)
    value vs PyTorch     tl.triplet_margin_loss against F.triplet_margin_loss
    value vs reference   against tl.reference.triplet_margin_loss (pure PyTorch, written independently)
    grad vs PyTorch      gradients of the three inputs, for a random upstream gradient
    grad vs reference
    gradcheck            torch.autograd.gradcheck in float64 (finite differences), on the device
    gradgradcheck        double backward, float64

float32/float64 pass when |ours - theirs| <= tol·(|theirs| + scale) (tol 1e-5 / 1e-10; scale: the loss's
conditioning margin + d(a,p) + d(a,n) for values, the largest gradient for gradients). float16/bfloat16 are
judged against a float64 computation on the same rounded inputs: our error must be at most twice PyTorch's
own error in that dtype plus a small slack (the flash-attention criterion). Gradient rows within 1e-5 of a
kink (hinge or swap tie) are left out: rounding decides their side. The table's "worst" column is the
largest error / allowed error (pass: <= 1). Exit status 1 when any check fails.
"""

import contextlib
import itertools
import json
import sys
import time
from unittest import mock

import torch
import torch.nn.functional as F

import tripletloss_cuda as tl

from .args import ArgumentParser

DTYPES = ("float32", "float64", "float16", "bfloat16")
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
LOW_PRECISION_SLACK = {torch.float16: 1e-3, torch.bfloat16: 1e-2}
KINK_GUARD = 1e-5
CHECKS = (
    "kernel compiled",
    "value vs PyTorch",
    "value vs reference",
    "grad vs PyTorch",
    "grad vs reference",
    "gradcheck",
    "gradgradcheck",
)


class _FellBack(Exception):
    pass


@contextlib.contextmanager
def _fused_only():
    """Raise _FellBack if tl.triplet_margin_loss falls back to the reference instead of the fused kernel."""
    with mock.patch.object(tl.reference, "triplet_margin_loss", side_effect=_FellBack):
        yield


def _cases(quick):
    ps, swaps, reductions = ((2.0,), (False, True), ("mean",)) if quick else ((1.0, 2.0, 3.0), (False, True), None)
    return list(itertools.product(ps, swaps, reductions or ("none", "mean", "sum")))


def _inputs(shape, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(dtype).to(device) for _ in range(3)]


def _loss_and_grads(fn, inputs, upstream, **kwargs):
    leaves = [x.detach().requires_grad_() for x in inputs]
    loss = fn(*leaves, **kwargs)
    grads = torch.autograd.grad(loss, leaves, upstream.to(loss.dtype))
    return loss.detach(), [g.detach() for g in grads]


def _away_from_kinks(inputs, margin, p, eps, swap):
    """Rows (N,) whose hinge (and swap comparison) is not within KINK_GUARD of its kink, in float64."""
    a, pos, neg = (x.double().cpu() for x in inputs)
    d_ap = tl.reference.pairwise_distance(a, pos, p, eps)
    d_an = tl.reference.pairwise_distance(a, neg, p, eps)
    away = torch.ones_like(d_an, dtype=torch.bool)
    scale = margin + d_ap + d_an
    if swap:
        d_pn = tl.reference.pairwise_distance(pos, neg, p, eps)
        away = (d_an - d_pn).abs() >= KINK_GUARD * scale
        d_an = torch.minimum(d_an, d_pn)
    return away & ((margin + d_ap - d_an).abs() >= KINK_GUARD * scale), scale


def _ratio(ours, theirs, tol, scale):
    """max |ours - theirs| / (tol·(|theirs| + scale)): at most 1 passes."""
    ours, theirs = ours.double().cpu(), theirs.double().cpu()
    if not torch.isfinite(ours).all():
        return float("inf")
    return ((ours - theirs).abs() / (tol * (theirs.abs() + scale))).max().item() if ours.numel() else 0.0


def _ratio_low_precision(ours, yardstick, ref64, dtype):
    """err(ours vs float64) / (2·err(yardstick in `dtype` vs float64) + slack·magnitude): at most 1 passes."""
    ref64 = ref64.double().cpu()
    if not torch.isfinite(ours).all():
        return float("inf")
    err = (ours.double().cpu() - ref64).abs().max().item() if ref64.numel() else 0.0
    theirs = (yardstick.double().cpu() - ref64).abs()
    err_theirs = theirs[torch.isfinite(theirs)].max().item() if theirs.numel() else 0.0
    magnitude = ref64.abs().max().item() if ref64.numel() else 0.0
    return err / (2 * err_theirs + LOW_PRECISION_SLACK[dtype] * max(magnitude, 1e-6))


def _compare_case(device, dtype, p, swap, reduction, shape, seed, worst):
    """One case: update worst[check] with the largest error ratio of the four comparisons."""
    margin, eps = 1.0, 1e-6
    kwargs = {"margin": margin, "p": p, "swap": swap, "reduction": reduction}
    inputs = _inputs(shape, dtype, device, seed)
    away, scale = _away_from_kinks(inputs, margin, p, eps, swap)
    gen = torch.Generator().manual_seed(seed + 1)
    upstream = torch.randn(shape[0] if reduction == "none" else (), generator=gen).to(dtype).to(device)
    try:
        with _fused_only():
            ours = _loss_and_grads(tl.triplet_margin_loss, inputs, upstream, **kwargs)
    except _FellBack:
        worst["kernel compiled"] = float("inf")
        ours = _loss_and_grads(tl.triplet_margin_loss, inputs, upstream, **kwargs)
    reference = _loss_and_grads(tl.reference.triplet_margin_loss, inputs, upstream, **kwargs)
    pytorch = _loss_and_grads(F.triplet_margin_loss, inputs, upstream, **kwargs)
    mask = away.to(device)[:, None]
    if dtype in TOLERANCE:
        value_scale = {"none": scale, "mean": scale.mean(), "sum": scale.sum()}[reduction]
        for name, (loss, grads) in (("PyTorch", pytorch), ("reference", reference)):
            ratio = _ratio(ours[0], loss, TOLERANCE[dtype], value_scale)
            worst[f"value vs {name}"] = max(worst[f"value vs {name}"], ratio)
            for g_ours, g in zip(ours[1], grads, strict=True):
                g_scale = g.abs().max().item() if g.numel() else 1.0
                ratio = _ratio(g_ours * mask, g * mask, TOLERANCE[dtype], g_scale)
                worst[f"grad vs {name}"] = max(worst[f"grad vs {name}"], ratio)
        return
    # 16-bit: the float64 computation on the same rounded inputs is the truth; PyTorch and the reference run
    # in the 16-bit dtype are the yardsticks.
    ref64 = _loss_and_grads(F.triplet_margin_loss, [x.double() for x in inputs], upstream.double(), **kwargs)
    for name, (loss, grads) in (("PyTorch", pytorch), ("reference", reference)):
        ratio = _ratio_low_precision(ours[0], loss, ref64[0], dtype)
        worst[f"value vs {name}"] = max(worst[f"value vs {name}"], ratio)
        for g_ours, g, g64 in zip(ours[1], grads, ref64[1], strict=True):
            ratio = _ratio_low_precision(g_ours * mask, g * mask, g64 * mask.double(), dtype)
            worst[f"grad vs {name}"] = max(worst[f"grad vs {name}"], ratio)


def _gradchecks(device, cases, worst):
    """gradcheck and gradgradcheck in float64 on small inputs: a failure is recorded as an infinite ratio."""
    for p, swap, reduction in cases:
        inputs = [x.requires_grad_() for x in _inputs((4, 3), torch.float64, device, seed=7)]

        def fn(a, pos, neg, p=p, swap=swap, reduction=reduction):
            return tl.triplet_margin_loss(a, pos, neg, margin=1.0, p=p, swap=swap, reduction=reduction)

        for name, check in (("gradcheck", torch.autograd.gradcheck), ("gradgradcheck", torch.autograd.gradgradcheck)):
            try:
                ok = check(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4, raise_exception=False)
            except Exception:  # noqa: BLE001  (a crash is a failure of the check, reported in the table)
                ok = False
            worst[name] = max(worst[name], 0.0 if ok else float("inf"))


def devices():
    """The devices to check: the CPU, and CUDA when present."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def run(device_list=None, dtypes=DTYPES, quick=False, seeds=(0, 1)):
    """Rows of the table: dicts device, dtype, check, cases, worst (error / allowed error), ok, and error (the
    first exception of a comparison that crashed)."""
    rows = []
    cases = _cases(quick)
    shapes = [(33, 8), (17, 133)]  # short rows (several rows per thread group) and long, odd-length rows
    for device in device_list or devices():
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            worst = dict.fromkeys(CHECKS, 0.0)
            if device not in tl.info()["kernels"]:
                worst["kernel compiled"] = float("inf")
            count, error = 0, None
            for (p, swap, reduction), shape, seed in itertools.product(cases, shapes, seeds):
                try:
                    _compare_case(device, dtype, p, swap, reduction, shape, seed, worst)
                except Exception as err:  # noqa: BLE001  (a crash fails the comparisons; the other rows go on)
                    first_line = (str(err).strip().splitlines() or [""])[0]
                    error = error or f"{type(err).__name__}: {first_line[:200]} (p={p}, swap={swap}, {reduction})"
                    for check in CHECKS[1:5]:
                        worst[check] = float("inf")
                count += 1
            checks = CHECKS[:5]
            grad_cases = [c for c in cases if c[2] != "sum"]  # sum differs from mean by a constant factor
            if dtype == torch.float64:
                _gradchecks(device, grad_cases, worst)
                checks = CHECKS
            for check in checks:
                n = 1 if check == "kernel compiled" else count if "vs" in check else len(grad_cases)
                ok = worst[check] <= 1.0
                row = {"device": device, "dtype": dtype_name, "check": check, "cases": n, "worst": worst[check]}
                if error and check in CHECKS[1:5]:
                    row["error"] = error
                rows.append(dict(row, ok=ok))
    return rows


def extension_line():
    """One line on the compiled library: where it is, what it was built for, and whether it loaded."""
    info = tl.info()
    status = info["extension_status"]
    if status == "not built":
        return "extension: not built (everything runs on the pure-PyTorch reference)"
    built = f"built with torch {info['built_with_torch']} for torch >= {info['stable_abi']}"
    return f"extension: {status}: {info['extension_file']} ({built}; running torch {info['torch']})"


def table(rows):
    lines = [f"{'device':6}  {'dtype':8}  {'check':18}  {'cases':>5}  {'worst':>8}  result"]
    for r in rows:
        worst = "-" if r["check"] in ("kernel compiled", "gradcheck", "gradgradcheck") else f"{r['worst']:.3g}"
        result = "pass" if r["ok"] else "FAIL" + (f" ({r['error']})" if "error" in r else "")
        lines.append(f"{r['device']:6}  {r['dtype']:8}  {r['check']:18}  {r['cases']:>5}  {worst:>8}  {result}")
    return "\n".join(lines)


def main(argv=None):
    parser = ArgumentParser(
        prog="tripletloss-cuda check",
        description=__doc__.split("\n\n")[0] + " Exit status 1 when a check fails.",
    )
    parser.add_argument("--device", choices=["all", "cpu", "cuda"], default="all", help="default: every one present")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="default: %(default)s")
    parser.add_argument("--quick", action="store_true", help="p = 2 and reduction mean only (a smoke test)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not dtypes or any(d not in DTYPES for d in dtypes):
        parser.error(f"--dtypes: expected some of {','.join(DTYPES)}, got {args.dtypes!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    started = time.perf_counter()
    print(extension_line())
    problem = tl.info()["extension_problem"]
    if problem:
        print(problem, file=sys.stderr)
    rows = run(None if args.device == "all" else [args.device], dtypes, args.quick)
    print(table(rows))
    failed = [r for r in rows if not r["ok"]]
    elapsed = time.perf_counter() - started
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": tl.info(), "rows": rows, "ok": not failed}, f, indent=1, default=str)
    if failed or problem:
        print(f"FAILED: {len(failed)} of {len(rows)} checks ({elapsed:.1f} s)", file=sys.stderr)
        return 1
    print(f"all {len(rows)} checks passed ({elapsed:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
