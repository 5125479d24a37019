"""The demo under `torchrun --nproc_per_node=2`: DistributedDataParallel with gloo on the CPU, one short epoch.
The demo compares the ranks' parameters at the end (and exits 1 if they differ); the JSON records the
largest difference per loss implementation."""

import json
import subprocess
import sys

import pytest
import torch.distributed
from helpers import child_env


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="gloo")
@pytest.mark.parametrize("extra", [[], ["--chunk-size", "16", "--memory-cap", "0.5"]], ids=["plain", "chunked"])
def test_demo_two_processes(tmp_path, extra):
    """With --chunk-size each rank's steps run cached_loss_backward on the DDP model (no_sync but the last chunk)."""
    pytest.importorskip("sklearn")
    out = tmp_path / "ddp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "tripletloss_cuda", "demo", "--epochs", "1", "--device", "cpu", "--impls", "tl,torch"]
    cmd += ["--no-progress", "--json", str(out), *extra]
    env = child_env()
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["world_size"] == 2
    assert summary["ranks_param_max_diff"] == {"tl": 0.0, "torch": 0.0}  # the replicas stayed identical
    assert summary["map"] > summary["map_untrained"]  # and they did train
    assert ("gradcache" in summary) == bool(extra)
