"""Several processes, one program: jax.distributed start-up, the device mesh, each process's rows, barriers, shared failure.

A new concern beside the data-flow stages: on a multi-host slice every host runs this same job and
they act as one. Set `JAX_COORDINATOR_ADDRESS` (host:port of process 0), `JAX_NUM_PROCESSES` and
`JAX_PROCESS_ID` and `start()` joins them through `jax.distributed`; without them (or with one
process) nothing here changes what a single process does.

Data: every process streams the same deterministic global batch sequence (so the batches do not
depend on the process count) and hands the trainer only the rows its devices hold, as one global
`jax.Array` (`jax.make_array_from_process_local_data`).

Failure: a process that fails publishes its exit code in the coordinator's key-value store; a
watchdog thread in every other process sees it and exits with the same code, so no process is left
waiting in a collective for a peer that is gone. A process that dies without a word (SIGKILL,
lost VM) is noticed by jax.distributed's heartbeat, which ends the others.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from job import logs, settings, tunix_compat
from job.errors import BadInput, JobError, Retriable
from job.settings import COORDINATOR_VAR, COUNT_VAR, SINGLE_PROCESS, Cluster

INIT_TIMEOUT_S = 300  # all processes must have joined by then (pods are scheduled at different times)
BARRIER_TIMEOUT_S = 1800  # the longest one process may run ahead of another at a barrier (eval, final/ upload)
FAILURE_KEY = "tunix-job/failed"
FAILURE_GRACE_S = 30  # how long a failing process waits for the others to hear of it before it exits
MESH_AXES = ("fsdp", "tp")
DATA_AXIS = "fsdp"  # batch rows are split over this axis, replicated over tp


_cluster = SINGLE_PROCESS
_exit_lock = threading.Lock()
_on_peer_failure: list[Callable[[int, str], None]] = []
_watchdog_stop = threading.Event()
_exiting = threading.Event()  # this process's main thread is failing by itself
PEER_GRACE_S = 10  # a peer's failure: how long this process may take to fail by itself (same error, same point)
WATCH_POLL_S = 1


def cluster() -> Cluster:
    return _cluster


def is_main() -> bool:
    """Process 0 writes the run directory's own files; every process takes part in collectives and checkpoints."""
    return _cluster.is_main


def start(wanted: Cluster | None = None) -> Cluster:
    """Join the other processes (before any other JAX use), or do nothing on one process.

    `wanted` defaults to the settings' cluster (job/settings.py parses and checks the three variables).
    """
    global _cluster
    wanted = settings.current().cluster if wanted is None else wanted
    if not wanted.is_multi:
        return _cluster
    # Cross-process collectives on CPU go through Gloo (TPU and GPU have their own; this only affects CPU).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    logs.info("joining the other processes", coordinator=wanted.coordinator, processes=wanted.count,
              process=wanted.index)
    try:
        jax.distributed.initialize(coordinator_address=wanted.coordinator, num_processes=wanted.count,
                                   process_id=wanted.index, initialization_timeout=INIT_TIMEOUT_S)
    except Exception as err:  # XLA raises its own error types with the coordinator's message
        raise Retriable(f"could not join {wanted.count} processes through {wanted.coordinator} within "
                        f"{INIT_TIMEOUT_S} s ({type(err).__name__}: {err}); check that every process started "
                        f"with the same {COORDINATOR_VAR} and {COUNT_VAR}") from None
    _cluster = wanted
    logs.info("joined", coordinator=wanted.coordinator, processes=jax.process_count(), process=jax.process_index(),
              devices=jax.device_count(), local_devices=jax.local_device_count())
    watchdog = threading.Thread(target=_watch_for_failures, name="peer-failure-watchdog", daemon=True)
    watchdog.start()
    # Registered after jax.distributed's own exit handler, so it runs first: the watchdog must not be
    # inside a coordinator call when the client shuts down (that aborts the process).
    atexit.register(_stop_watchdog, watchdog)
    return _cluster


