"""Model: Gemma 3 presets, the random-init tiny model, weight loading, and LoRA.

The `tiny` preset is a 6-layer Gemma 3 of ~5.7 M parameters built from the run's seed, paired with
the tokenizer the job ships; it is what tests and the local demo train. Every other preset is a
real Gemma 3 size whose weights come from `model.weights_uri` (weights.py reads the formats).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx
from pydantic import ValidationError
from tunix.models.gemma3 import model as gemma3

from job import io, tunix_compat, weights
from job.errors import BadInput
from job.manifest import LoraSpec, ModelSpec

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def tiny_config(vocab_size: int) -> gemma3.ModelConfig:
    """A Gemma 3 small enough to train on a laptop CPU in minutes."""
    return gemma3.ModelConfig(
        num_layers=6, num_embed=vocab_size, embed_dim=256, hidden_dim=1024,
        num_heads=4, head_dim=64, num_kv_heads=1, sliding_window_size=512,
        local_base_frequency=10_000, global_base_frequency=1_000_000,
    )


def model_config(preset: str, vocab_size: int, dtype: str) -> gemma3.ModelConfig:
    """The Gemma 3 config for a manifest preset (tunix's own presets for the real sizes)."""
    config = tiny_config(vocab_size) if preset == "tiny" else getattr(gemma3.ModelConfig, preset)()
    # Gemma 3 configs default to bfloat16 params; the manifest decides.
    return dataclasses.replace(config, param_dtype=DTYPES[dtype])


def random_model(config: gemma3.ModelConfig, seed: int, dtype: str) -> gemma3.Gemma3:
    """Random init from the seed: N(0, 0.02) for every weight, drawn on the host in a fixed order.

    Not `Gemma3(cfg, rngs)`: that zero-initialises the MLP, which then never trains. Not jax.random
    either: that compiles a small program per weight shape, seconds of every tiny run's start, for a
    few MB of numbers numpy draws in a fraction of a second.
    """
    graphdef, state = nnx.split(nnx.eval_shape(lambda: gemma3.Gemma3(config, rngs=nnx.Rngs(params=0))))
    draw = np.random.default_rng(seed)
    weights_on_host = jax.tree.map(
        lambda x: (0.02 * draw.standard_normal(x.shape, np.float32)).astype(DTYPES[dtype]), state.to_pure_dict())
    return nnx.merge(graphdef, jax.device_put(weights_on_host))


def apply_lora(model: nnx.Module, rank: int, alpha: float, module_path: str, seed: int) -> nnx.Module:
    """Wrap the matching projections with LoRA adapters (qwix); the trainer then trains only those."""
    use_cpu_friendly_backward(model, False)  # qwix must see the projections called as Tunix calls them
    provider = qwix.LoraProvider(module_path=module_path, rank=rank, alpha=alpha)
    lora_model = qwix.apply_lora_to_model(model, provider, rngs=nnx.Rngs(seed), **model.get_model_input())
    if not has_lora(lora_model):
        raise BadInput(f"training.lora.module_path: {module_path!r} matches no layer of the model")
    return lora_model


# --- a faster backward pass on CPU ----------------------------------------------------------------
# The gradient of a projection's weight needs one of its operands transposed. XLA:CPU fuses the
# MLP's elementwise backward (GELU, gating) into that transposed copy, and the fused loop, strided
# over four inputs, costs ~20 ms per layer on the tiny model: more than the layer's matmuls. Passing
# the output gradient through an optimization barrier inside a custom VJP keeps the two apart (the
# plain transpose is cheap): the dense step is 1.1-1.2x faster (BENCHMARKS.md). The forward is the
# same dot_general (bit-identical outputs, so decoding is unchanged); gradients are the same sums,
# in a possibly different order. Only for full fine-tuning on CPU: with LoRA the base weights get
# no gradient, and qwix must see the projections called as they are.

def _dot(x: jax.Array, kernel: jax.Array, precision) -> jax.Array:
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _project(x: jax.Array, kernel: jax.Array, precision) -> jax.Array:
    return _dot(x, kernel, precision)


def _project_forward(x, kernel, precision):
    return _dot(x, kernel, precision), (x, kernel)


def _project_backward(precision, saved, grad_out):
    # Written out: JAX's own transpose rule for dot_general brings back the slow fused copy.
    x, kernel = saved
    grad_out = jax.lax.optimization_barrier(grad_out)
    grad_x = jax.lax.dot_general(grad_out, kernel, (((grad_out.ndim - 1,), (1,)), ((), ())), precision=precision)
    rows = tuple(range(x.ndim - 1))
    if x.shape[-1] > grad_out.shape[-1]:  # transpose the narrower operand (and the small result)
        grad_kernel = jax.lax.dot_general(grad_out, x, ((rows, rows), ((), ())), precision=precision).T
    else:
        grad_kernel = jax.lax.dot_general(x, grad_out, ((rows, rows), ((), ())), precision=precision)
    return grad_x, grad_kernel


_project.defvjp(_project_forward, _project_backward)


def _linear(layer: nnx.Linear, x: jax.Array) -> jax.Array:
    """`layer(x)` for a bias-free nnx.Linear, through `_project`."""
    x, kernel, _ = layer.promote_dtype((x, layer.kernel[...], None), dtype=layer.dtype)
    return _project(x, kernel, layer.precision)


def has_lora(model: nnx.Module) -> bool:
    return any(isinstance(v, nnx.LoRAParam) for _, v in nnx.iter_graph(model))


def use_cpu_friendly_backward(model: nnx.Module, on: bool = True) -> int:
    """Turn the faster CPU backward on (or off) for every MLP of a Gemma 3 model; returns how many."""
    layers = [m for _, m in nnx.iter_graph(model) if isinstance(m, gemma3.FeedForward)]
    if on:
        tunix_compat.route_mlp_projections(_linear)
    for layer in layers:
        if on and any(p.bias is not None for p in (layer.gate_proj, layer.up_proj, layer.down_proj)):
            raise ValueError("the CPU backward expects bias-free MLP projections (Gemma 3)")
        layer.cpu_friendly_backward = on
    return len(layers)


def parameter_count(model: nnx.Module, kind: type = nnx.Param) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, kind)))


