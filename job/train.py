"""Training: the Tunix PeftTrainer wired to the manifest — optimizer, checkpoints and resume, metrics, stop requests.

Full fine-tuning or LoRA is decided by the model itself (model.py): when it holds LoRA params
Tunix trains only those. Checkpoints go through Tunix/Orbax into `{run dir}/checkpoints/`;
constructing the trainer on a directory that has them restores the latest one, and `train()`
re-reads the (deterministic) batch stream from the start, skipping the batches already trained on,
so a rerun of the same manifest continues exactly where the last one stopped.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Protocol

import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tunix.sft import hooks as tunix_hooks
from tunix.sft import peft_trainer

from job import distributed, tunix_compat
from job.manifest import TrainingSpec
from job.step_cache import CachedStep
from job.tokens import Batch


PREFETCH_BATCHES = 4  # batches read, tokenized and laid out ahead of the step


class Prefetch:
    """Iterate `items` in a background thread, up to `depth` ahead, in the same order.

    The thread starts at once: a stream made before the model is built and evaluated fills its
    shuffle buffer meanwhile, so the first step does not wait for it; after that the data pipeline
    (read, render, tokenize, pack) overlaps the step instead of running between steps. An exception
    in the producer is raised here after the items before it; close() (or leaving the `with`
    block) stops the producer.
    """

    _DONE = object()

    def __init__(self, items: Iterable, depth: int = PREFETCH_BATCHES):
        self._slots: queue.Queue = queue.Queue(maxsize=depth)
        self._closing = threading.Event()
        self._ended = False
        self._thread = threading.Thread(target=self._produce, args=(items,), name="prefetch", daemon=True)
        self._thread.start()

    def _produce(self, items: Iterable) -> None:
        try:
            for item in items:
                while not self._closing.is_set():
                    try:
                        self._slots.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._closing.is_set():
                    return
            self._slots.put((self._DONE, None))
        except BaseException as err:  # handed to the consumer, raised there
            self._slots.put((self._DONE, err))

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        if self._ended:
            raise StopIteration
        item, err = self._slots.get()
        if item is self._DONE:
            self._ended = True
            if err is not None:
                raise err
            raise StopIteration
        return item

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop the producer at its next item; a daemon, it is left behind if that takes over `timeout_s`."""
        self._ended = True
        self._closing.set()
        deadline = time.monotonic() + timeout_s
        while self._thread.is_alive() and time.monotonic() < deadline:  # unblock a producer waiting on a full queue
            try:
                self._slots.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=0.1)

    def __enter__(self) -> Prefetch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def learning_rate_schedule(spec: TrainingSpec) -> optax.Schedule:
    """Linear warmup to the peak, then cosine decay to a tenth of it at the last step."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=spec.learning_rate, warmup_steps=spec.warmup_steps,
        decay_steps=max(spec.steps, spec.warmup_steps + 1), end_value=spec.learning_rate * 0.1)


def optimizer(spec: TrainingSpec) -> optax.GradientTransformation:
    # inject_hyperparams exposes the learning rate to Tunix's metrics logger.
    adamw = optax.inject_hyperparams(optax.adamw)(
        learning_rate=learning_rate_schedule(spec), weight_decay=spec.weight_decay)
    if spec.max_grad_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(spec.max_grad_norm), adamw)


def model_inputs(batch: Batch) -> dict:
    """What the loss function gets: attention stays within each example of a row (segment ids), causal."""
    segments = batch.segment_ids
    same_example = segments[:, :, None] == segments[:, None, :]
    causal = jnp.tril(jnp.ones((segments.shape[1], segments.shape[1]), jnp.bool_))
    attention_mask = same_example & (segments[:, None, :] != 0) & causal[None]
    return {"input_tokens": batch.input_tokens, "input_mask": batch.input_mask,
            "positions": batch.positions, "attention_mask": attention_mask}


@dataclasses.dataclass
class StepReport:
    step: int
    loss: float
    learning_rate: float
    tokens_per_s: float
    elapsed_s: float


class TrainingListener(Protocol):
    """What a run hears from its trainer."""

    def on_step(self, report: StepReport) -> None:
        """A step's loss (a step may be reported twice: early, just before its checkpoint, then by Tunix)."""

    def on_eval(self, step: int, eval_loss: float) -> None:
        """The held-out loss, measured at `step`."""

    def on_checkpoint(self, step: int) -> None:
        """A checkpoint of `step` is about to be written (its loss was reported already)."""


