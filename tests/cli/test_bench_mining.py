"""Smoke tests of the mining benchmark (tripletloss_cuda/cli/bench_mining.py, `tripletloss-cuda bench --mining`):
small cases of every mode (--quick, --scale, --split), their JSON and their tables."""

import json

import pytest

pytest.importorskip("pytorch_metric_learning")


def test_bench_mining_quick(tmp_path, capsys):
    """Smoke test of the mining benchmark: one small case of batch-all (a fresh process per row, ~4 s each),
    every implementation, JSON written."""
    from tripletloss_cuda.cli import bench_mining

    out = tmp_path / "mining.json"
    assert bench_mining.main(["--quick", "--losses", "batch_all", "--json", str(out)]) == 0

    result = json.loads(out.read_text())
    assert result["meta"]["device_kind"] == "cpu"
    impls = {row["impl"] for row in result["rows"]}
    assert {"tl", "reference", "pml"} <= impls
    assert all(row["median_s"] > 0 and row["peak_bytes"] >= 0 for row in result["rows"])
    values = {row["impl"]: row["loss_value"] for row in result["rows"]}  # the same function: the same loss
    assert values["tl"] > 0
    assert values["reference"] == pytest.approx(values["tl"], rel=1e-5)
    assert values["pml"] == pytest.approx(values["tl"], rel=1e-5)
    assert "| batch_all |" in capsys.readouterr().out


def test_bench_mining_scale_rows(tmp_path, capsys, monkeypatch):
    """Smoke test of bench --mining --scale on small cases: default chunking, a forced chunk, the whole matrix,
    and queries against references; the same loss value for every chunking of a case."""
    from tripletloss_cuda.cli import bench_mining

    monkeypatch.setattr(
        bench_mining, "SCALE_CASES", [(256, None, None), (256, None, 64), (256, None, "whole"), (64, 512, None)]
    )
    monkeypatch.setattr(bench_mining, "SCALE_D", 16)
    out = tmp_path / "scale.json"
    assert bench_mining.main(["--scale", "--losses", "semi_hard", "--json", str(out), "--out-dir", ""]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["n"], r.get("m"), r["chunk"]) for r in rows] == [
        (256, None, 256),
        (256, None, 64),
        (256, None, 256),
        (64, 512, 64),
    ]
    assert all(r["median_s"] > 0 for r in rows)
    assert rows[1]["loss_value"] == pytest.approx(rows[0]["loss_value"], rel=1e-5)
    assert rows[2]["loss_value"] == pytest.approx(rows[0]["loss_value"], rel=1e-5)
    assert "tl chunk_size=64" in capsys.readouterr().out


def test_bench_mining_split_rows(tmp_path, capsys):
    """Smoke test of bench --mining --split: the matrix product, forward and backward op times of each loss."""
    from tripletloss_cuda.cli import bench_mining

    out = tmp_path / "split.json"
    args = ["--split", "--n", "128", "--losses", "batch_hard,batch_all,semi_hard", "--json", str(out), "--out-dir", ""]
    assert bench_mining.main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["loss"], r["n"]) for r in rows] == [("batch_hard", 128), ("batch_all", 128), ("semi_hard", 128)]
    for r in rows:
        assert min(r["matmul_s"], r["forward_s"], r["backward_s"]) > 0
        assert r["ops_over_matmul"] == pytest.approx((r["forward_s"] + r["backward_s"]) / r["matmul_s"])
        assert r["fused_forward_s"] >= 0 and r["fused_backward_s"] > 0  # the fused CPU ops
        fused = (r["fused_forward_s"] + r["fused_backward_s"]) / r["matmul_s"]
        assert r["fused_over_matmul"] == pytest.approx(fused)
    out = capsys.readouterr().out
    assert "(forward + backward) / matmul" in out and "fused / matmul" in out
