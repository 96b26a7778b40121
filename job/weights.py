"""Gemma 3 weights on storage: pretrained checkpoints in, the job's params out and back.

Pretrained weights come as Hugging Face safetensors or as Google's Orbax checkpoints (the
gs://gemma-data layout); tunix's own loaders read both. Before a loader runs, the tensor shapes the
files declare are compared with the preset, so weights made for another size fail as a BadInput
that names the tensor instead of a reshape error deep inside the loader. The job's own final/
directory (model.json) is read by model.py, never here.

`save_params`/`restore_params` keep a model's params (or only its LoRA adapters) as an Orbax
checkpoint, locally or on gs://. `_hf_tensors` gives params in the Hugging Face Gemma 3 layout, the
exact inverse of tunix's safetensors loader: the shape checks use it, and so does the tests'
safetensors export (tests/hf_export.py).

This module does not import model.py, so model.py can import it.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import struct
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx
from tunix.models.gemma3 import model as gemma3
from tunix.models.gemma3 import params as gemma3_params
from tunix.models.gemma3 import params_safetensors

from job import io, strict_json
from job.errors import BadInput

# Files that mark a directory as an Orbax checkpoint (OCDBT, plain, and the old msgpack one).
_ORBAX_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt", "checkpoint")
# tunix's fast safetensors reader takes the first tensor's dtype for the whole file.
_SAFETENSORS_DTYPES = {"F32", "BF16", "F16"}
_MAX_PROBLEMS = 5
_MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors format's own limit

# Per-layer norms: Hugging Face name -> tunix name (the loader copies them unchanged).
_LAYER_NORMS = {
    "input_layernorm.weight": "pre_attention_norm.scale",
    "post_attention_layernorm.weight": "post_attention_norm.scale",
    "pre_feedforward_layernorm.weight": "pre_ffw_norm.scale",
    "post_feedforward_layernorm.weight": "post_ffw_norm.scale",
    "self_attn.q_norm.weight": "attn._query_norm.scale",
    "self_attn.k_norm.weight": "attn._key_norm.scale",
}


# ------------------------------------------------------------------------------------- helpers


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _flat(tree: Any) -> dict[str, Any]:
    """A pytree's leaves by dotted path ("layers.0.attn.q_einsum.w")."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {".".join(_key_name(k) for k in path): leaf for path, leaf in leaves}


def _describe(config: gemma3.ModelConfig) -> str:
    return (
        f"{config.num_layers} layers, embed_dim {config.embed_dim}, hidden_dim {config.hidden_dim}, "
        f"{config.num_heads} heads x {config.head_dim} ({config.num_kv_heads} kv), vocab {config.num_embed}"
    )


def _differences(found: dict[str, str], expected: dict[str, str], extra_matters: Callable[[str], bool]) -> list[str]:
    """Human-readable differences between what storage holds and what the model needs."""
    wrong = [f"{k} is {found[k]} where {expected[k]} is needed" for k in sorted(expected) if k in found and found[k] != expected[k]]
    missing = [f"{k} is missing" for k in sorted(expected.keys() - found.keys())]
    extra = [f"{k} has no place in the model" for k in sorted(found.keys() - expected.keys()) if extra_matters(k)]
    return wrong + missing + extra


def _summary(problems: list[str]) -> str:
    more = len(problems) - _MAX_PROBLEMS
    return "; ".join(problems[:_MAX_PROBLEMS]) + (f"; and {more} more" if more > 0 else "")


def _abstract_params(config: gemma3.ModelConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """The preset's params as shapes only (nothing allocated)."""
    abstract = nnx.eval_shape(lambda: gemma3.Gemma3(config, rngs=nnx.Rngs(0)))
    return _flat(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))


# ------------------------------------------------------------------ Hugging Face tensor layout


def _heads_to_rows(w: jax.Array) -> jax.Array:
    # tunix keeps q/k/v as (heads, embed, head_dim); Hugging Face as (heads * head_dim, embed).
    return w.transpose(0, 2, 1).reshape(-1, w.shape[1])


def _hf_tensors(params: dict[str, jax.Array], config: gemma3.ModelConfig) -> Iterator[tuple[str, jax.Array]]:
    """The params under their Hugging Face Gemma 3 names and layouts (inverse of tunix's params_safetensors)."""
    yield "model.embed_tokens.weight", params["embedder.input_embedding"]
    for i in range(config.num_layers):
        layer = f"layers.{i}."
        hf = f"model.layers.{i}."
        if config.num_heads == config.num_kv_heads:
            q, k, v = params[layer + "attn.qkv_einsum.w"]
        else:
            q = params[layer + "attn.q_einsum.w"]
            k, v = params[layer + "attn.kv_einsum.w"]
        yield hf + "self_attn.q_proj.weight", _heads_to_rows(q)
        yield hf + "self_attn.k_proj.weight", _heads_to_rows(k)
        yield hf + "self_attn.v_proj.weight", _heads_to_rows(v)
        o = params[layer + "attn.attn_vec_einsum.w"]  # (heads, head_dim, embed)
        yield hf + "self_attn.o_proj.weight", o.reshape(-1, o.shape[-1]).T
        for proj in ("gate_proj", "up_proj", "down_proj"):
            yield hf + f"mlp.{proj}.weight", params[layer + f"mlp.{proj}.kernel"].T
        for hf_name, name in _LAYER_NORMS.items():
            yield hf + hf_name, params[layer + name]
    yield "model.norm.weight", params["final_norm.scale"]


