"""pytest-benchmark timings at a small CPU shape (nothing asserted about them), and smoke tests of the benchmark
program (tripletloss_cuda/cli/bench.py; benchmarks/bench.py is a shim that runs it).

pytest tests/cli/test_bench.py                     # timings in pytest-benchmark's table
"""

import json
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import tripletloss_cuda as tl
from tripletloss_cuda.cli import bench

ROW_KEYS = {"device", "dtype", "n", "d", "mode", "impl", "status", "min_bytes", "median_s", "p20_s", "p80_s", "gbps"}


@pytest.mark.parametrize("fn", [tl.triplet_margin_loss, F.triplet_margin_loss], ids=["tripletloss_cuda", "torch"])
def test_fwd_bwd_1024x128_float32(benchmark, fn):
    benchmark.group = "fwd+bwd cpu float32 1024x128"
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(1024, 128, generator=gen, requires_grad=True) for _ in range(3)]
    grads = benchmark(lambda: torch.autograd.grad(fn(*inputs), inputs))
    assert [g.shape for g in grads] == [x.shape for x in inputs]


def test_run_rows():
    impls = ["naive", "torch", "tl"]
    rows = bench.run("cpu", shapes=[(64, 32)], dtypes=["float32"], modes=["fwd", "fwdbwd"], impls=impls, quick=True)
    assert [(r["mode"], r["impl"]) for r in rows] == [(m, i) for m in bench.MODES for i in impls]
    for r in rows:
        assert r["status"] == "ok", r
        assert ROW_KEYS <= r.keys()
        assert r["p20_s"] <= r["median_s"] <= r["p80_s"] and r["median_s"] > 0
        assert r["min_bytes"] == (3 if r["mode"] == "fwd" else 9) * 64 * 32 * 4
    bench.annotate(rows, copy_gbps=10.0)
    assert all("pct_copy" in r and ("tl_speedup" in r) == (r["impl"] != "tl") for r in rows)


def test_main_writes_results(tmp_path, capsys):
    out = tmp_path / "out.json"
    args = ["--quick", "--shapes", "16x8", "--dtypes", "bfloat16", "--modes", "fwdbwd", "--impls", "torch,tl"]
    assert bench.main(args + ["--repeats", "2", "--json", str(out), "--out-dir", str(tmp_path / "results")]) == 0
    result = json.loads(out.read_text())
    assert {"device_name", "torch", "tripletloss_cuda", "git_commit", "date", "copy_gbps"} <= result["meta"].keys()
    assert [(r["impl"], r["status"], r["repeats"]) for r in result["rows"]] == [("torch", "ok", 2), ("tl", "ok", 2)]
    assert sorted(p.suffix for p in (tmp_path / "results").iterdir()) == [".json", ".md"]
    assert "| bfloat16 | 16×8 | fwd+bwd |" in capsys.readouterr().out


def test_error_rows_do_not_stop_the_run(monkeypatch):
    def failing(impl, distance="pnorm"):
        raise RuntimeError("CUDA out of memory. Tried to allocate 1 GiB") if impl == "tl" else ValueError("broken")

    monkeypatch.setattr(bench, "_make_impl", failing)
    rows = bench.run("cpu", shapes=[(8, 4)], dtypes=["float32"], modes=["fwd"], impls=["tl", "compile", "torch"])
    assert [r["status"] for r in rows] == ["oom", "n/a", "error"]
    assert "n/a" in bench.markdown(bench.metadata("cpu"), bench.annotate(rows))


def test_plot_draws_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    rows = bench.run(
        "cpu", shapes=[(16, 8), (32, 8)], dtypes=["float32"], modes=["fwd"], impls=["torch", "tl"], quick=True
    )
    rows.append(dict(rows[-1], impl="compile", status="n/a"))  # failed rows are left out of the plot
    meta = dict(bench.metadata("cpu"), copy_gbps=10.0)
    path = bench.plot(meta, bench.annotate(rows, 10.0), tmp_path / "bench.png")
    assert path.read_bytes().startswith(b"\x89PNG")


def test_shim_runs_the_package_program(tmp_path):
    script = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "bench.py"  # this checkout's shim
    args = ["--quick", "--shapes", "8x4", "--dtypes", "float32", "--modes", "fwd", "--impls", "tl", "--repeats", "1"]
    out = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert "| float32 | 8×4 | fwd |" in out.stdout


def test_cosine_rows():
    """--distance cosine: F.triplet_margin_with_distance_loss with a cosine lambda, eager and compiled, against
    tl.triplet_margin_with_distance_loss(distance_function=tl.cosine_distance); no naive module."""
    rows = bench.run("cpu", shapes=[(32, 16)], dtypes=["float32"], modes=["fwdbwd"], quick=True, distance="cosine")
    assert [r["impl"] for r in rows] == ["torch", "compile", "tl"]
    assert all(r["status"] == "ok" and r["distance"] == "cosine" for r in rows), rows
    a, p, n = (torch.randn(8, 5) for _ in range(3))
    torch.testing.assert_close(bench._tl_cosine_distance_loss(a, p, n), bench._cosine_distance_loss(a, p, n))
    table = bench.markdown(bench.metadata("cpu"), bench.annotate(rows))
    assert "tl.cosine_distance" in table and "cosine lambda" in table
