"""A run's identity: what must be the same for two attempts to be one run.

Recorded in `run_manifest.json` when a run starts. A later attempt in the same run directory (a
resume, or a rerun of a finished run) must have the same identity, or it is refused (exit 2) with
a field-by-field difference: resuming steps 1-5 trained at one learning rate with steps 6-7 at
another, on other data, would make a model no manifest describes.

The identity is the resolved manifest without the fields that cannot change results
(`NOT_RESULTS`), plus the content of every input: the sha256 of the dataset and eval set as read,
the tokenizer's sha256, a fingerprint of the pretrained weights, and the seed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator

from job import io
from job.errors import BadInput
from job.manifest import Manifest
from job.tokens import tokenizer_bytes

# Manifest fields that cannot change what a run computes, so they may differ between attempts:
# where the results go, how often progress is logged and saved, and where inputs are read from
# (their content is part of the identity instead, so a dataset moved to another bucket is the same run).
NOT_RESULTS = (
    "run_id", "output.uri", "training.log_every_steps", "training.checkpoint_every_steps",
    "dataset.uri", "eval.uri", "model.tokenizer_uri", "model.weights_uri",
)
DATA_FIELDS = ("dataset_sha256", "eval_sha256")  # known once the data is read


class AnotherRun(BadInput):
    """The run directory holds a run of another identity: it is left exactly as it was."""


def of_config(m: Manifest, seed: int) -> dict:
    """The identity known before any data is read: the manifest's result fields, seed, tokenizer, weights."""
    manifest = json.loads(m.model_dump_json())
    for dotted in NOT_RESULTS:
        section, _, name = dotted.rpartition(".")
        (manifest[section] if section else manifest).pop(name, None)
    manifest["seed"] = seed
    return {
        "manifest": manifest,
        "tokenizer_sha256": hashlib.sha256(tokenizer_bytes(m.model.tokenizer_uri)).hexdigest(),
        "weights": io.fingerprint(m.model.weights_uri) if m.model.weights_uri else None,
    }


def recorded_seed(m: Manifest, recorded: dict | None) -> int | None:
    """The run's seed when it is known before the run starts: the manifest's, else the one an earlier
    attempt recorded in the run directory."""
    if m.seed is not None:
        return m.seed
    seed = (recorded or {}).get("seed")
    return seed if isinstance(seed, int) else None


def refuse_another_run(run_uri: str, recorded: dict | None, m: Manifest, data: dict) -> None:
    """AnotherRun when the run record an earlier attempt wrote is of another run than this manifest
    with this data ({"dataset_sha256", "eval_sha256"}, either or none, as far as it has been read)."""
    if recorded is not None and recorded.get("identity"):
        current = of_config(m, recorded_seed(m, recorded))
        refuse_if_different(run_uri, recorded["identity"], {**current, **data})


def differences(recorded: dict, current: dict) -> list[str]:
    """"training.learning_rate: 0.001 → 0.01" for each field that differs (only fields both sides have
    for the data hashes, which an attempt killed before reading its data did not record)."""
    old, new = dict(_leaves(recorded)), dict(_leaves(current))
    found = []
    for key in sorted(old.keys() | new.keys()):
        if key in DATA_FIELDS and (key not in old or key not in new):
            continue
        if old.get(key, "(absent)") != new.get(key, "(absent)"):
            found.append(_describe(key, old.get(key, "(absent)"), new.get(key, "(absent)")))
    return found


def refuse_if_different(run_uri: str, recorded: dict | None, current: dict) -> None:
    """BadInput naming each difference and the fix, when the run directory holds another run."""
    if recorded is None:
        return
    found = differences(recorded, current)
    if found:
        raise AnotherRun(f"{run_uri} holds another run: {'; '.join(found)}. Nothing was changed. To run this "
                       "manifest, give it a new run_id (or another output.uri); to replace that run, pass --fresh")


def _leaves(value, prefix: str = "") -> Iterator[tuple[str, object]]:
    if isinstance(value, dict) and value:
        for key, item in value.items():
            yield from _leaves(item, f"{prefix}.{key}" if prefix else key)
    else:
        yield prefix, value


def _describe(key: str, old, new) -> str:
    if key.endswith(("sha256", "weights")):
        return f"{key.removeprefix('manifest.')} changed"
    return f"{key.removeprefix('manifest.')}: {json.dumps(old)} → {json.dumps(new)}"
