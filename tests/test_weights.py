"""Tests for job/weights.py on the tiny Gemma 3: HF safetensors (written by hf_export.py), Google's Orbax
layout, the job's own params checkpoints (local and on a GCS-protocol server), and the errors."""

from __future__ import annotations

import dataclasses
import json
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx
from gemma_upstream import save_upstream
from hf_export import export_safetensors
from hypothesis import given, settings
from hypothesis import strategies as st

from job import io, model, weights
from job.errors import BadInput
from job.manifest import ModelSpec
from job.model import FINAL_FORMAT

LORA_TARGETS = ".*q_einsum|.*kv_einsum|.*attn_vec_einsum|.*gate_proj|.*up_proj|.*down_proj"


def params_of(m: nnx.Module, kind: type = nnx.Param) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(m, kind)))[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def assert_bit_identical(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert got[name].shape == want[name].shape, name
        assert got[name].tobytes() == want[name].tobytes(), name


def zeroed(m: nnx.Module, kind: type = nnx.Param) -> nnx.Module:
    """A copy of the model whose params of `kind` are all zero (restore must bring them back)."""
    copy = nnx.clone(m)
    nnx.update(copy, jax.tree.map(jnp.zeros_like, nnx.state(copy, kind)))
    return copy


@pytest.fixture(scope="module")
def config():
    return model.model_config("tiny", 512, "float32")


@pytest.fixture(scope="module")
def tiny(config):
    return model.random_model(config, seed=0, dtype="float32")


@pytest.fixture(scope="module")
def tiny_params(tiny):
    return params_of(tiny)


@pytest.fixture(scope="module")
def exported(tiny, config, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("hf"))
    export_safetensors(tiny, config, out)
    return out


@pytest.fixture(scope="module")
def upstream(tiny, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("upstream") / "gemma3-tiny")
    save_upstream(tiny, path)
    return path


@pytest.fixture(scope="module")
def lora_model(tiny):
    lora = model.apply_lora(nnx.clone(tiny), rank=4, alpha=8.0, module_path=LORA_TARGETS, seed=1)
    # qwix starts lora_b at zero; give every adapter values so a restore has something to prove.
    # (numpy, not jax.random: one XLA compile per adapter shape would cost seconds on a small CPU)
    rng = np.random.default_rng(7)
    state = nnx.state(lora, nnx.LoRAParam)
    nnx.update(lora, jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), state))
    return lora


# ------------------------------------------------------------------------------ format detection


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (["model.json", "model.safetensors"], "job"),
        (["model-00001-of-00002.safetensors", "config.json"], "safetensors"),
        (["_CHECKPOINT_METADATA", "_METADATA"], "orbax"),
        (["manifest.ocdbt"], "orbax"),
    ],
)
def test_detect_format_by_marker_files(tmp_path, files, expected):
    for name in files:
        (tmp_path / name).write_text("")
    assert weights.detect_format(str(tmp_path)) == expected


def test_detect_format_rejects_other_dirs_naming_the_uri(tmp_path):
    (tmp_path / "README.md").write_text("hi")
    with pytest.raises(BadInput, match=r"gs://b/weights: holds no Gemma 3 weights.*safetensors.*Orbax"):
        weights.detect_format(str(tmp_path), "gs://b/weights")
    with pytest.raises(BadInput, match="not found"):
        weights.detect_format(str(tmp_path / "absent"))


# ------------------------------------------------------------------------- safetensors export/load