def _hf_shapes(config: gemma3.ModelConfig) -> dict[str, jax.ShapeDtypeStruct]:
    return jax.eval_shape(lambda p: dict(_hf_tensors(p, config)), _abstract_params(config))


# --------------------------------------------------------------------------- pretrained weights


def _require_dir(local_dir: str, where: str) -> None:
    if not os.path.isdir(local_dir):
        raise BadInput(f"{where}: not found or not a directory; model.weights_uri must name a directory of Gemma 3 weights")


def detect_format(local_dir: str, uri: str | None = None) -> str:
    """"job", "safetensors" or "orbax" from a local directory's files; `uri` names it in errors."""
    where = uri or local_dir
    _require_dir(local_dir, where)
    names = set(os.listdir(local_dir))
    if "model.json" in names:
        return "job"
    if any(name.endswith(".safetensors") for name in names):
        return "safetensors"
    if names & set(_ORBAX_MARKERS):
        return "orbax"
    raise BadInput(
        f"{where}: holds no Gemma 3 weights; expected *.safetensors files (Hugging Face), an Orbax checkpoint "
        "(_METADATA, manifest.ocdbt, ...) or model.json (a final/ directory of this job)"
    )


def _not_safetensors(file_uri: str, why: str) -> BadInput:
    return BadInput(f"model.weights_uri: {file_uri} is not a safetensors file ({why}); "
                    "save the weights again with safetensors, or point model.weights_uri at other weights")


def _header_bytes(path: str, file_uri: str) -> bytes:
    """The JSON header of a .safetensors file: 8 bytes of its length (little-endian), then itself."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        start = f.read(8)
        if len(start) < 8:
            raise _not_safetensors(file_uri, f"{size} bytes, too few for a header")
        (length,) = struct.unpack("<Q", start)
        if length > min(size - 8, _MAX_SAFETENSORS_HEADER):
            raise _not_safetensors(file_uri, f"its header would be {length:,} bytes, in a file of {size:,}")
        return f.read(length)


def _tensor_shapes(path: str, file_uri: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (dtype, shape)} as a .safetensors file's header declares them."""
    try:
        header = strict_json.loads(_header_bytes(path, file_uri).decode("utf-8"))
    except (UnicodeDecodeError, strict_json.JSONError) as e:
        raise _not_safetensors(file_uri, f"its header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise _not_safetensors(file_uri, "its header is not a JSON object")
    tensors = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype, shape = (meta.get("dtype"), meta.get("shape")) if isinstance(meta, dict) else (None, None)
        if not isinstance(dtype, str) or not isinstance(shape, list) or not all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
            raise _not_safetensors(file_uri, f"tensor {name!r} has no dtype and shape")
        tensors[name] = (dtype, tuple(shape))
    return tensors


def _check_safetensors(local_dir: str, config: gemma3.ModelConfig, uri: str) -> None:
    files = sorted(glob.glob(os.path.join(local_dir, "*.safetensors")))
    if not files:
        raise BadInput(f"{uri}: no *.safetensors files there; model.weights_uri must name a Hugging Face model directory")
    found = {}
    for path in files:
        file_uri = io.join(uri, os.path.basename(path))
        tensors = _tensor_shapes(path, file_uri)
        dtypes = {dtype for dtype, _ in tensors.values()}
        if len(dtypes) != 1 or not dtypes <= _SAFETENSORS_DTYPES:
            raise BadInput(
                f"model.weights_uri: {file_uri} holds tensors of dtype {sorted(dtypes)}; the loader needs "
                f"one of {sorted(_SAFETENSORS_DTYPES)} per file; save the weights again in a single dtype"
            )
        # Multimodal checkpoints prefix the text model with "language_model."; the loader accepts both.
        found.update({k.removeprefix("language_model."): str(shape) for k, (_, shape) in tensors.items()})
    expected = {k: str(tuple(s.shape)) for k, s in _hf_shapes(config).items()}
    # Other extra tensors (lm_head, vision tower, rotary tables) are ones the loader skips.
    problems = _differences(found, expected, extra_matters=lambda k: k.startswith("model.layers."))
    if problems:
        raise BadInput(
            f"{uri}: these weights do not fit the model preset ({_describe(config)}): {_summary(problems)}; "
            "set model.preset to the size the weights were made for"
        )


def _check_orbax(local_dir: str, config: gemma3.ModelConfig, uri: str) -> None:
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            tree = checkpointer.metadata(local_dir).item_metadata.tree
        shapes = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree)
        # Map the declared shapes the way tunix maps the arrays, without reading any array.
        mapped = jax.eval_shape(
            lambda p: gemma3_params.map_from_upstream_checkpoint(p, text_only=config.vision_config is None), shapes
        )
    # A checkpoint of another layout (the job's own params, say) breaks the mapping in any of these ways.
    except (OSError, ValueError, KeyError, IndexError, AttributeError, TypeError) as e:
        raise BadInput(
            f"{uri}: not a Gemma 3 Orbax checkpoint in Google's layout (as in gs://gemma-data/checkpoints) ({e})"
        ) from e
    found = {k: str(tuple(s.shape)) for k, s in _flat(mapped).items()}
    expected = {k: str(tuple(s.shape)) for k, s in _abstract_params(config).items()}
    problems = _differences(found, expected, extra_matters=lambda k: True)
    if problems:
        raise BadInput(
            f"{uri}: this checkpoint does not fit the model preset ({_describe(config)}): {_summary(problems)}; "
            "set model.preset to the size the checkpoint was made for"
        )