class _Hooks(tunix_hooks.TrainingHooks):
    """Tunix training hooks: per-step metrics and eval loss to the listener, a stop request honoured between steps."""

    def __init__(self, spec: TrainingSpec, listener: TrainingListener, stop: threading.Event):
        self.schedule = learning_rate_schedule(spec)
        self.tokens_per_step = spec.batch_size * spec.max_seq_len * spec.grad_accum_steps
        self.listener, self.stop = listener, stop
        self.eval_batches = 0  # set by Trainer.train: Tunix reports the eval loss summed over them
        self.started = self.last = time.perf_counter()

    def on_train_start(self, trainer):
        self.started = self.last = time.perf_counter()

    def on_train_end(self, trainer):
        pass

    def on_train_step_start(self, trainer):
        # Agreed by all processes each step (one tiny collective), so a SIGTERM to any stops all at the same step.
        if distributed.any_process(self.stop.is_set()):
            tunix_compat.stop_after_current_step(trainer)

    def on_train_step_end(self, trainer, step, loss):
        self.listener.on_step(self.report(step, loss))

    def report(self, step, loss) -> StepReport:
        now = time.perf_counter()
        # Tunix reports step k after step k+1 was dispatched; the interval still averages to the step time.
        elapsed, self.last = now - self.last, now
        return StepReport(step=int(step), loss=float(loss), learning_rate=float(self.schedule(step - 1)),
                          tokens_per_s=self.tokens_per_step / elapsed if elapsed > 0 else 0.0,
                          elapsed_s=now - self.started)

    def on_eval_step_start(self, trainer):
        pass

    def on_eval_step_end(self, trainer, eval_loss):
        self.listener.on_eval(trainer.train_steps, float(eval_loss) / max(1, self.eval_batches))

    def before_checkpoint(self, step: int, pending_loss: float | None) -> None:
        """Make every checkpoint's step loss known (and flushed) before the checkpoint is written:
        Tunix saves step k before it reports step k's loss, and a run killed in between would resume
        past a loss nobody logged."""
        if pending_loss is not None:
            self.listener.on_step(self.report(step, pending_loss))
        self.listener.on_checkpoint(step)


@dataclasses.dataclass
class TrainResult:
    start_step: int  # the step a resumed run restarted from (0 for a fresh one)
    end_step: int
    stopped_early: bool  # a stop was requested (preemption): the checkpoint at end_step is the resume point


class Trainer:
    """Owns the Tunix trainer for one run: checkpoints in `checkpoint_dir` (restored from when they
    are there), TensorBoard events in `tensorboard_dir`, what happens told to `listener`. Setting
    `stop` (from a signal handler, say) ends training after the step in flight, with a checkpoint of it.

    The train and eval steps are compiled through step_cache (warm starts) instead of nnx.jit: the
    same step functions, traced once per cache key rather than once per process. `exported_steps=False`
    leaves them to Tunix's nnx.jit (and JAX's compile cache alone): what the benchmark compares against.
    """

    def __init__(self, model: nnx.Module, spec: TrainingSpec, listener: TrainingListener, stop: threading.Event,
                 checkpoint_dir: str, tensorboard_dir: str, exported_steps: bool = True):
        if "://" not in checkpoint_dir:
            checkpoint_dir = os.path.abspath(checkpoint_dir)  # Orbax fails later, in a thread, on relative paths
        config = peft_trainer.TrainingConfig(
            eval_every_n_steps=spec.eval_every_steps or spec.steps + 1,
            max_steps=spec.steps,
            gradient_accumulation_steps=spec.grad_accum_steps if spec.grad_accum_steps > 1 else None,
            checkpoint_root_directory=checkpoint_dir,
            checkpointing_options=ocp.CheckpointManagerOptions(
                save_interval_steps=spec.checkpoint_every_steps, max_to_keep=2),
            metrics_logging_options=peft_trainer.MetricsLoggerOptions(
                log_dir=tensorboard_dir, flush_every_n_steps=spec.log_every_steps),
            pbar_description="Training",
        )
        self.spec = spec
        self.hooks = _Hooks(spec, listener, stop)
        self.exported_steps = exported_steps
        cache_key = {"training": spec.model_dump(mode="json")}
        trainer_class = tunix_compat.trainer_class(
            lambda name, fn, objs, updates: CachedStep(name, fn, objs, updates, cache_key)
        ) if exported_steps else peft_trainer.PeftTrainer
        self.trainer = trainer_class(model, optimizer(spec), config)
        self.trainer.with_gen_model_input_fn(model_inputs)
        self.trainer.with_training_hooks(self.hooks)
        tunix_compat.before_checkpoint_save(self.trainer, self.hooks.before_checkpoint)

    @property
    def restored_step(self) -> int:
        return self.trainer.train_steps

    def train(self, train_batches: Iterable[Batch], eval_batches: list[Batch]) -> TrainResult:
        """Train on `train_batches` (a Prefetch started early, so that the step never waits for data)."""
        start = self.trainer.train_steps
        self.hooks.eval_batches = len(eval_batches)
        if start < self.spec.steps or eval_batches:
            # Even with every step done (a run killed after its last checkpoint), Tunix's train()
            # evaluates the restored model first: the final eval loss is measured again, not lost.
            # skip_jit: the steps are compiled by step_cache; it only skips Tunix's nnx.jit cache report.
            self.trainer.train(train_batches, eval_batches or None, skip_jit=self.exported_steps)
        else:
            self.trainer.close()
        end = self.trainer.train_steps
        return TrainResult(start_step=start, end_step=end, stopped_early=end < self.spec.steps)
