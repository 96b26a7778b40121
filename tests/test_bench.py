"""Tests for scripts/bench.py: its synthetic workload and its worker processes (the full `make bench`
takes minutes, so it is not run here)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_synthetic_dataset_has_the_lognormal_length_mix_and_fits_the_rows(bench, tmp_path):
    from job.dataset import DataCounts, prepare
    from job.manifest import load_manifest
    from job.tokens import load_tokenizer

    bench.write_dataset(tmp_path / "train.jsonl", 600, seed=0, max_len=512)
    m = load_manifest(str(bench.write_manifest(tmp_path, "t", {})))
    counts = DataCounts()
    assert sum(1 for _ in prepare(m, load_tokenizer(None), counts=counts)) == 600
    assert counts.rejected == 0
    lengths = np.asarray(counts.lengths)
    assert 45 <= np.median(lengths) <= 80, np.median(lengths)
    assert lengths.max() <= 512 and np.percentile(lengths, 95) > 2.5 * np.median(lengths), "a long tail"
    again = tmp_path / "again.jsonl"
    bench.write_dataset(again, 600, seed=0, max_len=512)
    assert again.read_bytes() == (tmp_path / "train.jsonl").read_bytes(), "seeded"


def test_workers_run_in_fresh_processes_and_report(bench, tmp_path):
    mm, _ = bench.run_worker("matmul", {"n": 128, "repeats": 2})
    assert len(mm["f32"]["gflops"]) == 2 and min(mm["f32"]["gflops"]) > 0
    assert mm["bf16_f32acc"]["gflops"]

    bench.write_dataset(tmp_path / "train.jsonl", 200, seed=1, max_len=512)
    manifest = bench.write_manifest(tmp_path, "d", {})
    data, _ = bench.run_worker("data", {"manifest": str(manifest), "repeats": 2})
    assert data["local"]["records"] == 200 and min(data["local"]["records_per_s"]) > 0


def test_a_variant_is_compared_with_the_default_run_beside_it(bench):
    # The machine slowed down between the main dense runs and this pair: the speedup must not show it.
    speedups = bench.variant_speedups({
        "faster": {"default": [1.2, 1.0, 1.1], "variant": [0.5, 0.55, 0.6]},
        "same": {"default": [2.0, 2.0], "variant": [2.0, 2.0]},
        "unknown flag": "worker train failed (1)",
    })
    assert speedups["faster"]["speedup"] == 1.1 / 0.55
    assert speedups["same"]["speedup"] == 1.0 and speedups["same"]["default_step_s"]["n"] == 2
    assert speedups["unknown flag"] == {"error": "worker train failed (1)"}


def test_step_profile_splits_thread_time_into_dots_and_the_rest(bench):
    figures = bench.step_profile({"step_s": [0.5, 0.7, 0.6], "threads": 2, "dot_gflop_per_step": 30.0,
                                  "dot_ms_per_step": 500.0, "other_ms_per_step": 100.0,
                                  "mlp_matmul_alone_gflops": [100.0, 120.0, 110.0]})
    assert figures["dot_gflops_per_busy_thread"] == 60.0  # 30 GFLOP in 0.5 thread-seconds
    assert figures["threads_busy_fraction"] == 0.5  # 0.6 s of ops over 2 threads x 0.6 s
    assert figures["mlp_matmul_alone_gflops"] == 110.0


def test_profile_worker_finds_the_steps_dots_in_the_trace(bench):
    p, _ = bench.run_worker("profile", {"batch": 2, "length": 32, "repeats": 2, "traced_steps": 2})
    # 6·N·T is a lower bound of the step's dot FLOPs (attention adds some; the embedding lookup none).
    assert p["dot_gflop_per_step"] > 0.5 * 6 * 5.7e6 * 2 * 32 / 1e9
    assert p["dot_ms_per_step"] > 0 and p["other_ms_per_step"] > 0 and p["ops_profiled"] > 50
    assert len(p["step_s"]) == 2 and min(p["mlp_matmul_alone_gflops"]) > 0


def test_identity_worker_times_the_check_on_a_sharded_checkpoint(bench, tmp_path):
    bench.write_dataset(tmp_path / "train.jsonl", 50, seed=0, max_len=512)
    bench.write_start_manifest(tmp_path)
    result, _ = bench.run_worker("identity", {"manifest": str(tmp_path / "start.json"), "work": str(tmp_path / "id"),
                                              "files": 4, "file_mb": 1, "repeats": 2})
    assert len(result["of_config_s"]) == 2 and 0 < min(result["of_config_s"]) < 5 and result["files"] == 4
