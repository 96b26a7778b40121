"""Test helper: small SentencePiece models trained on a few lines, with whatever special ids a test needs."""

from __future__ import annotations

import io

import sentencepiece as spm

CORPUS = ["hello world", "the quick brown fox", "jumps over the lazy dog"] * 30


def train_tokenizer(**options) -> bytes:
    """A 40-piece character model's bytes; `options` go to SentencePieceTrainer (pad_id, bos_id, ...)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=40,
                                   model_type="char", minloglevel=2, **options)
    return model.getvalue()
