"""Test helper: write a tunix Gemma 3 as Google's upstream Orbax checkpoint (gs://gemma-data layout).

The inverse of tunix's `gemma3.params.map_from_upstream_checkpoint`, so tests can make such a
checkpoint of the tiny model instead of downloading a real one. Upstream keys are flat module paths
("transformer/layer_0/attn/q_einsum") each holding a dict of params ({"w": ...}); the MLP's gate
and up projections are one stacked, transposed "gating_einsum".
"""

from __future__ import annotations

import numpy as np
import orbax.checkpoint as ocp
from flax import nnx


def to_upstream(model: nnx.Module) -> dict[str, dict[str, np.ndarray]]:
    """The model's params in the upstream layout, as host arrays."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    upstream = {
        "transformer/embedder": {"input_embedding": np.asarray(params["embedder"]["input_embedding"])},
        "transformer/final_norm": {"scale": np.asarray(params["final_norm"]["scale"])},
    }
    for index, layer in params["layers"].items():
        prefix = f"transformer/layer_{index}"
        mlp = layer["mlp"]
        gate, up = np.asarray(mlp["gate_proj"]["kernel"]), np.asarray(mlp["up_proj"]["kernel"])
        upstream[f"{prefix}/mlp/gating_einsum"] = {"w": np.stack([gate.T, up.T])}
        upstream[f"{prefix}/mlp/linear"] = {"w": np.asarray(mlp["down_proj"]["kernel"])}
        for name, module in layer["attn"].items():
            upstream[f"{prefix}/attn/{name}"] = {k: np.asarray(v) for k, v in module.items()}
        for name in ("pre_attention_norm", "post_attention_norm", "pre_ffw_norm", "post_ffw_norm"):
            upstream[f"{prefix}/{name}"] = {"scale": np.asarray(layer[name]["scale"])}
    return upstream


def save_upstream(model: nnx.Module, path: str) -> None:
    """Write the model as an upstream Orbax checkpoint at the absolute local path."""
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, to_upstream(model))
        checkpointer.wait_until_finished()
