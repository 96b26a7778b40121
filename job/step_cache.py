"""Warm starts: the train and eval steps exported once, loaded by every later start.

JAX's persistent compilation cache ($JAX_COMPILATION_CACHE_DIR, set up by configure_compile_cache below)
spares a retried, resumed or repeated run XLA's compile, but not the Python tracing and lowering
in front of it: seconds of every start. So each step runs as a `jax.export` of itself, saved next
to that cache under a key of everything that shapes the program (this package's code, the library
versions, the model's structure, the shapes of its state and inputs, the training section of the
manifest, the devices). A start that finds it skips tracing and lowering; the compile cache then
supplies the executable.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx
from jax.sharding import NamedSharding

from job import distributed, io, logs, settings
from job.provenance import program_key

CACHE_SUBDIR = "exported-steps"


def configure_compile_cache() -> str | None:
    """JAX's persistent compilation cache in $JAX_COMPILATION_CACHE_DIR (a local path, or gs://...), if given.

    A retried, resumed or repeated run then loads the train step and the sampler instead of
    compiling them again (the exported steps below are kept there too). Every
    compilation is cached (JAX skips those under 1 s by default;
    $JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS still wins when set).
    """
    path = settings.current().compile_cache_dir
    if not path:
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    if settings.current().compile_cache_min_s is None:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


class CachedStep:
    """`fn(*objs, inputs)`, a Tunix step that updates the nnx objects `objs` in place, run as one
    compiled program per input shape.

    As nnx.jit does, the objects' state goes in and (when `updates`, donated) comes back out with the
    step's outputs and is written back into them.
    """

    def __init__(self, name: str, fn: Callable, objs: tuple, updates: bool, key_parts: dict):
        self.name, self.fn, self.objs, self.updates, self.key_parts = name, fn, objs, updates, key_parts
        self._graphdef, state = nnx.split(objs)
        self._state_tree = jax.tree.structure(state)
        self._programs: dict[Any, Any] = {}

    def __call__(self, inputs: Any) -> Any:
        state_leaves = jax.tree.leaves(nnx.state(self.objs))
        input_leaves, input_tree = jax.tree.flatten(inputs)
        signature = (input_tree, tuple((getattr(x, "shape", ()), str(getattr(x, "dtype", type(x)))) for x in input_leaves))
        if signature not in self._programs:
            self._programs[signature] = self._compile(state_leaves, input_leaves, input_tree)
        outputs = self._programs[signature](state_leaves, input_leaves)
        if not self.updates:
            return outputs
        new_state_leaves, outputs = outputs
        nnx.update(self.objs, jax.tree.unflatten(self._state_tree, new_state_leaves))
        return outputs

    def _pure(self, input_tree, state_avals: list) -> Callable:
        def step(state_leaves, input_leaves):
            objs = nnx.merge(self._graphdef, jax.tree.unflatten(self._state_tree, state_leaves))
            outputs = self.fn(*objs, jax.tree.unflatten(input_tree, input_leaves))
            if not self.updates:
                return outputs
            # The state leaves laid out as it came in: left to itself XLA may shard an output otherwise,
            # and the next step's state would no longer match this program.
            new_state = [jax.lax.with_sharding_constraint(x, a.sharding) if isinstance(a.sharding, NamedSharding) else x
                         for x, a in zip(jax.tree.leaves(nnx.state(objs)), state_avals)]
            return new_state, outputs
        return step

    def _compile(self, state_leaves: list, input_leaves: list, input_tree) -> Callable:
        state_avals, input_avals = _avals(state_leaves), _avals(input_leaves)
        uri = self._cache_uri(state_avals, input_avals, input_tree)
        exported = _load(uri) if uri else None
        if exported is None:
            exported = jax.export.export(jax.jit(self._pure(input_tree, state_avals)))(state_avals, input_avals)
            if uri and distributed.is_main():
                _save(uri, exported)
        donate = (0,) if self.updates else ()
        return jax.jit(exported.call, donate_argnums=donate).lower(state_leaves, input_leaves).compile()

    def _cache_uri(self, state_avals: list, input_avals: list, input_tree) -> str | None:
        root = jax.config.jax_compilation_cache_dir
        if not root:
            return None
        key = program_key(
            step=self.name, **self.key_parts,
            devices=[(d.platform, d.device_kind) for d in jax.devices()], processes=jax.process_count(),
            tracing=[jax.config.jax_enable_x64, jax.config.jax_default_matmul_precision],
            # nnx's repr of the graph names functions by address: drop the addresses.
            graph=re.sub(r"0x[0-9a-f]+", "", repr(self._graphdef)),
            state=[str(a) for a in state_avals], inputs=[str(input_tree), *map(str, input_avals)])
        return io.join(root, CACHE_SUBDIR, f"{self.name}-{key[:32]}.jaxexport")


def _avals(leaves: list) -> list[jax.ShapeDtypeStruct]:
    return [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding if isinstance(x, jax.Array) else None)
            for x in leaves]


def _load(uri: str) -> jax.export.Exported | None:
    """The exported step at `uri`, or None when there is none or it cannot be read (a cache is optional)."""
    try:
        if not io.exists(uri):
            return None
        return jax.export.deserialize(bytearray(io.read_bytes(uri)))
    except Exception as err:  # noqa: BLE001 - unreadable: export again
        logs.warning("exported step unreadable; tracing it again", uri=uri, error=f"{type(err).__name__}: {err}")
        return None


def _save(uri: str, exported: jax.export.Exported) -> None:
    try:
        io.write_bytes(uri, bytes(exported.serialize()))
    except Exception as err:  # noqa: BLE001 - the run goes on without it
        logs.warning("could not save the exported step; the next start traces it again", uri=uri,
                     error=f"{type(err).__name__}: {err}")


