"""Tokens: the SentencePiece tokenizer, ids with loss masks, the length policy, and fixed-shape batches.

A rendered example is a list of text segments, each trainable or not (template.py). Tokenizing
segment by segment gives the loss mask for free: 1 on the model turns' tokens (their closing
`<end_of_turn>` included), 0 on everything else, and `<bos>` first.

Batches carry `segment_ids` and `positions` besides the tokens and the loss mask, so that several
examples can share a row (sequence packing) without changing the trainer: the attention mask is
built from the segment ids (train.py), never from "token != pad" alone.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
from collections.abc import Iterable, Iterator

import flax.struct
import numpy as np
import sentencepiece as spm

from job import io
from job.errors import BadInput
from job.formats import END_OF_TURN, START_OF_TURN
from job.template import Rendered

SHIPPED_TOKENIZER = "tiny_tokenizer.model"


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """A SentencePiece model with Gemma's special ids (pad 0, eos 1, bos 2)."""

    processor: spm.SentencePieceProcessor
    uri: str

    @property
    def vocab_size(self) -> int:
        return self.processor.vocab_size()

    @property
    def pad_id(self) -> int:
        return self.processor.pad_id()

    @property
    def bos_id(self) -> int:
        return self.processor.bos_id()

    @property
    def eos_id(self) -> int:
        return self.processor.eos_id()

    @property
    def end_of_turn_id(self) -> int:
        return self.processor.piece_to_id(END_OF_TURN)

    def encode(self, text: str) -> list[int]:
        return self.processor.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self.processor.decode([int(i) for i in ids])


MAX_TOKENIZER_BYTES = 64 * 2**20  # Gemma 3's is 4.5 MB; far more is not a tokenizer
# The ids the job relies on, as in Gemma: batches are padded with 0, every example starts with bos,
# decoding stops at eos (and <end_of_turn>); pretrained embeddings have their rows at these ids.
GEMMA_SPECIAL_IDS = {"pad": 0, "eos": 1, "bos": 2}


def tokenizer_bytes(uri: str | None) -> bytes:
    """The SentencePiece model's bytes at `uri`; None means the tiny tokenizer shipped with the job."""
    if uri is None:
        return importlib.resources.files("job.assets").joinpath(SHIPPED_TOKENIZER).read_bytes()
    size = io.size(uri)
    if size > MAX_TOKENIZER_BYTES:
        raise BadInput(f"model.tokenizer_uri: {uri} is {size:,} bytes, not a SentencePiece model (at most "
                       f"{MAX_TOKENIZER_BYTES:,}); point it at the model's tokenizer.model")
    return io.read_bytes(uri)


def _missing_ids(processor: spm.SentencePieceProcessor) -> list[str]:
    """What the job needs from a tokenizer and this one lacks."""
    ids = {"pad": processor.pad_id(), "eos": processor.eos_id(), "bos": processor.bos_id()}
    problems = [f"{name} id {ids[name]} where Gemma's is {wanted}"
                for name, wanted in GEMMA_SPECIAL_IDS.items() if ids[name] != wanted]
    problems += [f"no single token for {marker}" for marker in (START_OF_TURN, END_OF_TURN)
                 if processor.piece_to_id(marker) in (processor.unk_id(), *ids.values())]
    return problems


def load_tokenizer(uri: str | None) -> Tokenizer:
    """Load a SentencePiece model by URI; None means the tiny tokenizer shipped with the job."""
    data = tokenizer_bytes(uri)
    if uri is None:
        uri = f"(shipped) {SHIPPED_TOKENIZER}"
    processor = spm.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(data)
    except Exception as err:  # sentencepiece raises RuntimeError/OSError with C++ text
        raise BadInput(f"model.tokenizer_uri: {uri} is not a SentencePiece model ({err})") from None
    problems = _missing_ids(processor)
    if problems:
        raise BadInput(f"model.tokenizer_uri: {uri} is not a Gemma tokenizer: it has {'; '.join(problems)}; "
                       "use the Gemma tokenizer the weights were trained with (or null for the shipped tiny one)")
    return Tokenizer(processor, uri)


@dataclasses.dataclass(frozen=True)
class TokenizedExample:
    """One example's ids and loss mask (same length), `<bos>` first."""

    id: str
    ids: np.ndarray  # int32 [n]
    loss_mask: np.ndarray  # bool [n]
    truncated: bool = False

    @property
    def loss_tokens(self) -> int:
        return int(self.loss_mask.sum())


