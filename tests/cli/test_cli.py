"""The tripletloss-cuda command: info, check, bench, demo; one-line errors with exit status 2 (bad arguments)
or 1 (a failure while running), never a traceback."""

import importlib.machinery
import json
import subprocess
import sys
import types

import pytest
import torch
from helpers import child_env

import tripletloss_cuda as tl
from tripletloss_cuda import cli
from tripletloss_cuda.cli import demo

# Subprocesses import the package under test (this checkout's, or the installed one) wherever pytest was started from.
ENV = child_env()


def run_cli(argv, capsys):
    """cli.main(argv) in-process: (exit status, stdout, stderr)."""
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse: --help (0) and bad arguments (2)
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_python_m_info():
    out = subprocess.run(
        [sys.executable, "-m", "tripletloss_cuda", "info"],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "compiled kernels" in out.stdout and "device that runs" in out.stdout


def test_info_json(capsys):
    code, out, _ = run_cli(["info", "--json"], capsys)
    info = json.loads(out)
    assert code == 0
    assert info["kernels"] == tl.info()["kernels"] and info["mining_kernels"] == tl.info()["mining_kernels"]


def test_check_quick_passes(capsys, tmp_path):
    code, out, _ = run_cli(["check", "--quick", "--device", "cpu", "--json", str(tmp_path / "c.json")], capsys)
    assert code == 0, out
    assert "gradgradcheck" in out and "FAIL" not in out and "checks passed" in out
    rows = json.loads((tmp_path / "c.json").read_text())["rows"]
    assert {r["dtype"] for r in rows} == {"float32", "float64", "float16", "bfloat16"} and all(r["ok"] for r in rows)


def test_check_fails_with_status_1(capsys, monkeypatch):
    fused = tl.triplet_margin_loss
    monkeypatch.setattr(tl, "triplet_margin_loss", lambda *a, **k: fused(*a, **k) * 1.001)  # a wrong value
    code, out, err = run_cli(["check", "--quick", "--device", "cpu", "--dtypes", "float32"], capsys)
    assert code == 1
    assert "value vs PyTorch" in out and "FAIL" in out and "FAILED" in err


def test_check_reports_a_crash_as_a_failure(capsys, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(tl, "triplet_margin_loss", crash)
    code, out, _ = run_cli(["check", "--quick", "--device", "cpu", "--dtypes", "float32,float64"], capsys)
    assert code == 1
    assert "FAIL (RuntimeError: kernel exploded" in out and "gradcheck" in out  # the other checks still ran


def test_bench_quick(capsys, tmp_path):
    args = ["bench", "--quick", "--shapes", "8x4", "--dtypes", "float32", "--modes", "fwd", "--impls", "torch,tl"]
    code, out, _ = run_cli(args + ["--repeats", "1", "--json", str(tmp_path / "b.json")], capsys)
    assert code == 0
    assert "| float32 | 8×4 | fwd |" in out
    assert [r["status"] for r in json.loads((tmp_path / "b.json").read_text())["rows"]] == ["ok", "ok"]


@pytest.mark.parametrize("flag", ["--mining", "--integrations"])
def test_bench_flag_dispatches(capsys, monkeypatch, flag):
    calls = []
    fake = types.ModuleType(f"tripletloss_cuda.cli.bench_{flag[2:]}")
    fake.__spec__ = importlib.machinery.ModuleSpec(fake.__name__, None)
    fake.main = lambda argv: calls.append(argv) or 0
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    assert run_cli(["bench", flag, "--quick"], capsys)[0] == 0
    assert calls == [["--quick"]]


@pytest.mark.parametrize(
    "case,impl", [("indexed", "tl_indexed"), ("indexed", "gather_F"), ("indexed", "pml_indices"), ("no_miner", "tl")]
)
def test_bench_integrations_row(case, impl):
    """One small row measured in process: every implementation computes the same loss."""
    pytest.importorskip("pytorch_metric_learning")
    from tripletloss_cuda.cli import bench_integrations

    spec = {"case": case, "impl": impl, "n": 64, "triplets": 200, "device": "cpu", "budget_s": 0.0, "repeats": [1, 1]}
    row = bench_integrations.measure_row(spec)
    assert row["repeats"] == 1 and row["peak_bytes"] >= 0 and row["loss_value"] > 0


BAD_ARGS = [
    [],
    ["bogus"],
    ["info", "--bogus"],
    ["check", "--dtypes", "int8"],
    ["check", "--device", "tpu"],
    ["bench", "--shapes", "3y"],
    ["bench", "--impls", "nope"],
    ["bench", "--dtypes", "float33"],
    ["bench", "--repeats", "many"],
    ["demo", "--epochs", "0"],
    ["demo", "--epochs", "x"],
    ["demo", "--impls", "tl,other"],
    ["demo", "--per-class", "1"],
    ["demo", "--chunk-size", "-1"],
    ["demo", "--chunk-size", "x"],
    ["demo", "--memory-cap", "0"],
]
if not torch.cuda.is_available():
    BAD_ARGS += [["bench", "--device", "cuda"], ["demo", "--device", "cuda"]]


@pytest.mark.parametrize("argv", BAD_ARGS, ids=" ".join)
def test_bad_arguments_give_one_line_and_status_2(capsys, argv):
    code, _, err = run_cli(argv, capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("tripletloss-cuda") and ": error: " in err, err
    assert "Traceback" not in err


def test_bad_arguments_in_a_subprocess():
    out = subprocess.run(
        [sys.executable, "-m", "tripletloss_cuda", "bench", "--shapes", "0x4"],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
        check=False,
    )
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr


def test_failures_while_running_give_one_line_and_status_1(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # scikit-learn not installed
    code, _, err = run_cli(["demo", "--epochs", "1"], capsys)
    assert code == 1
    assert (
        err == "tripletloss-cuda demo: error: RuntimeError: the demo needs scikit-learn: pip install "
        "scikit-learn (or pip install 'tripletloss_cuda[demo]')\n"
    )


@pytest.mark.parametrize("mining", [False, True], ids=["sampled", "batch-hard"])
def test_demo_one_epoch(capsys, monkeypatch, tmp_path, mining):
    pytest.importorskip("sklearn")
    calls = []
    batch_hard = tl.batch_hard_triplet_loss
    monkeypatch.setattr(tl, "batch_hard_triplet_loss", lambda *a, **k: calls.append(k) or batch_hard(*a, **k))
    out_json = tmp_path / "demo.json"
    argv = ["demo", "--epochs", "2", "--device", "cpu", "--json", str(out_json), "--no-progress"]
    argv += ["--plot", str(tmp_path / "demo.png")] if mining else ["--random-triplets"]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    result = json.loads(out_json.read_text())
    assert {"recall_at_1", "recall_at_1_untrained", "recall_at_1_raw_pixels", "map", "epoch_seconds"} <= result.keys()
    assert result["epoch_seconds"].keys() == {"tl", "naive", "torch"}
    assert result["triplets"] == ("batch-hard" if mining else "random per batch")
    assert bool(calls) == mining  # the fused path used the mining loss exactly when mining
    per_impl = result["per_impl"]
    # The same seed, model and batches: the three implementations train the same network, within rounding.
    assert max(r["map"] for r in per_impl.values()) - min(r["map"] for r in per_impl.values()) < 0.01
    assert result["map"] > result["map_untrained"]
    assert "trained: tripletloss_cuda" in out
    if mining:
        assert (tmp_path / "demo.png").read_bytes().startswith(b"\x89PNG")


def test_demo_chunk_size(capsys, monkeypatch, tmp_path):
    """--chunk-size trains with cached_loss_backward: the gradients of the plain step, so the same network
    within rounding; the memory report measures both steps and the cached one fits a larger batch."""
    pytest.importorskip("sklearn")
    calls = []
    cached = tl.cached_loss_backward
    monkeypatch.setattr(tl, "cached_loss_backward", lambda *a, **k: calls.append(a[4]) or cached(*a, **k))
    argv = ["demo", "--epochs", "1", "--device", "cpu", "--impls", "tl", "--no-progress", "--json"]
    results = {}
    for name, extra in [("plain", []), ("cached", ["--chunk-size", "16", "--memory-cap", "0.25"])]:
        code, out, err = run_cli([*argv, str(tmp_path / f"{name}.json"), *extra], capsys)
        assert code == 0, err
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert calls and set(calls) == {16}  # the training steps (and the memory report's cached steps)
    plain, chunked = results["plain"]["per_impl"]["tl"], results["cached"]["per_impl"]["tl"]
    assert abs(plain["map"] - chunked["map"]) < 1e-3 and abs(plain["final_loss"] - chunked["final_loss"]) < 1e-4
    memory = results["cached"]["gradcache"]
    assert "gradcache" not in results["plain"]
    assert memory["batch"] == 80 and memory["chunk_size"] == 16 and memory["memory_cap_mib"] == 0.25
    assert 0 < memory["cached_bytes"] < memory["plain_bytes"]
    assert 0 < memory["largest_batch_plain"] < memory["largest_batch_cached"]
    assert "largest batch under 0.25 MiB: plain step" in out


def test_largest_batch_search():
    sizes = []
    measure = lambda n: sizes.append(n) or n * n
    assert demo.largest_batch(measure, 1000, 2) == 31  # 31² = 961 <= 1000 < 32²
    assert demo.largest_batch(measure, 3, 2) == 0  # even the first size does not fit
    assert demo.largest_batch(measure, 10**9, 2, limit=64) == 64  # stops at the limit
    assert len(sizes) < 30


def test_retrieval_metrics():
    emb = torch.tensor([[0.0], [0.2], [1.0], [1.2], [0.65]])
    labels = torch.tensor([0, 0, 1, 1, 0])
    m = demo.retrieval_metrics(emb, labels)
    # Queries 0 to 3: the nearest other point has the same label and every relevant one comes first (AP 1).
    # Query 4 (label 0) ranks 2 (L1), 1 (L0), 3 (L1), 0 (L0): a miss at 1, AP = (1/2 + 2/4) / 2 = 0.5.
    assert m["recall_at_1"] == pytest.approx(4 / 5)
    assert m["map"] == pytest.approx((4 + 0.5) / 5)
