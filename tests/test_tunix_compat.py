"""Every private Tunix/JAX name the job relies on is there, and a missing one fails in one place, plainly."""

from __future__ import annotations

import subprocess
import sys
import types

import jax
import numpy as np
import optax
import pytest
from jax.sharding import Mesh
from tunix.models.gemma3 import model as gemma3
from tunix.sft import peft_trainer

from job import tunix_compat
from job.manifest import ModelSpec
from job.model import build_model


def test_the_installed_versions_have_everything_the_adaptations_use():
    tunix_compat.check()
    assert tunix_compat.version_mismatches() == []  # the pins in constraints.txt are the versions written for


def test_a_missing_private_name_fails_in_one_place_naming_it_and_the_fix(monkeypatch):
    monkeypatch.delattr(peft_trainer.PeftTrainer, "_shard_optimizer")
    monkeypatch.setattr(tunix_compat, "WRITTEN_FOR", {"google-tunix": "9.9.9"})
    with pytest.raises(tunix_compat.TunixMismatch) as err:
        tunix_compat.check()
    message = str(err.value)
    assert "PeftTrainer._shard_optimizer" in message
    assert "google-tunix 0.1.7 (written for 9.9.9)" in message and "constraints.txt" in message


def test_nothing_is_patched_until_asked():
    code = ("import job.run, job.train, job.model; from tunix.models.gemma3 import model as g;"
            "print(getattr(g.FeedForward.block, 'routes_projections', False))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_the_mlp_routing_is_applied_once_and_only_changes_flagged_layers():
    tunix_block = gemma3.FeedForward.block
    build_model(ModelSpec(preset="tiny"), None, 0, 256, "/nonexistent")  # on CPU: the CPU backward, routed
    routed = gemma3.FeedForward.block
    assert getattr(routed, "routes_projections", False) or routed is not tunix_block
    tunix_compat.route_mlp_projections(lambda layer, x: x)  # a second call changes nothing
    assert gemma3.FeedForward.block is routed


def test_a_stop_lowers_max_steps_to_the_step_in_flight():
    trainer = types.SimpleNamespace(config=types.SimpleNamespace(max_steps=100), train_steps=7)
    tunix_compat.stop_after_current_step(trainer)
    assert trainer.config.max_steps == 7


def test_the_checkpoint_callback_gets_the_pending_loss_only_for_its_step():
    saved, heard = [], []

    class Orbax:
        def should_save(self, step):
            return step % 2 == 0

    manager = types.SimpleNamespace(_checkpoint_manager=Orbax(), save=lambda step, *a, force=False, **k: saved.append(step))
    trainer = types.SimpleNamespace(checkpoint_manager=manager, _prev_buffered_train_metrics=None)
    tunix_compat.before_checkpoint_save(trainer, lambda step, loss: heard.append((step, loss)))
    trainer._prev_buffered_train_metrics = types.SimpleNamespace(step=3, loss=0.5)
    manager.save(4)  # step 4's loss is still pending (Tunix reports step k after step k+1 starts)
    manager.save(5)  # not a save step: no callback, Tunix's save still called
    trainer._prev_buffered_train_metrics = types.SimpleNamespace(step=1, loss=0.9)
    manager.save(6, force=True)  # pending loss is for another step
    assert heard == [(4, 0.5), (6, None)] and saved == [4, 5, 6]


def test_the_trainer_class_compiles_steps_through_the_given_function():
    calls = []
    cls = tunix_compat.trainer_class(lambda name, fn, objs, updates: calls.append((name, updates)) or fn)
    assert issubclass(cls, peft_trainer.PeftTrainer)
    model = build_model(ModelSpec(preset="tiny"), None, 0, 256, "/nonexistent").model
    trainer = cls(model, optax.sgd(0.1), peft_trainer.TrainingConfig(eval_every_n_steps=10, max_steps=1))
    with Mesh(np.array(jax.devices()[:1]), ("x",)):
        trainer.jit_train_and_eval_step()
        trainer.jit_train_and_eval_step()  # compiled once
    assert calls == [("train", True), ("eval", False)]
