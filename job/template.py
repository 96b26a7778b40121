"""Gemma instruction-tuned rendering: an Example becomes the exact text the model trains on.

Pure string functions. The layout is the backend's tunix_sft rendering (recipe trace_sft_v1):

    <start_of_turn>user
    {prompt}<end_of_turn>
    <start_of_turn>model
    Reasoning:
    1. {step 1}
    Answer: {final_answer}<end_of_turn>

with no <bos> (the tokenizer adds it) and nothing after the last <end_of_turn>. Text is only ever
concatenated, never used as a format string, so a prompt like "{0.__class__}" or "%s" stays literal.
The rendering is split into segments that say which characters the loss is computed on: the model
turns, each with its closing <end_of_turn> so the model learns to stop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from job.errors import BadInput
from job.formats import END_OF_TURN, START_OF_TURN, EvalItem, Example, Turn, find_marker

# recipe -> what separates the last reasoning step from "Answer:". The backend's M08 exports
# had a blank line there; M09 and later have none.
RECIPES = {
    "trace_sft_v1": "\n",
    "trace_sft_v1_m08": "\n\n",
}
DEFAULT_RECIPE = "trace_sft_v1"

USER_OPEN = START_OF_TURN + "user\n"
MODEL_OPEN = START_OF_TURN + "model\n"
TURN_GAP = "\n"  # between one turn's <end_of_turn> and the next <start_of_turn>


@dataclass(frozen=True)
class Segment:
    text: str
    trainable: bool  # True: the loss is computed on these characters


@dataclass(frozen=True)
class Rendered:
    segments: tuple[Segment, ...]

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.segments)

    @property
    def completion(self) -> str:
        return "".join(s.text for s in self.segments if s.trainable)


def _check(text: str, what: str) -> str:
    marker = find_marker(text)
    if marker is not None:
        raise ValueError(f"{what} contains the reserved marker {marker!r}")
    return text


def _recipe_gap(recipe: str) -> str:
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; known recipes: {', '.join(RECIPES)}")
    return RECIPES[recipe]


def render_model_turn(steps: Sequence[str], final_answer: str, recipe: str = DEFAULT_RECIPE) -> str:
    """The model turn's text for a trace: a numbered Reasoning block (omitted without steps), then Answer."""
    gap = _recipe_gap(recipe)
    answer = "Answer: " + _check(final_answer, "the final answer")
    if not steps:
        return answer
    lines = ["Reasoning:"]
    for number, step in enumerate(steps, 1):
        lines.append(str(number) + ". " + _check(step, f"reasoning step {number}"))
    return "\n".join(lines) + gap + answer


def fold_user_prompt(
    prompt: str, system_texts: Sequence[str | None] = (), step_instruction: str | None = None
) -> str:
    """The first user turn's text: system texts before the prompt, the step instruction after it.

    Gemma has no system role, so instructions travel inside the first user turn, each part
    separated by a blank line: "{system}\\n\\n{prompt}\\n\\n{step_instruction}".
    """
    parts = [text for text in system_texts if text]
    parts.append(prompt)
    if step_instruction:
        parts.append(step_instruction)
    return _check("\n\n".join(parts), "the user prompt (with its instructions)")


def render_prompt(prompt: str, system_instruction: str | None = None, step_instruction: str | None = None) -> str:
    """The generation prompt for one eval question; it ends where the model's answer begins."""
    text = fold_user_prompt(prompt, (system_instruction,), step_instruction)
    return USER_OPEN + text + END_OF_TURN + TURN_GAP + MODEL_OPEN


def eval_prompts(items: Sequence[EvalItem], system_instruction: str | None = None,
                 step_instruction: str | None = None) -> list[str]:
    """The generation prompt of each eval item, as the eval decodes it; BadInput naming the template's
    fields and the item when one cannot be rendered (the run checks this before it trains)."""
    prompts = []
    for item in items:
        try:
            prompts.append(render_prompt(item.prompt, system_instruction, step_instruction))
        except ValueError as err:
            raise BadInput(f"template.system_instruction, template.step_instruction: the prompt of eval item "
                           f"{item.id!r} with them cannot be rendered: {err}; remove the marker") from None
    return prompts


def _model_text(turn: Turn, recipe: str) -> str:
    if turn.final_answer is not None:  # structured: built from a trace's steps
        return render_model_turn(turn.steps, turn.final_answer, recipe)
    return _check(turn.text, "a model turn")


def render_example(
    example: Example,
    recipe: str = DEFAULT_RECIPE,
    system_instruction: str | None = None,
    step_instruction: str | None = None,
) -> Rendered:
    """Render a conversation; every model turn (with its <end_of_turn>) is trainable, the rest is not.

    The manifest's system_instruction and the example's own system turn are folded into the first
    user turn. step_instruction is added only when the first model turn is built from a trace's
    steps; a model turn given as text (tunix_sft, training_example, ...) already came with its
    prompt as written, and adding to it would change what the text was made from.
    """
    _recipe_gap(recipe)
    turns = list(example.turns)
    system = turns.pop(0).text if turns and turns[0].role == "system" else None
    roles = [turn.role for turn in turns]
    if not turns or roles != ["user", "model"] * (len(turns) // 2):
        raise ValueError(
            f"example {example.id!r}: turns must be an optional system turn, then user/model pairs; got {roles}"
        )
    segments: list[Segment] = []
    for k in range(0, len(turns), 2):
        user, model = turns[k], turns[k + 1]
        if k == 0:
            step = step_instruction if model.structured else None
            user_text = fold_user_prompt(user.text, (system_instruction, system), step)
            gap = ""
        else:
            user_text = _check(user.text, "a user turn")
            gap = TURN_GAP
        segments.append(Segment(gap + USER_OPEN + user_text + END_OF_TURN + TURN_GAP + MODEL_OPEN, False))
        segments.append(Segment(_model_text(model, recipe) + END_OF_TURN, True))
    return Rendered(tuple(segments))
