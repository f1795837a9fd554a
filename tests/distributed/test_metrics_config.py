import sys
from pathlib import Path

import pytest

from moelab.config import ConfigError, MoelabError
from moelab.data.config import DataConfig
from moelab.distributed.mesh import SINGLE, init_parallel
from moelab.distributed.metrics import reduce_metrics, reduction_of
from moelab.train.config import ParallelConfig, RunConfig

sys.path.insert(0, str(Path(__file__).parent))
import dist_workers as w  # noqa: E402


def test_reductions_are_declared():
    assert reduction_of("moe3/load_max_over_mean") == "max"
    assert reduction_of("tokens_per_second") == "sum"
    with pytest.raises(KeyError, match="declares no cross-rank reduction"):
        reduction_of("mystery")
    assert reduce_metrics({"loss": 2.0}, SINGLE) == {"loss": 2.0}


def test_metrics_reduce_across_two_ranks(tmp_path):
    results = w.run_ranks(w.reduce_check, 2, tmp_path)
    for r in results:
        assert r["ok"], r["error"]
        assert r["reduced"] == {"loss": 0.5, "grad_norm": 2.0, "tokens_per_second": 20.0, "lr": 0.1,
                                "moe0/dropped_share": 0.125, "moe0/load_max_over_mean": 2.0}


def test_parallel_config_is_validated(monkeypatch):
    with pytest.raises(ConfigError, match="parallel.ep"):
        ParallelConfig(ep=0)
    with pytest.raises(ConfigError, match="data.batch_size=6 must be divisible"):
        RunConfig(data=DataConfig(batch_size=6), parallel=ParallelConfig(dp=2, ep=2))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(MoelabError, match="must equal the 1 processes"):
        init_parallel(2, 1, timeout_s=5)
    assert init_parallel(1, 1, timeout_s=5) is SINGLE


def test_dcp_checkpoint_reshards_from_2_to_4_and_1_processes(tmp_path):
    """Saved by ep=2 after one step; loaded into fresh (differently seeded) models at dp=2 x ep=2 and
    at one process, every rank sees the same whole weights and optimizer state."""
    ck = str(tmp_path / "ck")
    for sub in ("a", "w4", "w1"):
        (tmp_path / sub).mkdir()
    saved = w.run_ranks(w.dcp_roundtrip, 2, tmp_path / "a", 1, 2, ck, "save")
    for world, dp, ep in ((4, 2, 2), (1, 1, 1)):
        loaded = w.run_ranks(w.dcp_roundtrip, world, tmp_path / f"w{world}", dp, ep, ck, "load")
        for r in saved + loaded:
            assert r["ok"], r["error"] + r.get("trace", "")
        for r in loaded:
            assert r["weights"] == saved[0]["weights"] and r["exp_avg"] == saved[0]["exp_avg"]


def test_each_torchrun_rank_takes_its_own_gpu(monkeypatch):
    """`train.device=auto|cuda` under torchrun: rank r's model, memory check and allocations go on GPU
    LOCAL_RANK, made current before anything is built (resolving plain "cuda" put every rank on GPU 0)."""
    import torch

    from moelab.distributed.mesh import rank_device

    current = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert rank_device(torch.device("cuda")) == torch.device("cuda", 3) and current == [torch.device("cuda", 3)]
    assert rank_device(torch.device("cuda", 1)) == torch.device("cuda", 1)  # named by the user: kept
    assert rank_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # the launcher left each process one GPU
    assert rank_device(torch.device("cuda")) == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(MoelabError, match="LOCAL_RANK 3 has no GPU: this machine shows 2"):
        rank_device(torch.device("cuda"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    current.clear()
    assert rank_device(torch.device("cuda")) == torch.device("cuda") and current == []  # one process: as named


def test_the_loss_mean_is_reduced_on_the_mesh_s_device(monkeypatch):
    """NCCL, the group on GPUs, has no backend for CPU tensors: the per-step loss mean must be built on the
    mesh's device (here "meta" stands for cuda), as reduce_metrics' tensors are."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from moelab.distributed.mesh import Parallel
    from moelab.distributed.trainer import ParallelRun

    seen = []
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: seen.append(t.device))
    run = ParallelRun.__new__(ParallelRun)
    run.par = Parallel(dp=2, ep=1, rank=0, mesh=SimpleNamespace(device_type="meta"))
    try:
        run.mean(1.5)
    except (RuntimeError, NotImplementedError):
        pass  # a meta tensor has no value to read back; where it was reduced is what counts
    assert [d.type for d in seen] == ["meta"]
