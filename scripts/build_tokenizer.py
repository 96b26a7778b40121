"""Build the tiny SentencePiece tokenizer the job ships (job/assets/tiny_tokenizer.model).

Nothing can be downloaded where the job is tested, so the `tiny` preset needs a tokenizer of its own.
It keeps Gemma's conventions so the same code serves the real Gemma tokenizer: ids pad 0, eos 1,
bos 2, unk 3; `<start_of_turn>`, `<end_of_turn>` and the newline are single user-defined tokens;
digits are split one per token; byte fallback encodes any UTF-8 text. It is trained on the bundled
demo data (datasets/ and evalsets/) plus a few general sentences, single-threaded so that the same
inputs give the same model bytes.

    python scripts/build_tokenizer.py
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import sentencepiece as spm

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "job" / "assets" / "tiny_tokenizer.model"
VOCAB_SIZE = 512
GENERAL_TEXT = [
    "Reasoning:", "Answer:", "Show your work as steps.", "Please show your reasoning steps.",
    "What is the answer? The answer is", "Let us think step by step.", "The result is",
    "user model system assistant question answer reasoning step steps final",
    "High Card Duel: You have 1 hidden card. Action: reveal.", "Legal moves: [reveal]",
    "My hand: AS", "Unseen cards: 51", "Action chosen: reveal",
    "What is the capital of France? Paris", "How many degrees are in a triangle? 180 degrees",
    "A train travels 60 km per hour for 2 hours. How far does it go? 120 km",
    "plus minus times divided by equals total sum difference product half percent",
]


def corpus_lines() -> list[str]:
    lines = list(GENERAL_TEXT)
    for path in sorted((ROOT / "datasets").glob("*.jsonl")) + sorted((ROOT / "evalsets").glob("*.jsonl")):
        for raw in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(raw)
            for key in ("prompts", "prompt", "final_answer", "expected_answer"):
                if isinstance(record.get(key), str):
                    lines.append(record[key])
            lines.extend(record.get("trace_steps", []))
            # The template's own words, as often as a conversation uses them.
            lines.extend(["user", "model", "Reasoning:", "Answer:"])
    return lines


def main() -> None:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines()),
        model_writer=model,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>", "\n"],
        split_digits=True,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_bytes(model.getvalue())
    print(f"wrote {OUTPUT.relative_to(ROOT)} ({len(model.getvalue())} bytes, vocab {VOCAB_SIZE})")


if __name__ == "__main__":
    main()
