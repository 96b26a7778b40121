"""Every place the job reaches into Tunix's or JAX's internals, for one version of each.

The job uses Tunix's public API (PeftTrainer, TrainingConfig, TrainingHooks, the Gemma 3 model, the
sampler) and, for five behaviours the public API does not offer, these adaptations:

- `register_tunix_without_its_init`: skip Tunix's package `__init__` (its RL and distillation
  stacks, pandas: over a second of every start); called once, from `job/__init__.py`, because it
  must come before the first `import tunix...` anywhere.
- `CachedStepsTrainer`: Tunix's trainer with its train and eval steps compiled by the job's
  exported-step cache instead of `nnx.jit` (writes `_jitted_*_step_fn`, calls `_shard_optimizer`).
- `stop_after_current_step`: ends `train()` after the step in flight (lowers `config.max_steps`).
- `before_checkpoint_save`: a callback with the step's pending loss just before Tunix saves a
  checkpoint (wraps `checkpoint_manager.save`; reads `_checkpoint_manager`, `should_save`,
  `_prev_buffered_train_metrics`).
- `route_mlp_projections`: Gemma 3's `FeedForward.block`, rewritten for the CPU backward (model.py).
- `distributed_client`: JAX's coordination-service client, for barriers and the failure key.
- `default_loss_fn`: Tunix's own SFT loss, for benchmarks and tests that compare against it.

Nothing here is applied when this module is imported: each adaptation is a call. `check()` touches
every private name relied on, and fails in one place, with one message, when an upgrade removed one.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import sys
from collections.abc import Callable

from job import logs
from job.errors import EXIT_BAD_INPUT, JobError

WRITTEN_FOR = {"google-tunix": "0.1.7", "jax": "0.10.2"}  # the versions these adaptations were written against
PIN_HINT = "install the pinned versions (pip install -c constraints.txt ...) or update job/tunix_compat.py"


class TunixMismatch(JobError):
    """The installed Tunix (or JAX) lacks something the job relies on: a retry cannot help (exit 2)."""

    exit_code = EXIT_BAD_INPUT


def register_tunix_without_its_init() -> None:
    """Register the `tunix` package without running its `__init__.py`; its submodules (tunix.sft,
    tunix.generate, tunix.models) then import as usual, without the RL stack none of the job uses."""
    if "tunix" not in sys.modules and (spec := importlib.util.find_spec("tunix")) is not None:
        sys.modules["tunix"] = importlib.util.module_from_spec(spec)


def version_mismatches() -> list[str]:
    """"google-tunix 0.1.8 (written for 0.1.7)" for each package whose installed version differs."""
    found = []
    for name, wanted in WRITTEN_FOR.items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed != wanted:
            found.append(f"{name} {installed} (written for {wanted})")
    return found


def check() -> None:
    """Every private name and behaviour the adaptations below rely on is there, or one error says what is gone."""
    from jax._src import distributed as jax_distributed
    from jax.interpreters import pxla
    from tunix.models.gemma3 import model as gemma3
    from tunix.sft import checkpoint_manager, peft_trainer
    from tunix.utils import sharding_utils

    wanted = {
        "tunix.sft.peft_trainer.PeftTrainer._shard_optimizer": (peft_trainer.PeftTrainer, "_shard_optimizer"),
        "tunix.sft.peft_trainer.PeftTrainer.jit_train_and_eval_step": (peft_trainer.PeftTrainer, "jit_train_and_eval_step"),
        "tunix.sft.peft_trainer.PeftTrainer.create_train_step_fn": (peft_trainer.PeftTrainer, "create_train_step_fn"),
        "tunix.sft.peft_trainer.PeftTrainer.create_eval_step_fn": (peft_trainer.PeftTrainer, "create_eval_step_fn"),
        "tunix.sft.peft_trainer._default_loss_fn": (peft_trainer, "_default_loss_fn"),
        "tunix.sft.checkpoint_manager.CheckpointManager.save": (checkpoint_manager.CheckpointManager, "save"),
        "tunix.models.gemma3.model.FeedForward.block": (gemma3.FeedForward, "block"),
        "tunix.utils.sharding_utils.shard": (sharding_utils, "shard"),
        "jax.interpreters.pxla.thread_resources": (pxla, "thread_resources"),
        "jax._src.distributed.global_state": (jax_distributed, "global_state"),
    }
    missing = [name for name, (owner, attr) in wanted.items() if not hasattr(owner, attr)]
    # Instance attributes, set in __init__: read from the source rather than by building a trainer.
    import inspect

    trainer_source = inspect.getsource(peft_trainer.PeftTrainer)
    manager_source = inspect.getsource(checkpoint_manager.CheckpointManager)
    for name in ("_jitted_train_step_fn", "_jitted_eval_step_fn", "_prev_buffered_train_metrics", "config.max_steps"):
        if f"self.{name}" not in trainer_source:
            missing.append(f"PeftTrainer.{name}")
    for name in ("_checkpoint_manager", "_checkpoint_manager.should_save"):
        if f"self.{name}" not in manager_source:
            missing.append(f"CheckpointManager.{name}")
    mismatches = version_mismatches()
    if missing:
        versions = "; ".join(mismatches) or "the versions it was written for"
        raise TunixMismatch(f"installed {versions} lacks what the job relies on: {', '.join(missing)}; {PIN_HINT}")
    if mismatches:
        logs.warning(f"{'; '.join(mismatches)}: every name the job relies on is there, but its behaviour "
                     f"was not tested with these versions; if training or checkpoints misbehave, {PIN_HINT}")


# -- the trainer ----------------------------------------------------------------------------------

@functools.cache
def _peft_trainer_module():
    from tunix.sft import peft_trainer

    return peft_trainer


def trainer_class(compile_step: Callable[[str, Callable, tuple, bool], Callable]) -> type:
    """Tunix's PeftTrainer with its steps compiled by `compile_step(name, fn, objects, updates)` instead
    of nnx.jit: the same step functions, bound to the same model and optimizer."""
    from jax.interpreters import pxla

    base = _peft_trainer_module().PeftTrainer

    class CachedStepsTrainer(base):
        def jit_train_and_eval_step(self, skip_jit: bool = False, cache_nnx_graph: bool = False):
            if self._jitted_train_step_fn is None:
                self._shard_optimizer(pxla.thread_resources.env.physical_mesh)  # as Tunix does before jitting
                self._jitted_train_step_fn = compile_step("train", self.create_train_step_fn(),
                                                          (self.model, self.optimizer), True)
                self._jitted_eval_step_fn = compile_step("eval", self.create_eval_step_fn(), (self.model,), False)
            return self._jitted_train_step_fn, self._jitted_eval_step_fn

    return CachedStepsTrainer


def stop_after_current_step(trainer) -> None:
    """Called from `on_train_step_start`: the loop checks max_steps before each step, so the step
    starting now is the last one."""
    trainer.config.max_steps = trainer.train_steps


def before_checkpoint_save(trainer, callback: Callable[[int, float | None], None]) -> None:
    """Call `callback(step, pending_loss)` just before each checkpoint Tunix saves.

    Tunix reports step k's loss only after step k+1 is dispatched, but saves step k's checkpoint
    before that; `pending_loss` is that not-yet-reported loss (the value Tunix reports later), or
    None when there is none for this step.
    """
    tunix_manager = trainer.checkpoint_manager
    orbax_manager = tunix_manager._checkpoint_manager
    save = tunix_manager.save

    def save_after_callback(step, *args, force=False, **kwargs):
        if orbax_manager is not None and (force or orbax_manager.should_save(step)):
            pending = trainer._prev_buffered_train_metrics
            callback(step, pending.loss if pending is not None and pending.step + 1 == step else None)
        return save(step, *args, force=force, **kwargs)

    tunix_manager.save = save_after_callback


def default_loss_fn() -> Callable:
    """Tunix's SFT loss (cross-entropy over the target tokens), as PeftTrainer uses by default."""
    return _peft_trainer_module()._default_loss_fn


# -- the model ------------------------------------------------------------------------------------

def route_mlp_projections(project: Callable) -> None:
    """Gemma 3's FeedForward.block (tunix 0.1.7) calls `project(layer, x)` for its three projections
    in every layer whose `cpu_friendly_backward` is set; other layers run Tunix's own block.
    Idempotent: the class is patched once per process."""
    from flax import nnx
    from tunix.models.gemma3 import model as gemma3
    from tunix.utils import sharding_utils

    if getattr(gemma3.FeedForward.block, "routes_projections", False):
        return
    tunix_block = gemma3.FeedForward.block

    def block(self, x):
        if not getattr(self, "cpu_friendly_backward", False):
            return tunix_block(self, x)
        activations = nnx.gelu(project(self.gate_proj, x)) * project(self.up_proj, x)
        activations = sharding_utils.shard(activations, self.config.shd_config.act_btf)
        return project(self.down_proj, activations)

    block.routes_projections = True
    gemma3.FeedForward.block = block


# -- JAX ------------------------------------------------------------------------------------------

def distributed_client():
    """jax.distributed's coordination-service client (barriers, key-value store); None on one process."""
    from jax._src import distributed as jax_distributed

    return jax_distributed.global_state.client
