"""Tests for job.tokens (tokenizer, ids and loss masks, length policy, batches), the attention mask
train.model_inputs builds from a batch, and evaluate.prompt_bucket."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from small_tokenizers import train_tokenizer

from job import io
from job.errors import BadInput
from job.formats import Example, Turn
from job.template import render_example
from job.tokens import TokenizedExample, batches, load_tokenizer, make_batch, pack, tokenize, tokenizer_bytes


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def trace_example(prompt="What is 2 + 3?", steps=("2 + 3 = 5",), answer="5", id="ex-1"):
    return Example(id, (Turn("user", text=prompt), Turn("model", steps=tuple(steps), final_answer=answer)), 1)


def tokenized(tok, example_id: str, prompt: str, answer: str = "5") -> TokenizedExample:
    result = tokenize(example_id, render_example(trace_example(prompt, answer=answer, id=example_id)), tok, 512)
    assert isinstance(result, TokenizedExample)
    return result


# ------------------------------------------------------------------------------------- tokenizer


def test_shipped_tokenizer_has_gemma_special_ids(tok):
    assert tok.vocab_size == 512
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    for marker in ("<start_of_turn>", "<end_of_turn>"):
        ids = tok.encode(marker)
        assert len(ids) == 1, f"{marker} must be one token, got {ids}"
        assert tok.decode(ids) == marker
    assert tok.end_of_turn_id == tok.encode("<end_of_turn>")[0]
    assert tok.encode("<start_of_turn>")[0] != tok.end_of_turn_id


@pytest.mark.parametrize("text", [
    "héllo wörld",
    "emoji 🙂🚀 and flags 🇯🇵",
    "日本語のテキストと中文字符",
    "tabs\tand\nnewlines\n\n  spaced  ",
    "<start_of_turn>user\nZ̤͔ͧ̑a̐lgo<end_of_turn>",
])
def test_any_utf8_round_trips(tok, text):
    ids = tok.encode(text)
    assert all(0 < i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_tokenizer_uri_that_is_not_sentencepiece_is_bad_input(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_text('{"not": "a sentencepiece model"}')
    with pytest.raises(BadInput, match="not a SentencePiece model") as caught:
        load_tokenizer(str(path))
    assert str(path) in str(caught.value)


def test_tokenizer_without_turn_markers_is_bad_input(tmp_path):
    uri = str(tmp_path / "plain.model")
    io.write_bytes(uri, train_tokenizer(pad_id=0, eos_id=1, bos_id=2, unk_id=3))
    with pytest.raises(BadInput, match="no single token for <start_of_turn>"):
        load_tokenizer(uri)


def test_tokenizer_with_another_pad_id_is_bad_input(tmp_path):
    uri = str(tmp_path / "padded.model")
    io.write_bytes(uri, train_tokenizer(unk_id=0, eos_id=1, bos_id=2, pad_id=3,
                                   user_defined_symbols="<start_of_turn>,<end_of_turn>"))
    with pytest.raises(BadInput, match="pad id 3"):
        load_tokenizer(uri)


MARKERS = "<start_of_turn>,<end_of_turn>"


@pytest.mark.parametrize(
    ("options", "lacks"),
    [
        ({}, "pad id -1 where Gemma's is 0; eos id 2 where Gemma's is 1; bos id 1 where Gemma's is 2"),
        ({"pad_id": 0, "eos_id": 1, "bos_id": -1, "unk_id": 2}, "bos id -1 where Gemma's is 2"),
        ({"pad_id": 0, "eos_id": -1, "bos_id": 2, "unk_id": 1}, "eos id -1 where Gemma's is 1"),
        ({"pad_id": 0, "eos_id": 2, "bos_id": 1, "unk_id": 3}, "eos id 2 where Gemma's is 1; bos id 1 where"),
        ({"pad_id": -1, "eos_id": 1, "bos_id": 2, "unk_id": 0}, "pad id -1 where Gemma's is 0"),
        ({"pad_id": 0, "eos_id": 1, "bos_id": 2, "unk_id": 3, "user_defined_symbols": "<start_of_turn>"},
         "no single token for <end_of_turn>"),
    ],
    ids=["trainer-defaults", "no-bos", "no-eos", "bos-eos-swapped", "no-pad", "no-end-of-turn"],
)
def test_a_tokenizer_without_every_id_the_job_relies_on_is_bad_input(tmp_path, options, lacks):
    uri = str(tmp_path / "t.model")
    io.write_bytes(uri, train_tokenizer(**{"user_defined_symbols": MARKERS, **options}))
    with pytest.raises(BadInput) as caught:
        load_tokenizer(uri)
    message = str(caught.value)
    assert message.startswith(f"model.tokenizer_uri: {uri} is not a Gemma tokenizer: it has ")
    assert lacks in message and "use the Gemma tokenizer" in message


SHIPPED = tokenizer_bytes(None)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200) | st.integers(0, len(SHIPPED) - 1).map(lambda n: SHIPPED[:n]))
def test_garbage_or_a_cut_tokenizer_is_bad_input(tmp_path_factory, data):
    uri = str(tmp_path_factory.mktemp("tok") / "t.model")
    io.write_bytes(uri, data)
    with pytest.raises(BadInput, match=f"^model.tokenizer_uri: {uri} "):
        load_tokenizer(uri)


def test_a_file_too_big_for_a_tokenizer_is_not_read(tmp_path):
    path = tmp_path / "huge.model"
    with open(path, "wb") as f:
        f.seek(64 * 2**20)
        f.write(b"x")
    with pytest.raises(BadInput, match=r"model.tokenizer_uri: .* is 67,108,865 bytes, not a SentencePiece model"):
        load_tokenizer(str(path))


# ---------------------------------------------------------------------------------- tokenize()


def test_loss_mask_covers_exactly_the_model_turn(tok):
    rendered = render_example(trace_example("Ana has 3 🍎. She eats 1. How many?", ("3 - 1 = 2",), "2"))
    result = tokenize("ex-1", rendered, tok, 256)
    assert isinstance(result, TokenizedExample)
    assert result.ids.dtype == np.int32 and result.loss_mask.dtype == np.bool_
    assert result.ids.shape == result.loss_mask.shape
    assert result.ids[0] == tok.bos_id and not result.loss_mask[0]
    assert not result.truncated

    # The trainable tokens are one contiguous run at the end, closing with <end_of_turn>.
    trainable = np.flatnonzero(result.loss_mask)
    assert list(trainable) == list(range(trainable[0], len(result.ids)))
    assert result.ids[-1] == tok.end_of_turn_id
    assert tok.decode(result.ids[result.loss_mask]) == rendered.completion
    assert rendered.completion == "Reasoning:\n1. 3 - 1 = 2\nAnswer: 2<end_of_turn>"
    # Everything before it is the prompt, up to and including "<start_of_turn>model\n".
    assert tok.decode(result.ids[1:trainable[0]]) == rendered.text[: -len(rendered.completion)]
    assert tok.decode(result.ids[1:]) == rendered.text
    assert result.loss_tokens == len(trainable)


def test_every_model_turn_of_a_conversation_is_masked(tok):
    example = Example("chat", (
        Turn("system", text="Be brief."),
        Turn("user", text="Hi there"),
        Turn("model", text="Hello!"),
        Turn("user", text="What is 6 × 7?"),
        Turn("model", text="42"),
    ), 1)
    rendered = render_example(example)
    result = tokenize("chat", rendered, tok, 256)
    assert isinstance(result, TokenizedExample)
    assert tok.decode(result.ids[result.loss_mask]) == "Hello!<end_of_turn>42<end_of_turn>"
    assert tok.decode(result.ids[result.loss_mask]) == rendered.completion
    assert tok.decode(result.ids[~result.loss_mask][1:]) == "".join(
        s.text for s in rendered.segments if not s.trainable)

    # Two separate runs of trainable tokens, each ending at an <end_of_turn>.
    mask = result.loss_mask.astype(int)
    starts = np.flatnonzero(np.diff(mask) == 1) + 1
    ends = np.flatnonzero(np.diff(np.append(mask, 0)) == -1)
    assert len(starts) == len(ends) == 2
    assert all(result.ids[e] == tok.end_of_turn_id for e in ends)


def test_length_policy(tok):
    rendered = render_example(trace_example("What is 12 + 30?", ("12 + 30 = 42",), "42"))
    full = tokenize("ex", rendered, tok, 1024)
    assert isinstance(full, TokenizedExample)
    n = len(full.ids)

    exact = tokenize("ex", rendered, tok, n)
    assert isinstance(exact, TokenizedExample) and not exact.truncated
    assert np.array_equal(exact.ids, full.ids)

    reason = tokenize("ex", rendered, tok, n - 1, "reject")
    assert isinstance(reason, str)
    assert f"{n} tokens" in reason and f"training.max_seq_len={n - 1}" in reason

    cut = tokenize("ex", rendered, tok, n - 3, "truncate")
    assert isinstance(cut, TokenizedExample) and cut.truncated
    assert np.array_equal(cut.ids, full.ids[: n - 3])
    assert np.array_equal(cut.loss_mask, full.loss_mask[: n - 3])
    assert cut.loss_tokens == full.loss_tokens - 3


def test_truncation_that_leaves_nothing_to_train_on_is_a_reason(tok):
    rendered = render_example(trace_example("word " * 100, ("1 + 1 = 2",), "2"))
    prompt_tokens = 1 + len(tok.encode(rendered.segments[0].text))
    reason = tokenize("long", rendered, tok, prompt_tokens, "truncate")
    assert isinstance(reason, str)
    assert "training.max_seq_len" in reason and "nothing of the model turn" in reason
    # One token more keeps a trainable token, so it is accepted.
    kept = tokenize("long", rendered, tok, prompt_tokens + 1, "truncate")
    assert isinstance(kept, TokenizedExample) and kept.truncated and kept.loss_tokens == 1


# ----------------------------------------------------------------------------------- batching


def test_batches_have_a_fixed_shape_and_zero_padding(tok):
    examples = [tokenized(tok, f"e{k}", f"Question number {k}?" + " more" * k) for k in range(5)]
    out = list(batches(examples, batch_size=2, seq_len=64))
    assert len(out) == 3
    for batch in out:
        for array in (batch.input_tokens, batch.input_mask, batch.segment_ids, batch.positions):
            assert array.shape == (2, 64)

    for k, example in enumerate(examples):
        batch, row = out[k // 2], k % 2
        n = len(example.ids)
        assert np.array_equal(batch.input_tokens[row, :n], example.ids)
        assert np.array_equal(batch.input_mask[row, :n], example.loss_mask)
        assert (batch.segment_ids[row, :n] == 1).all()
        assert np.array_equal(batch.positions[row, :n], np.arange(n))
        for array in (batch.input_tokens, batch.input_mask, batch.segment_ids, batch.positions):
            assert not array[row, n:].any(), "padding must be all zero"

    last = out[-1]  # one example, then a row of pure padding that carries no loss
    for array in (last.input_tokens, last.input_mask, last.segment_ids, last.positions):
        assert not array[1].any()


def test_make_batch_packs_examples_with_their_own_segments_and_positions(tok):
    a = tokenized(tok, "a", "First?")
    b = tokenized(tok, "b", "Second question, longer?")
    c = tokenized(tok, "c", "Third?")
    na, nb, nc = len(a.ids), len(b.ids), len(c.ids)
    batch = make_batch([[a, b], [c]], seq_len=na + nb + 4, batch_size=3)

    assert batch.input_tokens.shape == (3, na + nb + 4)
    assert np.array_equal(batch.input_tokens[0, : na + nb], np.concatenate([a.ids, b.ids]))
    assert np.array_equal(batch.input_mask[0, : na + nb], np.concatenate([a.loss_mask, b.loss_mask]))
    assert np.array_equal(batch.segment_ids[0], [1] * na + [2] * nb + [0] * 4)
    assert np.array_equal(batch.positions[0], list(range(na)) + list(range(nb)) + [0] * 4)
    assert np.array_equal(batch.segment_ids[1], [1] * nc + [0] * (na + nb + 4 - nc))
    assert not batch.input_tokens[2].any() and not batch.segment_ids[2].any()


def test_a_row_that_overflows_raises(tok):
    a = tokenized(tok, "a", "First?")
    b = tokenized(tok, "b", "Second?")
    make_batch([[a]], seq_len=len(a.ids), batch_size=1)  # exactly full is fine
    with pytest.raises(ValueError, match="row 0"):
        make_batch([[a, b]], seq_len=len(a.ids) + len(b.ids) - 1, batch_size=1)
    with pytest.raises(ValueError):
        list(batches([a], batch_size=1, seq_len=len(a.ids) - 1))


def synthetic(lengths) -> list[TokenizedExample]:
    """Examples of the given lengths (ids are not real text; packing only looks at lengths)."""
    out = []
    for k, n in enumerate(lengths):
        ids = np.arange(2, n + 2, dtype=np.int32) % 500 + 2
        mask = np.zeros(n, np.bool_)
        mask[n // 2:] = True
        out.append(TokenizedExample(f"x{k}", ids, mask))
    return out


@pytest.mark.parametrize("open_rows", [1, 4, 64])
def test_pack_keeps_every_example_whole_within_rows_deterministically(open_rows):
    rng = np.random.default_rng(7)
    lengths = np.clip(np.exp(np.log(60) + 0.9 * rng.standard_normal(600)).astype(int), 2, 512)
    examples = synthetic(lengths)
    rows = list(pack(examples, 512, open_rows))
    assert rows == list(pack(examples, 512, open_rows)), "same examples, same rows"
    packed = [e.id for row in rows for e in row]
    assert sorted(packed) == sorted(e.id for e in examples), "no example lost or duplicated"
    assert all(sum(len(e.ids) for e in row) <= 512 for row in rows)
    used = sum(lengths) / (len(rows) * 512)
    assert used > (0.95 if open_rows == 64 else 0.5), used
    if open_rows == 1:  # one open row: the stream's order is kept exactly
        assert packed == [e.id for e in examples]


def test_pack_keeps_the_order_of_examples_that_cannot_share_a_row():
    examples = synthetic([300, 400, 260, 500, 257])
    assert [[e.id for e in row] for row in pack(examples, 512)] == [["x0"], ["x1"], ["x2"], ["x3"], ["x4"]]
    with pytest.raises(ValueError, match="x0"):
        list(pack(synthetic([513]), 512))


def test_packed_batches_hold_several_examples_per_row():
    examples = synthetic([100, 200, 300, 50, 400, 20])
    out = list(batches(examples, batch_size=2, seq_len=512, packing=True))
    # first fit: [100, 200, 50, 20], [300], [400]
    assert len(out) == 2 and out[0].input_tokens.shape == (2, 512)
    assert out[0].segment_ids[0].max() == 4 and (out[0].segment_ids[0] > 0).sum() == 370
    assert out[0].segment_ids[1].max() == 1 and (out[0].segment_ids[1] > 0).sum() == 300
    assert (out[1].segment_ids[0] > 0).sum() == 400 and not out[1].segment_ids[1].any()
    assert out[0].input_mask.sum() + out[1].input_mask.sum() == sum(e.loss_tokens for e in examples)


# ------------------------------------------------------------------- train.model_inputs (JAX)


def test_attention_mask_matches_tunix_for_one_example_per_row(tok):
    from tunix.sft.utils import make_causal_attn_mask

    from job.train import model_inputs

    examples = [tokenized(tok, f"e{k}", "Question?" + " more" * (3 * k)) for k in range(3)]
    batch = next(batches(examples, batch_size=4, seq_len=64))
    inputs = model_inputs(batch)
    ours = np.asarray(inputs["attention_mask"])
    real = batch.input_tokens != 0
    tunix = np.asarray(make_causal_attn_mask(real))
    assert ours.shape == tunix.shape == (4, 64, 64)
    # Every real token sees exactly what Tunix's own causal mask lets it see.
    for r in range(4):
        assert np.array_equal(ours[r][real[r]], tunix[r][real[r]])
    # Padding queries attend to nothing (Tunix lets them see the example; their loss is masked either way).
    assert not ours[~real].any()
    assert np.array_equal(np.asarray(inputs["positions"]), batch.positions)
    assert np.array_equal(np.asarray(inputs["input_tokens"]), batch.input_tokens)
    assert np.array_equal(np.asarray(inputs["input_mask"]), batch.input_mask)


def test_attention_never_crosses_packed_examples(tok):
    from job.train import model_inputs

    a = tokenized(tok, "a", "First?")
    b = tokenized(tok, "b", "Second question?")
    na, nb = len(a.ids), len(b.ids)
    batch = make_batch([[a, b]], seq_len=na + nb + 5, batch_size=1)
    inputs = model_inputs(batch)
    mask = np.asarray(inputs["attention_mask"])[0]

    assert not mask[na:na + nb, :na].any(), "the second example must not see the first"
    assert not mask[:na, na:].any()
    assert np.array_equal(mask[:na, :na], np.tril(np.ones((na, na), bool)))
    assert np.array_equal(mask[na:na + nb, na:na + nb], np.tril(np.ones((nb, nb), bool)))
    assert not mask[:, na + nb:].any() and not mask[na + nb:].any()
    assert np.array_equal(np.asarray(inputs["positions"])[0, na:na + nb], np.arange(nb))


# ------------------------------------------------------------------------ evaluate.prompt_bucket


@pytest.mark.parametrize("length, minimum, bucket", [
    (1, 64, 64), (64, 64, 64), (65, 64, 128), (128, 64, 128), (129, 64, 256), (1000, 64, 1024), (9, 8, 16),
])
def test_prompt_bucket(length, minimum, bucket):
    from job.evaluate import prompt_bucket

    assert prompt_bucket(length, minimum) == bucket


def test_packed_examples_have_the_losses_they_have_alone(tok):
    """The real tiny Gemma 3: each example's loss is the same packed with others as alone in a row."""
    import jax
    import jax.numpy as jnp

    from job.model import model_config, random_model
    from job.train import model_inputs

    model = random_model(model_config("tiny", tok.vocab_size, "float32"), seed=3, dtype="float32")
    examples = [tokenized(tok, f"e{k}", f"Question {k}?" + " and more" * (2 * k), answer=str(7 * k)) for k in range(5)]
    seq_len = 160
    assert sum(len(e.ids) for e in examples) > seq_len, "the examples must need more than one row"

    def per_example_losses(batch) -> dict:
        inputs = model_inputs(batch)
        logits, _ = model(inputs["input_tokens"], inputs["positions"], None, inputs["attention_mask"])
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
        nll = -np.asarray(jnp.take_along_axis(logp, batch.input_tokens[:, 1:, None], axis=-1)[..., 0])
        weight = batch.input_mask[:, 1:]
        losses = {}
        for r in range(batch.input_tokens.shape[0]):
            for s in range(1, batch.segment_ids[r].max() + 1):
                targets = (batch.segment_ids[r, 1:] == s) & weight[r]
                losses[(r, s)] = nll[r][targets].sum() / targets.sum()
        return losses

    packed = make_batch(list(pack(examples, seq_len)), seq_len, batch_size=3)
    assert packed.segment_ids.max() > 1, "some row must hold several examples"
    alone = make_batch([[e] for e in examples], seq_len, batch_size=len(examples))
    got = per_example_losses(packed)
    want = per_example_losses(alone)
    ids_in_rows = [[e.id for e in row] for row in pack(examples, seq_len)]
    order = {e.id: k for k, e in enumerate(examples)}
    for r, row in enumerate(ids_in_rows):
        for s, example_id in enumerate(row, start=1):
            np.testing.assert_allclose(got[(r, s)], want[(order[example_id], 1)], rtol=2e-5, atol=2e-6)