def load_pretrained(
    config: gemma3.ModelConfig, weights_uri: str, weights_format: str, dtype: str, cache_dir: str
) -> gemma3.Gemma3:
    """A Gemma 3 built from pretrained weights ("safetensors", "orbax" or "auto") in the given dtype.

    Remote weights are downloaded once into cache_dir; local ones are read in place.
    """
    if weights_format not in ("auto", "safetensors", "orbax"):
        raise ValueError(f"load_pretrained reads safetensors or orbax weights, not {weights_format!r}")
    local_dir = io.fetch_to_cache(weights_uri, cache_dir)
    _require_dir(local_dir, weights_uri)
    fmt = detect_format(local_dir, weights_uri) if weights_format == "auto" else weights_format
    if fmt == "job":
        raise ValueError(f"{weights_uri}: a final/ directory of this job; model.py loads those")
    param_dtype = jnp.dtype(dtype)
    config = dataclasses.replace(config, param_dtype=param_dtype)
    if fmt == "safetensors":
        _check_safetensors(local_dir, config, weights_uri)
        load = lambda: params_safetensors.create_model_from_safe_tensors(local_dir, config, mesh=None, dtype=param_dtype)  # noqa: E731
    else:
        _check_orbax(local_dir, config, weights_uri)
        load = lambda: gemma3_params.create_model_from_checkpoint(local_dir, config, mesh=None, dtype=param_dtype)  # noqa: E731
    try:
        model = load()
    except (ValueError, KeyError) as e:
        raise BadInput(f"{weights_uri}: could not be read as {fmt} Gemma 3 weights ({e})") from e
    # A parameter no file supplied stays abstract; it must fail here, not at the first step.
    unloaded = [k for k, v in _flat(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items() if not isinstance(v, jax.Array)]
    if unloaded:
        raise BadInput(f"{weights_uri}: the weights lack {_summary(unloaded)}")
    return model


# ------------------------------------------------------------------ the job's own params (Orbax)


def _orbax_path(uri: str) -> str:
    # Orbax needs absolute local paths; object-store URIs go to it as they are (tensorstore).
    return io.local_path(uri) if io.is_local(uri) else uri


def _params(model: nnx.Module, lora_only: bool) -> nnx.State:
    state = nnx.state(model, nnx.LoRAParam if lora_only else nnx.Param)
    if not jax.tree.leaves(state):
        raise ValueError("the model holds no LoRA params" if lora_only else "the model holds no params")
    return state


def save_params(model: nnx.Module, uri: str, lora_only: bool = False) -> None:
    """Save the model's params (LoRA adapters included), or only the adapters, as an Orbax checkpoint."""
    state = _params(model, lora_only)
    with ocp.StandardCheckpointer() as checkpointer:
        # force: a rerun of the same manifest writes its outputs again.
        checkpointer.save(_orbax_path(uri), state, force=True)
        checkpointer.wait_until_finished()


def restore_params(model: nnx.Module, uri: str, lora_only: bool = False) -> None:
    """Load params saved by save_params into the model, which must have the same names, shapes and dtypes."""
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _params(model, lora_only))
    if not io.exists(uri):
        raise BadInput(f"{uri}: no saved params there; check the path")
    path = _orbax_path(uri)
    with ocp.StandardCheckpointer() as checkpointer:
        try:
            stored = checkpointer.metadata(path).item_metadata.tree
        except (OSError, ValueError) as e:
            raise BadInput(f"{uri}: not a params checkpoint of this job ({e})") from e
        # Orbax would cast a dtype silently; a different dtype means a different model.
        found = {k: f"{m.dtype}{list(m.shape)}" for k, m in _flat(stored).items()}
        expected = {k: f"{s.dtype}{list(s.shape)}" for k, s in _flat(target).items()}
        problems = _differences(found, expected, extra_matters=lambda k: True)
        if problems:
            kind = "LoRA params" if lora_only else "params"
            raise BadInput(
                f"{uri}: the saved {kind} do not match the model: {_summary(problems)}; build the model they were "
                "saved from (same preset, dtype and LoRA settings)"
            )
        restored = checkpointer.restore(path, target)
    nnx.update(model, restored)
