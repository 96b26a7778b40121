"""Evaluation: eval prompts -> batched greedy decoding that stops at <end_of_turn> -> scores.

Prompts are rendered exactly as training renders the user turn and end with
`<start_of_turn>model\n`. Decoding stops at `<end_of_turn>` (and `<eos>`): without that the
model runs on past its answer and whole rambles get compared to short answers. Batches are padded
to a fixed size and prompts to a fixed length bucket, so the sampler compiles once per bucket,
not once per prompt. The generations of the eval before training are kept (`generations_record`) so
that a resumed run reads them back instead of decoding again.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from flax import nnx
from tunix.generate import sampler as sampler_lib
from tunix.generate.tokenizer_adapter import TokenizerAdapter

from job import io, logs
from job.formats import EvalItem
from job.manifest import EvalSpec, TemplateSpec
from job.score import ItemResult, score_output
from job.template import eval_prompts
from job.tokens import Tokenizer


@dataclasses.dataclass(frozen=True)
class Generation:
    text: str
    finished: bool  # stopped at <end_of_turn>/<eos> rather than running out of tokens
    tokens: int


def prompt_bucket(length: int, minimum: int) -> int:
    """The fixed prompt length a prompt is padded to: the configured one, or the first doubling of it that fits."""
    bucket = minimum
    while bucket < length:
        bucket *= 2
    return bucket


class Decoder:
    """Greedy decoding with the Tunix sampler. Built once: it shares the model's weights, trained or not."""

    def __init__(self, model: nnx.Module, model_config, tokenizer: Tokenizer, spec: EvalSpec):
        self.tokenizer, self.spec, self.model_config, self.model = tokenizer, spec, model_config, model
        self.samplers: dict[int, sampler_lib.Sampler] = {}

    def _sampler(self, prompt_len: int) -> sampler_lib.Sampler:
        if prompt_len not in self.samplers:
            cfg = self.model_config
            cache = sampler_lib.CacheConfig(cache_size=prompt_len + self.spec.max_new_tokens,
                                            num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads,
                                            head_dim=cfg.head_dim)
            self.samplers[prompt_len] = sampler_lib.Sampler(self.model, TokenizerAdapter(self.tokenizer.processor), cache)
        return self.samplers[prompt_len]

    def generate(self, prompts: list[str]) -> list[Generation]:
        results: list[Generation] = []
        size = self.spec.batch_size
        stop = [self.tokenizer.end_of_turn_id, self.tokenizer.eos_id]
        for start in range(0, len(prompts), size):
            chunk = prompts[start:start + size]
            longest = max(len(self.tokenizer.encode(p)) + 1 for p in chunk)  # +1: the sampler adds <bos>
            bucket = prompt_bucket(longest, self.spec.max_prompt_len)
            padded = chunk + [chunk[-1]] * (size - len(chunk))  # a fixed batch shape: one compile
            out = self._sampler(bucket)(padded, max_generation_steps=self.spec.max_new_tokens,
                                        max_prompt_length=bucket, eos_tokens=stop, temperature=0.0)
            for text, tokens in zip(out.text[:len(chunk)], out.tokens[:len(chunk)]):
                results.append(Generation(text, len(tokens) < self.spec.max_new_tokens, len(tokens)))
        return results


@dataclasses.dataclass
class EvalRun:
    results: list[ItemResult]
    seconds: float
    generated_tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds else 0.0


def evaluate(decoder: Decoder, items: list[EvalItem], template: TemplateSpec) -> EvalRun:
    """Generate an answer for every eval item and score it against the expected answer."""
    prompts = eval_prompts(items, template.system_instruction, template.step_instruction)
    started = time.perf_counter()
    generations = decoder.generate(prompts)
    seconds = time.perf_counter() - started
    return scored(items, [(g.text, g.finished) for g in generations], seconds, sum(g.tokens for g in generations))


def scored(items: list[EvalItem], outputs: list[tuple[str, bool]], seconds: float, tokens: int) -> EvalRun:
    results = [ItemResult(item=item, output=text, finished=finished, score=score_output(text, item.expected_answer))
               for item, (text, finished) in zip(items, outputs)]
    return EvalRun(results, seconds, tokens)


def generations_record(key: str, run: EvalRun) -> dict:
    """An eval's generations under `key` (a digest of everything that decides them), to keep as JSON."""
    return {"key": key, "seconds": run.seconds, "generated_tokens": run.generated_tokens,
            "outputs": [{"id": r.item.id, "output": r.output, "finished": r.finished} for r in run.results]}


def load_generations(uri: str, key: str, items: list[EvalItem]) -> EvalRun | None:
    """The eval saved at `uri` under the same `key` and items, scored again; None when there is none."""
    try:
        if not io.exists(uri):
            return None
        saved: Any = io.read_json(uri)
        outputs = saved["outputs"]
        if saved["key"] != key or [o["id"] for o in outputs] != [item.id for item in items]:
            logs.info("saved eval generations are for other settings; decoding again", uri=uri)
            return None
        return scored(items, [(str(o["output"]), bool(o["finished"])) for o in outputs],
                      float(saved["seconds"]), int(saved["generated_tokens"]))
    except Exception as err:  # noqa: BLE001 - a cache: unreadable means decode again
        logs.warning("saved eval generations unreadable; decoding again", uri=uri, error=f"{type(err).__name__}: {err}")
        return None
