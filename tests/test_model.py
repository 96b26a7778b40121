"""The model stage: the tiny model's random init, and the CPU-friendly backward of the Gemma 3 MLP
computing what Tunix's own does."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tunix.models.gemma3 import model as gemma3

from job.manifest import LoraSpec, ModelSpec
from job.tunix_compat import default_loss_fn
from job.model import apply_lora, build_model, model_config, random_model

VOCAB = 512


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_random_init_is_the_seeds_and_trains_every_weight(dtype):
    config = model_config("tiny", VOCAB, dtype)
    weights = [jax.tree.leaves(nnx.state(random_model(config, seed, dtype), nnx.Param)) for seed in (3, 3, 4)]
    same, again, other = ([np.asarray(w, np.float32) for w in ws] for ws in weights)
    assert all(np.array_equal(a, b) for a, b in zip(same, again))
    assert not any(np.array_equal(a, b) for a, b in zip(same, other))
    assert {w.dtype for w in weights[0]} == {jnp.dtype(dtype)}
    # Every weight, MLP included (Gemma3's own init zeroes it, and a zero MLP never trains), is N(0, 0.02).
    assert all(0.015 < a.std() < 0.025 and abs(a.mean()) < 0.005 for a in same if a.size > 1000)
    assert sum(a.size for a in same) == sum(np.prod(x.shape) for x in jax.tree.leaves(
        nnx.state(nnx.eval_shape(lambda: gemma3.Gemma3(config, rngs=nnx.Rngs(0))), nnx.Param)))


def _batch(rows: int = 2, length: int = 32):
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(3, VOCAB, (rows, length)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(length), (rows, length))
    attention = jnp.broadcast_to(jnp.tril(jnp.ones((length, length), jnp.bool_)), (rows, length, length))
    return tokens, jnp.ones((rows, length), jnp.bool_), positions, attention


def _mlps(model) -> list[gemma3.FeedForward]:
    return [m for _, m in nnx.iter_graph(model) if isinstance(m, gemma3.FeedForward)]


def _loss_and_grads(model):
    """Loss, gradients, and how many custom-VJP projections the traced step holds."""
    graph, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        return default_loss_fn()(nnx.merge(graph, p, rest), *_batch())

    custom = str(jax.make_jaxpr(loss)(params)).count("custom_vjp_call")
    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    return value, jax.tree.leaves(grads), custom


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_cpu_backward_gives_tunix_loss_and_gradients(dtype):
    model = build_model(ModelSpec(preset="tiny", dtype=dtype), None, 3, VOCAB, "/nonexistent").model
    mlps = _mlps(model)
    assert len(mlps) == 6 and all(m.cpu_friendly_backward for m in mlps)  # on by default on CPU, full FT
    fast_loss, fast_grads, custom = _loss_and_grads(model)
    assert custom == 3 * 6  # gate, up and down projections of every layer
    for m in mlps:
        m.cpu_friendly_backward = False
    tunix_loss, tunix_grads, custom = _loss_and_grads(model)
    assert custom == 0

    assert fast_loss == tunix_loss  # the forward is the same dot_general: same bits
    tolerance = {"float32": 1e-5, "bfloat16": 2e-2}[dtype]
    for fast, tunix in zip(fast_grads, tunix_grads, strict=True):
        fast, tunix = np.asarray(fast, np.float32), np.asarray(tunix, np.float32)
        scale = np.abs(tunix).max() + 1e-12
        assert np.abs(fast - tunix).max() <= tolerance * scale


def test_lora_models_keep_tunix_projections_for_qwix():
    lora = LoraSpec(rank=4, alpha=8.0)
    model = build_model(ModelSpec(preset="tiny", dtype="float32"), lora, 3, VOCAB, "/nonexistent").model
    assert not any(getattr(m, "cpu_friendly_backward", False) for m in _mlps(model))
    # An adapter loaded onto a base model built first (final/ of a LoRA run) takes the same path.
    base = build_model(ModelSpec(preset="tiny", dtype="float32"), None, 3, VOCAB, "/nonexistent").model
    assert all(m.cpu_friendly_backward for m in _mlps(base))
    adapted = apply_lora(base, lora.rank, lora.alpha, lora.module_path, 3)
    assert not any(m.cpu_friendly_backward for m in _mlps(adapted))
    for mlp in _mlps(adapted):  # every MLP projection got its adapter
        names = {path[-1] for path, v in nnx.iter_graph(mlp) if isinstance(v, nnx.LoRAParam)}
        assert names == {"kernel_lora_a", "kernel_lora_b"}