def test_export_writes_hugging_face_layout(exported, tiny, config):
    assert sorted(os.listdir(exported)) == ["config.json", "model.safetensors"]
    hf = json.loads(io.read_text(io.join(exported, "config.json")))
    assert hf["model_type"] == "gemma3_text"
    assert (hf["num_hidden_layers"], hf["hidden_size"], hf["intermediate_size"]) == (6, 256, 1024)
    assert (hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"], hf["vocab_size"]) == (4, 1, 64, 512)
    assert hf["layer_types"] == ["sliding_attention"] * 5 + ["full_attention"]
    assert hf["torch_dtype"] == "float32"
    tensors = safetensors.numpy.load_file(os.path.join(exported, "model.safetensors"))
    assert len(tensors) == 1 + 6 * 13 + 1
    params = nnx.to_pure_dict(nnx.state(tiny, nnx.Param))
    # Hugging Face keeps q as (heads * head_dim, embed): row n*64+h, column d is q_einsum[n, d, h].
    q = np.asarray(params["layers"][2]["attn"]["q_einsum"]["w"])
    hf_q = tensors["model.layers.2.self_attn.q_proj.weight"]
    assert hf_q.shape == (4 * 64, 256)
    assert hf_q[1 * 64 + 5, 7] == q[1, 7, 5]
    gate = np.asarray(params["layers"][0]["mlp"]["gate_proj"]["kernel"])
    np.testing.assert_array_equal(tensors["model.layers.0.mlp.gate_proj.weight"], gate.T)


@pytest.mark.parametrize("fmt", ["safetensors", "auto"])
def test_safetensors_round_trip_is_bit_identical(exported, config, tiny_params, tmp_path, fmt):
    loaded = weights.load_pretrained(config, exported, fmt, "float32", str(tmp_path / "cache"))
    assert_bit_identical(params_of(loaded), tiny_params)
    assert not (tmp_path / "cache").exists()  # local weights are read in place


def test_safetensors_from_gcs_are_fetched_to_the_cache(exported, config, tiny_params, tmp_path, gcs_bucket):
    uri = f"{gcs_bucket}/models/tiny-hf"
    io.upload(exported, uri)
    cache = tmp_path / "cache"
    loaded = weights.load_pretrained(config, uri, "auto", "float32", str(cache))
    assert_bit_identical(params_of(loaded), tiny_params)
    cached = [f for _, _, files in os.walk(cache) for f in files]
    assert "model.safetensors" in cached


def test_sharded_export_loads_bit_identical(tiny, config, tiny_params, tmp_path):
    out = tmp_path / "sharded"
    export_safetensors(tiny, config, str(out), shard_bytes=2 * 2**20)
    files = sorted(os.listdir(out))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    # A second, unsharded export into the same place leaves no stale shard behind.
    export_safetensors(tiny, config, str(out))
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    export_safetensors(tiny, config, str(out), shard_bytes=2 * 2**20)
    loaded = weights.load_pretrained(config, str(out), "safetensors", "float32", str(tmp_path / "cache"))
    assert_bit_identical(params_of(loaded), tiny_params)


def test_bfloat16_is_honoured(exported, config, tiny_params, tmp_path):
    loaded = weights.load_pretrained(config, exported, "safetensors", "bfloat16", str(tmp_path))
    want = {k: v.astype(jnp.bfloat16) for k, v in tiny_params.items()}
    assert_bit_identical(params_of(loaded), want)


def test_export_refuses_a_model_with_lora_adapters(lora_model, config, tmp_path):
    with pytest.raises(ValueError, match="LoRA"):
        export_safetensors(lora_model, config, str(tmp_path))


# -------------------------------------------------------------------------- Google Orbax layout


@pytest.mark.parametrize("fmt", ["orbax", "auto"])
def test_upstream_orbax_checkpoint_loads_bit_identical(upstream, config, tiny_params, tmp_path, fmt):
    loaded = weights.load_pretrained(config, upstream, fmt, "float32", str(tmp_path))
    assert_bit_identical(params_of(loaded), tiny_params)


def test_upstream_orbax_checkpoint_in_bfloat16(upstream, config, tiny_params, tmp_path):
    loaded = weights.load_pretrained(config, upstream, "orbax", "bfloat16", str(tmp_path))
    assert_bit_identical(params_of(loaded), {k: v.astype(jnp.bfloat16) for k, v in tiny_params.items()})


# ------------------------------------------------------------------------------------ mismatches


@pytest.mark.parametrize("source", ["exported", "upstream"])
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hidden_dim": 512}, r"mlp.*is \(256, 1024\) where \(256, 512\) is needed|mlp.*\(1024, 256\) where \(512, 256\)"),
        ({"num_layers": 7}, r"layers\.6\..* is missing"),
        ({"num_layers": 5}, r"layers\.5\..* has no place in the model"),
        ({"num_embed": 1024}, r"is \(512, 256\) where \(1024, 256\) is needed"),
    ],
)
def test_weights_for_another_preset_are_bad_input(request, config, tmp_path, source, change, message):
    uri = request.getfixturevalue(source)
    other = dataclasses.replace(config, **change)
    with pytest.raises(BadInput, match=message) as caught:
        weights.load_pretrained(other, uri, "auto", "float32", str(tmp_path))
    assert str(caught.value).startswith(uri) and "model.preset" in str(caught.value)