def tokenize(example_id: str, rendered: Rendered, tokenizer: Tokenizer, max_seq_len: int,
             length_policy: str = "reject") -> TokenizedExample | str:
    """Ids and loss mask for a rendered example, or the reason it cannot be used (a string)."""
    ids = [tokenizer.bos_id]
    mask = [False]
    for segment in rendered.segments:
        piece = tokenizer.encode(segment.text)
        ids.extend(piece)
        mask.extend([segment.trainable] * len(piece))
    truncated = False
    if len(ids) > max_seq_len:
        if length_policy != "truncate":
            return (f"{len(ids)} tokens is longer than training.max_seq_len={max_seq_len} "
                    "(raise max_seq_len or set training.length_policy to 'truncate')")
        ids, mask, truncated = ids[:max_seq_len], mask[:max_seq_len], True
        if not any(mask[1:]):
            return (f"truncated to training.max_seq_len={max_seq_len} tokens, nothing of the model turn is left "
                    "to train on (raise max_seq_len)")
    return TokenizedExample(example_id, np.asarray(ids, np.int32), np.asarray(mask, np.bool_), truncated)


@flax.struct.dataclass(frozen=True)
class Batch:
    """A fixed-shape training batch. Row r holds examples numbered 1.. in `segment_ids` (0 = padding)."""

    input_tokens: np.ndarray  # int32 [B, L]
    input_mask: np.ndarray  # bool [B, L]: 1 where the loss is computed (the model turns)
    segment_ids: np.ndarray  # int32 [B, L]
    positions: np.ndarray  # int32 [B, L]: restart at 0 for each example


def make_batch(rows: list[list[TokenizedExample]], seq_len: int, batch_size: int) -> Batch:
    """Lay out rows of examples (one or more per row) into padded [batch_size, seq_len] arrays.

    Missing rows (the last, partial batch) are all padding: they carry no loss.
    """
    tokens = np.zeros((batch_size, seq_len), np.int32)
    loss = np.zeros((batch_size, seq_len), np.bool_)
    segments = np.zeros((batch_size, seq_len), np.int32)
    positions = np.zeros((batch_size, seq_len), np.int32)
    for r, row in enumerate(rows):
        start = 0
        for s, example in enumerate(row, start=1):
            end = start + len(example.ids)
            if end > seq_len:
                raise ValueError(f"row {r} holds {end} tokens, more than {seq_len}")
            tokens[r, start:end] = example.ids
            loss[r, start:end] = example.loss_mask
            segments[r, start:end] = s
            positions[r, start:end] = np.arange(end - start)
            start = end
    return Batch(tokens, loss, segments, positions)


PACK_OPEN_ROWS = 64  # rows kept open while packing: bounds memory and delay; ~0.5% padding on mixed lengths


def pack(examples: Iterable[TokenizedExample], seq_len: int, open_rows: int = PACK_OPEN_ROWS
         ) -> Iterator[list[TokenizedExample]]:
    """Sequence packing: rows of whole examples, first fit over a bounded set of open rows.

    Each example goes into the oldest open row with room for it, else into a new row; when
    `open_rows` rows are open, the oldest is emitted first. Rows come out in the order they were
    opened, so the same examples give the same rows, and examples that never share a row (each one
    longer than half a row) keep their order exactly. No example is split or dropped.
    """
    rows: list[list[TokenizedExample]] = []
    room: list[int] = []
    for example in examples:
        n = len(example.ids)
        if n > seq_len:
            raise ValueError(f"example {example.id} has {n} tokens, more than {seq_len}")
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(example)
                room[r] -= n
                break
        else:
            if len(rows) == open_rows:
                yield rows.pop(0)
                room.pop(0)
            rows.append([example])
            room.append(seq_len - n)
    yield from rows


def batches(examples: Iterable[TokenizedExample], batch_size: int, seq_len: int, packing: bool = False
            ) -> Iterator[Batch]:
    """Fixed-shape batches of `batch_size` rows of `seq_len` tokens (one compiled step shape).

    One example per row, padded; or, with `packing`, as many whole examples per row as fit.
    """
    rows = pack(examples, seq_len) if packing else ([example] for example in examples)
    chunk: list[list[TokenizedExample]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == batch_size:
            yield make_batch(chunk, seq_len, batch_size)
            chunk = []
    if chunk:
        yield make_batch(chunk, seq_len, batch_size)
