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