# -- the mesh and the model on it -----------------------------------------------------------------

def check_mesh_spec(spec, batch_size: int) -> None:
    """What can be known of the mesh before its devices are: one axis at most takes the rest, and the
    batch divides by an fsdp size given. `validate` checks this on any machine; `run` again on the mesh."""
    _check_one_rest(spec.fsdp, spec.tp)
    if spec.fsdp != -1:
        _check_divisible(batch_size, spec.fsdp)


def _check_one_rest(fsdp: int, tp: int) -> None:
    if fsdp == -1 and tp == -1:
        raise BadInput("training.mesh: at most one of fsdp and tp may be -1")


def mesh_shape(fsdp: int, tp: int, devices: int) -> tuple[int, int]:
    """Axis sizes with -1 meaning "the rest of the devices"; their product must be the device count."""
    _check_one_rest(fsdp, tp)
    known = (fsdp if fsdp != -1 else 1) * (tp if tp != -1 else 1)
    if devices % known:
        raise BadInput(f"training.mesh: fsdp={fsdp} x tp={tp} does not divide the {devices} devices; "
                       f"choose sizes whose product is {devices} (or -1 for the rest)")
    fsdp, tp = (devices // known if fsdp == -1 else fsdp), (devices // known if tp == -1 else tp)
    if fsdp * tp != devices:
        raise BadInput(f"training.mesh: fsdp={fsdp} x tp={tp} = {fsdp * tp} devices, but there are {devices}; "
                       "use -1 for one axis to take the rest")
    return fsdp, tp


def build_mesh(spec) -> jax.sharding.Mesh | None:
    """The manifest's mesh over every device of every process; None on a single device (nothing to shard)."""
    if jax.device_count() == 1:
        return None
    shape = mesh_shape(spec.fsdp, spec.tp, jax.device_count())
    # Auto axes: Explicit ones (the jax.make_mesh default) break the trainer's optimizer sharding.
    mesh = jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    logs.info("device mesh", fsdp=shape[0], tp=shape[1], devices=jax.device_count(), processes=jax.process_count())
    return mesh


def check_batch(batch_size: int, mesh) -> None:
    if mesh is not None:
        _check_divisible(batch_size, mesh.shape[DATA_AXIS])


def _check_divisible(batch_size: int, data_parallel: int) -> None:
    if batch_size % data_parallel:
        raise BadInput(f"training.batch_size={batch_size} is not divisible by the data-parallel size "
                       f"{data_parallel} (training.mesh fsdp); use a multiple of it")


def shard_model(model: nnx.Module, mesh) -> nnx.Module:
    """Lay the model's weights out on the mesh as the model's sharding annotations say (replicated where none).

    The weights are built (or loaded) whole and identically in every process first, then each process
    keeps the pieces its devices hold: the initial weights do not depend on the mesh or process count.
    """
    if mesh is None:
        return model
    graph, state = nnx.split(model)
    shardings = nnx.get_named_sharding(state, mesh)

    def place(value, sharding):
        host = np.asarray(value)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    with mesh:
        placed = jax.tree.map(place, state, shardings)
    return nnx.merge(graph, placed)


def local_replica(model: nnx.Module, mesh) -> nnx.Module:
    """A whole copy of the model on this process's first device, for decoding without collectives.

    Every process decodes every eval prompt with it, exactly as a single process would (same
    program, same numbers); only process 0 writes the results.
    """
    if mesh is None:
        return model
    from jax.experimental import multihost_utils

    graph, state = nnx.split(model)
    device = jax.local_devices()[0]
    whole = jax.tree.map(lambda x: jax.device_put(np.asarray(multihost_utils.process_allgather(x, tiled=True)), device),
                         state)
    return nnx.merge(graph, whole)


# -- data ----------------------------------------------------------------------------------------

def process_rows(global_rows: int, mesh) -> slice:
    """The rows of a [global_rows, ...] batch that this process's devices hold (contiguous on a process-major mesh)."""
    sharding = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    rows = sorted({(index[0].start or 0, index[0].stop if index[0].stop is not None else global_rows)
                   for index in sharding.addressable_devices_indices_map((global_rows,)).values()})
    start, stop = rows[0][0], rows[-1][1]
    if sum(b - a for a, b in rows) != stop - start:
        raise RuntimeError(f"this process's batch rows are not contiguous: {rows}")
    return slice(start, stop)


def local_batches(batches: Iterable, mesh) -> Iterator:
    """Each global batch as global arrays built from this process's rows only (rows split over fsdp)."""
    if mesh is None:
        yield from batches
        return
    sharding = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    for batch in batches:
        yield jax.tree.map(lambda x: _global(x, sharding, mesh), batch)


def _global(x: np.ndarray, sharding: NamedSharding, mesh) -> jax.Array:
    rows = process_rows(x.shape[0], mesh)
    return jax.make_array_from_process_local_data(sharding, np.ascontiguousarray(x[rows]), x.shape)


# -- agreement between processes -----------------------------------------------------------------

def _client():
    return tunix_compat.distributed_client()


def barrier(name: str, timeout_s: float = BARRIER_TIMEOUT_S) -> None:
    """Wait until every process got here (no-op on one process); a peer that never comes fails the run."""
    if not _cluster.is_multi:
        return
    try:
        _client().wait_at_barrier(f"tunix-job/{name}", int(timeout_s * 1000))
    except Exception as err:
        raise JobError(f"processes did not all reach {name!r} within {timeout_s:.0f} s: {err}") from None


def any_process(flag: bool) -> bool:
    """True in every process when it is true in any (a small collective: call it at the same point everywhere)."""
    if not _cluster.is_multi:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.int32(flag))).any())