def test_missing_weights_are_bad_input_naming_the_uri(config, tmp_path, gcs_bucket):
    local = str(tmp_path / "nowhere")
    with pytest.raises(BadInput, match=f"{local}: not found"):
        weights.load_pretrained(config, local, "safetensors", "float32", str(tmp_path / "cache"))
    remote = f"{gcs_bucket}/no/such/model"
    with pytest.raises(BadInput, match=f"{remote}: not found"):
        weights.load_pretrained(config, remote, "auto", "float32", str(tmp_path / "cache"))


def test_safetensors_format_on_an_orbax_dir_is_bad_input(upstream, config, tmp_path):
    with pytest.raises(BadInput, match=r"no \*\.safetensors files"):
        weights.load_pretrained(config, upstream, "safetensors", "float32", str(tmp_path))


def test_job_format_is_left_to_model_py(config, tmp_path):
    (tmp_path / "model.json").write_text("{}")
    with pytest.raises(ValueError, match="model.py"):
        weights.load_pretrained(config, str(tmp_path), "auto", "float32", str(tmp_path / "cache"))


# ------------------------------------------------------------------------ the job's own params


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_params_round_trip(tiny, tiny_params, tmp_path, request, where):
    base = str(tmp_path) if where == "local" else request.getfixturevalue("gcs_bucket")
    uri = io.join(base, "run", "final", "params")
    weights.save_params(tiny, uri)
    weights.save_params(tiny, uri)  # a rerun writes the same place again
    target = zeroed(tiny)
    weights.restore_params(target, uri)
    assert_bit_identical(params_of(target), tiny_params)


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_lora_params_round_trip(lora_model, tmp_path, request, where):
    base = str(tmp_path) if where == "local" else request.getfixturevalue("gcs_bucket")
    uri = io.join(base, "lora")
    weights.save_params(lora_model, uri, lora_only=True)
    target = zeroed(lora_model, nnx.LoRAParam)
    weights.restore_params(target, uri, lora_only=True)
    assert_bit_identical(params_of(target, nnx.LoRAParam), params_of(lora_model, nnx.LoRAParam))
    assert_bit_identical(params_of(target), params_of(lora_model))  # the base weights untouched, too
    # The checkpoint holds the adapters only: it cannot stand for the whole model.
    with pytest.raises(BadInput, match=r"embedder\.input_embedding\.value is missing"):
        weights.restore_params(zeroed(lora_model), uri)


def test_restore_into_another_dtype_is_bad_input(tiny, tmp_path):
    uri = str(tmp_path / "params")
    weights.save_params(tiny, uri)
    bf16 = nnx.clone(tiny)
    nnx.update(bf16, jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(bf16, nnx.Param)))
    with pytest.raises(BadInput, match=r"float32\[512, 256\] where bfloat16\[512, 256\] is needed"):
        weights.restore_params(bf16, uri)


def test_restore_from_nothing_is_bad_input(tiny, tmp_path):
    with pytest.raises(BadInput, match="no saved params"):
        weights.restore_params(tiny, str(tmp_path / "absent"))


def test_params_checkpoint_is_not_taken_for_google_weights(tiny, config, tmp_path):
    uri = str(tmp_path / "params")
    weights.save_params(tiny, uri)
    assert weights.detect_format(uri) == "orbax"
    with pytest.raises(BadInput, match=f"{uri}: not a Gemma 3 Orbax checkpoint in Google's layout"):
        weights.load_pretrained(config, uri, "auto", "float32", str(tmp_path / "cache"))


# ------------------------------------------------------------------- files that are not weights


def _safetensors(header: bytes, length: int | None = None, rest: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header) if length is None else length) + header + rest