# --- building the run's model -------------------------------------------------------------------

FINAL_FORMAT = "tunix-rt-job/final/1"


@dataclasses.dataclass(frozen=True)
class BuiltModel:
    model: nnx.Module
    config: gemma3.ModelConfig
    base: dict  # how to rebuild the base model: {preset, weights_uri, weights_format, dtype, seed}


def build_model(spec: ModelSpec, lora: LoraSpec | None, seed: int, vocab_size: int, cache_dir: str) -> BuiltModel:
    """The run's model: random tiny, or pretrained weights (any format weights.py reads, or a final/ dir), LoRA-wrapped when asked."""
    config = model_config(spec.preset, vocab_size, spec.dtype)
    base = {"preset": spec.preset, "weights_uri": spec.weights_uri, "weights_format": spec.weights_format,
            "dtype": spec.dtype, "seed": seed}
    if spec.weights_uri is None:
        model = random_model(config, seed, spec.dtype)
    else:
        model, base = _load(spec, config, cache_dir, base)
    if lora is not None:
        model = apply_lora(model, lora.rank, lora.alpha, lora.module_path, seed)
    if jax.default_backend() == "cpu" and not has_lora(model):  # (a LoRA final/ loads with its adapter)
        use_cpu_friendly_backward(model)
    return BuiltModel(model, config, base)


def _load(spec: ModelSpec, config: gemma3.ModelConfig, cache_dir: str, base: dict):
    model_json = io.join(spec.weights_uri, "model.json")
    if spec.weights_format in ("auto", "job") and io.exists(model_json):
        return _load_final(spec, config, cache_dir, io.read_json(model_json))
    return weights.load_pretrained(config, spec.weights_uri, spec.weights_format, spec.dtype, cache_dir), base


