"""Gemma rendering: byte-identical to the backend's tunix_sft export, loss segments, instruction folding."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from job.formats import Example, Turn, find_marker, parse_gemma_turns, parse_lines
from job.template import Rendered, Segment, render_example, render_model_turn, render_prompt
from backend_samples import TRACE_LINE, TUNIX_SFT_LINE, UNGAR_TRACE

# Exports made before M09 have a blank line before "Answer:".
TUNIX_SFT_M08_LINES = [
    '{"id": "a1", "prompts": "<start_of_turn>user\\nWhat is 15 + 27?<end_of_turn>\\n<start_of_turn>model\\n'
    'Reasoning:\\n1. Add the ones: 5 + 7 = 12\\n2. Add the tens: 10 + 20 + 10 = 40\\n\\nAnswer: 42<end_of_turn>", '
    '"final_answer": "42", "metadata": {"format": "tunix_sft"}}',
    '{"id": "a2", "prompts": "<start_of_turn>user\\nHigh Card Duel: You have 1 hidden card. Action: reveal.'
    "<end_of_turn>\\n<start_of_turn>model\\nReasoning:\\n1. Legal moves: [reveal]\\n2. My hand: 7D\\n"
    '3. Unseen cards: 51\\n4. Action chosen: reveal\\n\\nAnswer: reveal<end_of_turn>", "final_answer": "reveal", '
    '"metadata": {"format": "tunix_sft", "source": "ungar", "game": "high_card_duel"}}',
    '{"id": "a3", "prompts": "<start_of_turn>user\\nCombien font 2 \\u00d7 3\\u202f?<end_of_turn>\\n'
    '<start_of_turn>model\\nReasoning:\\n1. 2 \\u00d7 3 = 6\\n\\nAnswer: 6<end_of_turn>", "final_answer": "6", '
    '"metadata": {"format": "tunix_sft"}}',
]
CONTRACT_TEXT = (
    "<start_of_turn>user\n"
    "What is 15 + 27?<end_of_turn>\n"
    "<start_of_turn>model\n"
    "Reasoning:\n"
    "1. Add the ones: 5 + 7 = 12\n"
    "2. Add the tens: 10 + 20 + 10 = 40\n"
    "Answer: 42<end_of_turn>"
)


def example_from(line: str, fmt: str = "auto") -> Example:
    (record,) = parse_lines([(1, line.encode())], "data.jsonl", fmt)
    assert isinstance(record, Example), record
    return record


def trace(prompt: str, steps: tuple[str, ...], answer: str, system: str | None = None) -> Example:
    turns = (Turn("user", text=prompt), Turn("model", steps=steps, final_answer=answer))
    return Example("x", ((Turn("system", text=system),) if system else ()) + turns, 1)


def text_example(prompt: str, response: str) -> Example:
    return Example("x", (Turn("user", text=prompt), Turn("model", text=response)), 1)


# --- byte-identical to the backend -----------------------------------------------------------


def test_contract_example_is_the_backend_tunix_sft_text():
    backend_text = json.loads(TUNIX_SFT_LINE)["prompts"]
    assert backend_text == CONTRACT_TEXT
    assert render_example(example_from(TRACE_LINE)).text == backend_text


def test_trace_and_tunix_sft_exports_of_one_trace_render_identically():
    from_trace = render_example(example_from(TRACE_LINE))
    from_tunix = render_example(example_from(TUNIX_SFT_LINE))
    assert from_trace.text == from_tunix.text == CONTRACT_TEXT
    assert from_trace.segments == from_tunix.segments


@pytest.mark.parametrize("line", TUNIX_SFT_M08_LINES)
def test_m08_tunix_sft_lines_rerender_byte_identically(line):
    backend_text = json.loads(line)["prompts"]
    for recipe in ("trace_sft_v1", "trace_sft_v1_m08"):  # text model turns do not depend on the recipe
        assert render_example(example_from(line), recipe).text == backend_text


def test_m08_recipe_reproduces_the_m08_layout_from_a_trace():
    m08_text = json.loads(TUNIX_SFT_M08_LINES[0])["prompts"]
    assert render_example(example_from(TRACE_LINE), "trace_sft_v1_m08").text == m08_text


def test_ungar_high_card_duel_reasoning_trace():
    rendered = render_example(example_from(json.dumps(UNGAR_TRACE), "reasoning_trace"))
    assert rendered.text == (
        "<start_of_turn>user\n"
        "High Card Duel: You have 1 hidden card. Action: reveal.<end_of_turn>\n"
        "<start_of_turn>model\n"
        "Reasoning:\n"
        "1. Legal moves: [reveal]\n"
        "2. My hand: AS\n"
        "3. Unseen cards: 51\n"
        "4. Action chosen: reveal\n"
        "Answer: reveal<end_of_turn>"
    )


def test_no_steps_means_no_reasoning_block():
    for recipe in ("trace_sft_v1", "trace_sft_v1_m08"):
        assert render_model_turn((), "42", recipe) == "Answer: 42"
    assert render_example(trace("2+2?", (), "4")).completion == "Answer: 4<end_of_turn>"
    assert render_model_turn(["a", "b"], "c", "trace_sft_v1_m08") == "Reasoning:\n1. a\n2. b\n\nAnswer: c"


def test_unknown_recipe():
    with pytest.raises(ValueError, match="unknown recipe 'trace_sft_v2'"):
        render_model_turn(["a"], "b", "trace_sft_v2")
    with pytest.raises(ValueError, match="unknown recipe"):
        render_example(text_example("q", "a"), recipe="trace_sft_v2")  # even when no turn needs it


# --- loss segments ---------------------------------------------------------------------------


def test_segments_train_on_the_model_turn_and_its_end_of_turn_only():
    rendered = render_example(example_from(TRACE_LINE))
    assert rendered.segments == (
        Segment("<start_of_turn>user\nWhat is 15 + 27?<end_of_turn>\n<start_of_turn>model\n", False),
        Segment(CONTRACT_TEXT.split("<start_of_turn>model\n")[1], True),
    )
    assert rendered.completion.endswith("Answer: 42<end_of_turn>")
    assert rendered.text == render_prompt("What is 15 + 27?") + rendered.completion


def test_every_model_turn_of_a_conversation_is_trainable():
    example = Example("c", (
        Turn("system", text="Be brief."),
        Turn("user", text="Hi"), Turn("model", text="Hello."),
        Turn("user", text="2+2?"), Turn("model", text="4"),
    ), 1)
    rendered = render_example(example)
    assert rendered == Rendered((
        Segment("<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n", False),
        Segment("Hello.<end_of_turn>", True),
        Segment("\n<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n", False),
        Segment("4<end_of_turn>", True),
    ))
    assert rendered.completion == "Hello.<end_of_turn>4<end_of_turn>"
    assert parse_gemma_turns(rendered.text)[1:] == example.turns[2:]


# --- folding instructions into the first user turn ------------------------------------------


def test_system_instruction_and_system_turn_fold_into_the_first_user_turn():
    example = trace("2+2?", ("2+2=4",), "4", system="Answer with a number.")
    rendered = render_example(example, system_instruction="You are a careful tutor.")
    assert rendered.segments[0].text == (
        "<start_of_turn>user\nYou are a careful tutor.\n\nAnswer with a number.\n\n2+2?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert render_example(example).segments[0].text.startswith("<start_of_turn>user\nAnswer with a number.\n\n2+2?")
    assert render_prompt("2+2?", system_instruction="Be exact.") == (
        "<start_of_turn>user\nBe exact.\n\n2+2?<end_of_turn>\n<start_of_turn>model\n"
    )


def test_step_instruction_only_for_model_turns_built_from_steps():
    step = "Show your work as steps"
    structured = render_example(trace("2+2?", ("2+2=4",), "4"), step_instruction=step, system_instruction="S")
    assert structured.segments[0].text == (
        "<start_of_turn>user\nS\n\n2+2?\n\nShow your work as steps<end_of_turn>\n<start_of_turn>model\n"
    )
    # Model turns given as text came with their prompt as written: nothing is added to it.
    assert render_example(example_from(TUNIX_SFT_LINE), step_instruction=step).text == CONTRACT_TEXT
    training_example = text_example("2+2?\n\nPlease show your reasoning steps.", "Answer: 4")
    assert step not in render_example(training_example, step_instruction=step).text


def test_render_prompt_applies_the_step_instruction_and_stops_where_the_model_starts():
    prompt = render_prompt("What is 15 + 27?", step_instruction="Show your work as steps")
    assert prompt == (
        "<start_of_turn>user\nWhat is 15 + 27?\n\nShow your work as steps<end_of_turn>\n<start_of_turn>model\n"
    )
    train = render_example(example_from(TRACE_LINE), step_instruction="Show your work as steps")
    assert train.segments[0].text == prompt  # eval prompts match training prompts


# --- text is data, never a template ----------------------------------------------------------


@pytest.mark.parametrize(
    "prompt", ["{0.__class__}", "%s", "{prompt}", "%(prompt)s {final_answer} {{}} {", "${HOME} \\n"]
)
def test_user_text_renders_literally(prompt):
    rendered = render_example(trace(prompt, ("{0}", "100%"), "%d {answer}"), system_instruction="{system} %s")
    assert rendered.text == (
        f"<start_of_turn>user\n{{system}} %s\n\n{prompt}<end_of_turn>\n<start_of_turn>model\n"
        "Reasoning:\n1. {0}\n2. 100%\nAnswer: %d {answer}<end_of_turn>"
    )
    assert render_prompt(prompt, step_instruction="{step}") == (
        f"<start_of_turn>user\n{prompt}\n\n{{step}}<end_of_turn>\n<start_of_turn>model\n"
    )


def test_reserved_markers_are_refused():
    with pytest.raises(ValueError, match="reserved marker '<end_of_turn>'"):
        render_prompt("hi<end_of_turn>")
    with pytest.raises(ValueError, match="reserved marker '<bos>'"):
        render_example(trace("q", ("a",), "b"), system_instruction="<bos>")
    with pytest.raises(ValueError, match="reasoning step 2 contains the reserved marker '<start_of_turn>'"):
        render_model_turn(["ok", "<start_of_turn>model"], "b")


def test_malformed_turns_are_refused():
    with pytest.raises(ValueError, match="turns must be"):
        render_example(Example("x", (Turn("user", text="q"),), 1))
    with pytest.raises(ValueError, match="turns must be"):
        render_example(Example("x", (Turn("model", text="a"), Turn("user", text="q")), 1))


# --- round trip: render -> parse -> render ---------------------------------------------------

# Text with the characters that matter nearby: angle brackets and marker fragments, braces,
# percent signs, newlines, the recipe's own words.
FRAGMENTS = st.sampled_from(
    ["<", ">", "<start_of_turn", "end_of_turn>", "<end_of_turn", "\n", "\n\n", "{0}", "%s", "Answer:",
     "Reasoning:\n1. ", "user\n", "model", " "]
)
TEXT = (
    st.lists(st.one_of(st.text(st.characters(blacklist_categories=("Cs",)), max_size=8), FRAGMENTS), min_size=1)
    .map("".join)
    .filter(lambda s: s.strip() != "" and find_marker(s) is None)
)


@settings(max_examples=150, deadline=None)
@given(
    prompt=TEXT,
    steps=st.lists(TEXT, max_size=4).map(tuple),
    answer=TEXT,
    recipe=st.sampled_from(["trace_sft_v1", "trace_sft_v1_m08"]),
    system=st.none() | TEXT,
)
def test_render_parse_render_round_trip(prompt, steps, answer, recipe, system):
    text = render_example(trace(prompt, steps, answer), recipe, system_instruction=system).text
    turns = parse_gemma_turns(text)
    assert turns[1].text == render_model_turn(steps, answer, recipe)
    assert render_example(Example("x", turns, 1), recipe).text == text
    # The same text as a tunix_sft export line passes the reader untouched.
    line = json.dumps({"id": "x", "prompts": text, "final_answer": answer})
    assert render_example(example_from(line, "tunix_sft")).text == text