def same_everywhere(value: int) -> int:
    """Process 0's value (an int32) in every process: for what one process decides alone, such as a new seed."""
    if not _cluster.is_multi:
        return value
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def on_peer_failure(callback: Callable[[int, str], None]) -> None:
    """Called (in a watchdog thread) when another process failed, just before this one exits with its code."""
    _on_peer_failure.append(callback)


def exit_all(code: int, message: str) -> None:
    """This process failed: tell the others (they exit with the same code) and exit without waiting for them."""
    _exiting.set()
    with _exit_lock:
        try:
            _client().key_value_set(FAILURE_KEY, f"{code} {_cluster.index} {message}"[:4000])
        except Exception:  # another process published first: its code stands for the run
            pass
        _meet_and_exit(code)


def _meet_and_exit(code: int) -> None:
    # The process hosting the coordinator must not vanish before the others read the key: meet first.
    try:
        _client().wait_at_barrier("tunix-job/failure-heard", FAILURE_GRACE_S * 1000)
    except Exception:
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    # No jax.distributed.shutdown: its barrier would wait for processes that are gone.
    os._exit(code)


def _stop_watchdog(watchdog: threading.Thread) -> None:
    _watchdog_stop.set()
    watchdog.join(timeout=WATCH_POLL_S * 5)


def _watch_for_failures() -> None:
    client = _client()
    while not _watchdog_stop.is_set():
        try:
            value = client.blocking_key_value_get(FAILURE_KEY, WATCH_POLL_S * 1000)
        except Exception:
            continue  # not set yet (timeout), or the coordinator is gone (the heartbeat then ends us)
        code, index, message = (value.split(" ", 2) + ["", ""])[:3]
        # Most failures hit every process at the same point (bad data, a stop agreed by all): let this
        # one fail by itself, with its own status and message, unless it is stuck waiting for the peer.
        if _exiting.wait(PEER_GRACE_S) or not _exit_lock.acquire(blocking=False):
            return  # this process is itself on its way out
        logs.error(f"process {index} failed: {message}", exit_code=int(code), process=_cluster.index)
        for callback in _on_peer_failure:
            try:
                callback(int(code), f"process {index} failed: {message}")
            except Exception:
                pass
        _meet_and_exit(int(code))