NOT_SAFETENSORS = [
    (b"", "0 bytes, too few for a header"),
    (b"\xff" * 7, "7 bytes, too few for a header"),
    (b"\xff" * 8 + b"xx", "its header would be 18,446,744,073,709,551,615 bytes, in a file of 10"),
    (_safetensors(b"{}", length=10**9), "its header would be 1,000,000,000 bytes"),
    (_safetensors(b"\xff\xfe{}"), "its header is not JSON"),
    (_safetensors(b'{"a": '), "its header is not JSON"),
    (_safetensors(b"[1, 2]"), "its header is not a JSON object"),
    (_safetensors(b'{"a": {"dtype": "F32"}}'), "tensor 'a' has no dtype and shape"),
    (_safetensors(b'{"a": {"dtype": "F32", "shape": [2, -1]}}'), "tensor 'a' has no dtype and shape"),
    (_safetensors(b'{"a": {"dtype": 5, "shape": [2]}}'), "tensor 'a' has no dtype and shape"),
    (_safetensors(b'{"a": [1]}'), "tensor 'a' has no dtype and shape"),
    (_safetensors(b'{"a": {"dtype": "F32", "shape": [2], "dtype": "F16"}}'), "duplicate key 'a.dtype'"),
    (_safetensors(b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b"]}}"), "a number of 5,000 characters"),
    (_safetensors(b"[" * 100_000 + b"]" * 100_000), "nested too deeply"),
]


@pytest.mark.parametrize(("data", "says"), NOT_SAFETENSORS, ids=[f"file-{k}" for k in range(len(NOT_SAFETENSORS))])
def test_a_safetensors_file_that_is_not_one_is_bad_input_naming_the_field(config, tmp_path, data, says):
    (tmp_path / "model.safetensors").write_bytes(data)
    with pytest.raises(BadInput) as caught:
        weights.load_pretrained(config, str(tmp_path), "auto", "float32", str(tmp_path / "cache"))
    message = str(caught.value)
    assert message.startswith(f"model.weights_uri: {tmp_path}/model.safetensors is not a safetensors file (")
    assert says in message


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=64) | st.binary(max_size=64).map(_safetensors))
def test_any_bytes_as_safetensors_are_bad_input(config, tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("st")
    (folder / "model.safetensors").write_bytes(data)
    with pytest.raises(BadInput, match="^model.weights_uri: "):
        weights.load_pretrained(config, str(folder), "auto", "float32", str(folder / "cache"))


def test_a_garbage_file_as_the_weights_is_bad_input(config, tmp_path):
    garbage = tmp_path / "weights.bin"
    garbage.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(BadInput, match="not found or not a directory; model.weights_uri must name a directory"):
        weights.load_pretrained(config, str(garbage), "auto", "float32", str(tmp_path / "cache"))


DAMAGED_MODEL_JSON = [
    ([], "is not a tunix-rt-job/final/1 description"),
    ({"format": "other"}, "is not a tunix-rt-job/final/1 description"),
    ({"format": FINAL_FORMAT}, "is damaged (KeyError"),
    ({"format": FINAL_FORMAT, "preset": "tiny", "lora": None, "base": []}, "is damaged (TypeError"),
    ({"format": FINAL_FORMAT, "preset": "tiny", "lora": None,
      "base": {"preset": "huge", "weights_uri": None, "weights_format": "auto", "dtype": "float32", "seed": 1}},
     "is damaged (ValidationError"),
    ({"format": FINAL_FORMAT, "preset": "tiny", "lora": {"rank": 0},
      "base": {"preset": "tiny", "weights_uri": None, "weights_format": "auto", "dtype": "float32", "seed": 1}},
     "is damaged (ValidationError"),
    ({"format": FINAL_FORMAT, "preset": 3, "lora": None,
      "base": {"preset": "tiny", "weights_uri": None, "weights_format": "auto", "dtype": "float32", "seed": 1}},
     "is damaged (TypeError"),
    ({"format": FINAL_FORMAT, "preset": "tiny", "lora": None,
      "base": {"preset": "tiny", "weights_uri": None, "weights_format": "auto", "dtype": "float32", "seed": -1}},
     "is damaged (TypeError"),
]


@pytest.mark.parametrize(("info", "says"), DAMAGED_MODEL_JSON, ids=[f"model-json-{k}" for k in range(len(DAMAGED_MODEL_JSON))])
def test_a_damaged_model_json_is_bad_input_naming_the_field(tmp_path, info, says):
    (tmp_path / "model.json").write_text(json.dumps(info))
    spec = ModelSpec(preset="tiny", weights_uri=str(tmp_path))
    with pytest.raises(BadInput) as caught:
        model.build_model(spec, None, 0, 512, str(tmp_path / "cache"))
    assert str(caught.value).startswith(f"model.weights_uri: {tmp_path}/model.json {says}")
