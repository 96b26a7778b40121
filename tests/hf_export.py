"""Test helper: write a tunix Gemma 3 as Hugging Face Gemma 3 safetensors (+ config.json).

The layout is job/weights.py's (`_hf_tensors`), the exact inverse of tunix's safetensors loader, so
tests can make Hugging Face weights of the tiny model instead of downloading real ones, and load
them back bit for bit.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import safetensors.numpy
from flax import nnx
from tunix.models.gemma3 import model as gemma3

from job import io
from job.weights import _flat, _hf_tensors

# Shards of at most this size, as Hugging Face writes them (the 27B preset is ~54 GB in bfloat16).
DEFAULT_SHARD_BYTES = 4 * 2**30
_INDEX_NAME = "model.safetensors.index.json"


def _hf_config(config: gemma3.ModelConfig, dtype: str) -> dict[str, Any]:
    """A minimal Hugging Face Gemma3TextConfig for the exported weights."""
    if config.query_pre_attn_norm == gemma3.QueryPreAttentionNormalisation.BY_ONE_OVER_SQRT_HEAD_DIM:
        query_scalar = config.head_dim
    else:
        query_scalar = config.embed_dim // config.num_heads
    pattern = gemma3.GEMMA3_ATTENTION_PATTERN
    layer_types = [
        "sliding_attention" if pattern[i % len(pattern)] == gemma3.AttentionType.LOCAL_SLIDING else "full_attention"
        for i in range(config.num_layers)
    ]
    scaling = None if config.global_scale_factor == 1.0 else {"rope_type": "linear", "factor": config.global_scale_factor}
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": config.num_embed,
        "hidden_size": config.embed_dim,
        "intermediate_size": config.hidden_dim,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "query_pre_attn_scalar": query_scalar,
        "sliding_window": config.sliding_window_size,
        "layer_types": layer_types,
        "rope_theta": float(config.global_base_frequency),
        "rope_local_base_freq": float(config.local_base_frequency),
        "rope_scaling": scaling,
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
        "torch_dtype": dtype,
    }


def _plan_shards(sizes: list[tuple[str, int]], shard_bytes: int) -> list[list[str]]:
    """Tensor names grouped in order into files of at most shard_bytes (a bigger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    total = 0
    for name, size in sizes:
        if shards[-1] and total + size > shard_bytes:
            shards.append([])
            total = 0
        shards[-1].append(name)
        total += size
    return shards


def export_safetensors(
    model: gemma3.Gemma3, config: gemma3.ModelConfig, out_dir: str, shard_bytes: int = DEFAULT_SHARD_BYTES
) -> None:
    """Write the model as Hugging Face Gemma 3 safetensors (+ config.json) to a local dir or URI."""
    if config.vision_config is not None:
        raise ValueError("export_safetensors writes text-only Gemma 3; the config has a vision tower")
    if jax.tree.leaves(nnx.state(model, nnx.LoRAParam)):
        raise ValueError("export_safetensors: the model holds LoRA adapters; merge them into the base weights first")
    params = _flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    dtypes = {str(p.dtype) for p in params.values()}
    if len(dtypes) != 1:
        raise ValueError(f"export_safetensors: params mix dtypes {sorted(dtypes)}; one dtype per file is needed")
    layout = jax.eval_shape(lambda p: dict(_hf_tensors(p, config)), params)
    shards = _plan_shards([(name, s.size * s.dtype.itemsize) for name, s in layout.items()], shard_bytes)
    if len(shards) == 1:
        file_names = ["model.safetensors"]
    else:
        file_names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]

    # Files of an earlier export would be read together with the new ones.
    for entry in io.listdir(out_dir):
        if entry.endswith(".safetensors") or io.basename(entry) == _INDEX_NAME:
            io.remove(entry)

    # Tensors are transposed one at a time and written a shard at a time, bounding host memory.
    tensors = _hf_tensors(params, config)
    weight_map = {}
    for file_name, names in zip(file_names, shards):
        shard = {}
        for _ in names:
            name, array = next(tensors)
            shard[name] = np.asarray(array)
            weight_map[name] = file_name
        io.write_bytes(io.join(out_dir, file_name), safetensors.numpy.save(shard, metadata={"format": "pt"}))
    if len(shards) > 1:
        total = sum(s.size * s.dtype.itemsize for s in layout.values())
        io.write_json(io.join(out_dir, _INDEX_NAME), {"metadata": {"total_size": total}, "weight_map": weight_map})
    io.write_json(io.join(out_dir, "config.json"), _hf_config(config, dtypes.pop()))
