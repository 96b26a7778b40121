"""Warm starts: a start that finds its exported train step skips tracing it, and trains exactly as a cold start."""

from __future__ import annotations

import threading
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from job.dataset import training_batches
from job.manifest import load_manifest
from job.model import build_model
from job.step_cache import CACHE_SUBDIR
from job.tokens import load_tokenizer
from job.train import Trainer

DEMO = Path(__file__).resolve().parent.parent / "manifests" / "local_tiny.json"
SMALL = ["training.steps=2", "training.batch_size=2", "training.max_seq_len=72", "training.warmup_steps=1",
         "training.checkpoint_every_steps=100", "dataset.holdout=0"]


@pytest.fixture
def compile_cache(tmp_path):
    saved = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax"))
    yield tmp_path / "jax"
    jax.config.update("jax_compilation_cache_dir", saved)


def train(work: Path, *overrides: str, exported_steps: bool = True) -> tuple[list[float], list[np.ndarray]]:
    """A few steps through the job's Trainer; the step losses and the trained weights."""
    m = load_manifest(str(DEMO), [*SMALL, *overrides])
    tok = load_tokenizer(None)
    model = build_model(m.model, None, m.seed, tok.vocab_size, str(work / "cache")).model
    losses: list[float] = []

    class Listener:
        def on_step(self, report):
            losses.append(report.loss)

        def on_eval(self, step, eval_loss):
            pass

        def on_checkpoint(self, step):
            pass

    trainer = Trainer(model, m.training, Listener(), threading.Event(), checkpoint_dir=str(work / "ckpt"),
                      tensorboard_dir=str(work / "tb"), exported_steps=exported_steps)
    trainer.train(training_batches(m, tok, m.seed), [])
    return losses, [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def saved_steps(cache: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((cache / CACHE_SUBDIR).glob("*"))}


def test_a_warm_start_loads_the_exported_step_and_trains_bit_identically(compile_cache, tmp_path, monkeypatch):
    cold = train(tmp_path / "cold")
    (name, exported), = saved_steps(compile_cache).items()
    assert name.startswith("train-") and exported

    def no_tracing(*args, **kwargs):
        raise AssertionError("a warm start traced the step again")

    monkeypatch.setattr(jax.export, "export", no_tracing)
    warm = train(tmp_path / "warm")
    assert warm[0] == cold[0] and len(cold[0]) >= 2
    assert all(np.array_equal(a, b) for a, b in zip(warm[1], cold[1]))
    assert saved_steps(compile_cache) == {name: exported}

    monkeypatch.undo()  # another learning rate is another program
    train(tmp_path / "other", "training.learning_rate=0.001")
    assert len(saved_steps(compile_cache)) == 2


def test_an_unreadable_exported_step_is_traced_again_and_replaced(compile_cache, tmp_path, capsys):
    cold = train(tmp_path / "cold")
    (name, _), = saved_steps(compile_cache).items()
    (compile_cache / CACHE_SUBDIR / name).write_bytes(b"not an exported step")
    again = train(tmp_path / "again")
    assert "exported step unreadable; tracing it again" in capsys.readouterr().err
    assert again[0] == cold[0]
    (replaced, exported), = saved_steps(compile_cache).items()
    assert replaced == name and jax.export.deserialize(bytearray(exported)).fun_name


def test_without_exported_steps_tunix_compiles_the_same_training(compile_cache, tmp_path):
    """The benchmark's comparison (JAX's compile cache alone) trains the same model: only the compile path differs."""
    exported = train(tmp_path / "exported")
    plain = train(tmp_path / "plain", exported_steps=False)
    np.testing.assert_allclose(plain[0], exported[0], rtol=1e-5)
    assert len(saved_steps(compile_cache)) == 1  # the plain run exported nothing