@dataclasses.dataclass(frozen=True)
class _Final:
    """A final/ directory's model.json, checked: the preset, the base model and seed, the adapter."""

    preset: str
    base: dict
    base_spec: ModelSpec
    seed: int
    lora: LoraSpec | None


def _final_description(spec: ModelSpec, info: Any) -> _Final:
    """model.json as written by final_description, or a BadInput naming model.weights_uri."""
    where = f"model.weights_uri: {spec.weights_uri}/model.json"
    if not isinstance(info, dict) or info.get("format") != FINAL_FORMAT:
        raise BadInput(f"{where} is not a {FINAL_FORMAT} description")
    try:
        base = info["base"]
        fields = {k: base[k] for k in ("preset", "weights_uri", "weights_format", "dtype")}
        base_spec = ModelSpec.model_validate({**spec.model_dump(), **fields})
        lora = None if info["lora"] is None else LoraSpec.model_validate(info["lora"])
        seed, preset = base["seed"], info["preset"]
        if not isinstance(preset, str) or isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise TypeError("preset or seed of the wrong type")
    except (KeyError, TypeError, ValidationError) as e:
        raise BadInput(f"{where} is damaged ({type(e).__name__}: {str(e)[:300]}); "
                       "copy the final/ directory again from the run that made it") from None
    return _Final(preset, base, base_spec, seed, lora)


def _load_final(spec: ModelSpec, config: gemma3.ModelConfig, cache_dir: str, info: Any):
    """A previous run's final/ directory: full weights, or a LoRA adapter on top of the base it names."""
    final = _final_description(spec, info)
    if final.preset != spec.preset:
        raise BadInput(f"model.preset: {spec.preset!r} but {spec.weights_uri} holds a {final.preset!r} model; "
                       f"set model.preset to {final.preset!r}")
    if final.lora is None:
        model = random_model(config, final.seed, spec.dtype) if spec.preset == "tiny" else _abstract(config)
        weights.restore_params(model, io.join(spec.weights_uri, "params"))
        return model, dict(final.base, weights_uri=spec.weights_uri, weights_format="job")
    built = build_model(final.base_spec, None, final.seed, config.num_embed, cache_dir)
    lora = final.lora
    model = apply_lora(built.model, lora.rank, lora.alpha, lora.module_path, final.seed)
    weights.restore_params(model, io.join(spec.weights_uri, "adapter"), lora_only=True)
    return model, final.base


def _abstract(config: gemma3.ModelConfig) -> gemma3.Gemma3:
    """A model with shapes and dtypes but no memory behind them: restoring fills it."""
    return nnx.eval_shape(lambda: gemma3.Gemma3(config, rngs=nnx.Rngs(0)))


def final_description(built: BuiltModel, spec: ModelSpec, lora: LoraSpec | None) -> dict:
    """final/model.json: how to rebuild the model from final/ (the base it came from, the adapter if any)."""
    cfg = built.config
    return {
        "format": FINAL_FORMAT, "preset": spec.preset, "dtype": spec.dtype,
        "config": {k: getattr(cfg, k) for k in ("num_layers", "num_embed", "embed_dim", "hidden_dim",
                                                 "num_heads", "head_dim", "num_kv_heads")},
        "lora": None if lora is None else {"rank": lora.rank, "alpha": lora.alpha, "module_path": lora.module_path},
        "base": built.base,
    }


def save_final_weights(built: BuiltModel, final_uri: str, lora: LoraSpec | None) -> None:
    """final/params (full fine-tuning) or final/adapter (LoRA): written by every process together (Orbax)."""
    if lora is None:
        weights.save_params(built.model, io.join(final_uri, "params"))
    else:
        weights.save_params(built.model, io.join(final_uri, "adapter"), lora_only=True)
