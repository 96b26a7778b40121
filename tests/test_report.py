"""The delta report: McNemar p-values, the paired comparison, the Markdown and the loss plot."""

import json

import pytest

from job.formats import EvalItem
from job.report import build_delta_report, mcnemar_exact_p, plot_loss_curve, render_markdown
from job.score import ItemResult, score_output

# ------------------------------------------------------------------------------------- McNemar


@pytest.mark.parametrize(
    "b, c, p",
    [
        (0, 0, 1.0),
        (0, 5, 0.0625),
        (5, 0, 0.0625),
        (3, 3, 1.0),
        (10, 10, 1.0),
        (1, 9, 0.021484375),
        (9, 1, 0.021484375),
        (0, 1, 1.0),
        (2, 8, 0.109375),  # 2 * (1 + 10 + 45) / 1024
        (0, 20, 2 / 2**20),
    ],
)
def test_mcnemar_exact_p(b, c, p):
    assert mcnemar_exact_p(b, c) == pytest.approx(p, rel=1e-12)


def test_mcnemar_large_counts_stay_in_range():
    p = mcnemar_exact_p(400, 600)
    assert 0 < p < 1e-9
    assert mcnemar_exact_p(500, 501) == 1.0  # odd n, split down the middle: the tail is exactly 1/2


# -------------------------------------------------------------------------------------- report

ITEMS = [
    EvalItem("eval-001", "What is 15 + 27?", "42", "arithmetic", "easy"),
    EvalItem("eval-002", "Capital of France?", "Paris", "knowledge", "easy"),
    EvalItem("eval-003", "12 apples at $1 each cost?", "$12", "word_problem", "medium"),
    EvalItem("eval-004", "Angles of a triangle sum to?", "180 degrees", "geometry", "easy"),
    EvalItem("eval-005", "Primary colours?", "red, blue, yellow", "knowledge", "medium"),
]

# before: only eval-002 right (flexible), eval-004 right; after: 001, 003 fixed, 004 broken.
BEFORE = {
    "eval-001": ("I think it is 41", True),
    "eval-002": ("Answer: The capital is Paris.", True),
    "eval-003": ("apples apples apples apples", False),
    "eval-004": ("Answer: 180 degrees", True),
    "eval-005": ("Answer: red, green, blue", True),
}
AFTER = {
    "eval-001": ("Reasoning:\n1. 15 + 27 = 42\nAnswer: 42", True),
    "eval-002": ("Reasoning:\n1. France's capital.\nAnswer: Paris", True),
    "eval-003": ("Reasoning:\n1. 12 * $1 = $12\nAnswer: $12", True),
    "eval-004": ("Reasoning:\n1. Triangles.\nAnswer: 90", True),
    "eval-005": ("Reasoning:\n1. Red, blue, green", False),
}


def results(outputs: dict, order=ITEMS) -> list[ItemResult]:
    return [
        ItemResult(item, outputs[item.id][0], outputs[item.id][1], score_output(outputs[item.id][0], item.expected_answer))
        for item in order
    ]


LOSSES = [
    {"step": 1, "loss": 2.5},
    {"step": 2, "loss": 1.75},
    {"step": 2, "eval_loss": 1.9},
    {"step": 3, "loss": 1.0},
    {"step": 4, "loss": 1.25},
]


def make_report(**overrides):
    args = dict(
        run_id="run-abc",
        eval_uri="gs://bucket/eval_v1.jsonl",
        eval_sha256="ab" * 32,
        decode={"max_new_tokens": 256, "temperature": 0.0, "greedy": True},
        losses=LOSSES,
        data_counts={"records_read": 120, "trained": 100, "held_out": 10, "rejected": 10},
    )
    args.update(overrides)
    # `after` comes in another order: pairing is by id, ordering by the eval set (`before`).
    return build_delta_report(results(BEFORE), results(AFTER, order=ITEMS[::-1]), **args)


def test_report_fields():
    report = make_report()
    json.dumps(report, allow_nan=False)  # valid JSON
    assert report["run_id"] == "run-abc"
    assert report["eval_uri"] == "gs://bucket/eval_v1.jsonl"
    assert report["eval_sha256"] == "ab" * 32

    b, a = report["before"], report["after"]
    assert (b["n"], b["strict_correct"], b["flexible_correct"]) == (5, 1, 2)  # 004 strict; 002 flexible
    assert (a["n"], a["strict_correct"], a["flexible_correct"]) == (5, 3, 3)
    assert b["strict_accuracy"] == pytest.approx(0.2) and a["strict_accuracy"] == pytest.approx(0.6)
    assert b["flexible_accuracy"] == pytest.approx(0.4) and a["flexible_accuracy"] == pytest.approx(0.6)
    assert report["delta"] == {"strict": pytest.approx(0.4), "flexible": pytest.approx(0.2)}
    # answer line and stopped: before 002, 004, 005 (001 has no answer line, 003 did not stop)
    assert b["format_compliance"] == pytest.approx(0.6)
    assert a["format_compliance"] == pytest.approx(0.8)  # 005 neither answered nor stopped
    assert b["finished_fraction"] == pytest.approx(0.8) and a["finished_fraction"] == pytest.approx(0.8)

    assert report["fixed"] == ["eval-001", "eval-003"]
    assert report["broken"] == ["eval-004"]
    assert report["unchanged"] == ["eval-002", "eval-005"]
    assert report["mcnemar_p"] == mcnemar_exact_p(2, 1) == 1.0
    assert report["mcnemar_p_strict"] == mcnemar_exact_p(3, 1)

    assert report["per_category"]["knowledge"] == {
        "n": 2, "before_strict": 0.0, "before_flexible": 0.5, "after_strict": 0.5, "after_flexible": 0.5,
    }
    assert report["per_category"]["geometry"]["after_flexible"] == 0.0
    assert list(report["per_category"]) == sorted(report["per_category"])

    assert report["decode"]["max_new_tokens"] == 256
    assert report["loss"] == {"first": 2.5, "last": 1.25, "min": 1.0, "steps": 4, "points": 4, "eval_last": 1.9}
    assert report["data"]["rejected"] == 10


def test_examples_prefer_fixed_then_broken():
    report = make_report(examples=4)
    ex = report["examples"]
    assert [e["id"] for e in ex] == ["eval-001", "eval-003", "eval-004", "eval-002"]
    assert ex[0]["expected"] == "42" and ex[0]["prompt"] == "What is 15 + 27?"
    assert ex[0]["before"]["extracted"] == "41" and ex[0]["after"]["extracted"] == "42"
    assert ex[0]["after"]["output"].endswith("Answer: 42")
    assert len(make_report(examples=0)["examples"]) == 0


def test_mismatched_ids_are_an_error():
    before = results(BEFORE)
    with pytest.raises(ValueError, match="eval-005"):
        build_delta_report(before, results(AFTER)[:-1], run_id="r", eval_uri="u", eval_sha256="s",
                           decode={}, losses=[], data_counts={})
    with pytest.raises(ValueError):
        build_delta_report(before, results(AFTER) + results(AFTER)[:1], run_id="r", eval_uri="u",
                           eval_sha256="s", decode={}, losses=[], data_counts={})


def test_diverged_loss_is_null_not_nan():
    report = make_report(losses=[{"step": 1, "loss": 2.0}, {"step": 2, "loss": float("nan")}])
    assert report["loss"]["last"] is None and report["loss"]["min"] == 2.0
    json.dumps(report, allow_nan=False)


# ------------------------------------------------------------------------------------ Markdown


def test_markdown_contains_the_numbers():
    md = render_markdown(make_report())
    assert "run-abc" in md
    assert "| strict accuracy | 20.0% (1/5) | 60.0% (3/5) | +40.0 pp |" in md
    assert "| flexible accuracy | 40.0% (2/5) | 60.0% (3/5) | +20.0 pp |" in md
    assert "p = 1" in md and "not significant at the 0.05 level" in md and "n = 5" in md
    assert "fixed (wrong before, right after): 2: `eval-001`, `eval-003`" in md
    assert "broken (right before, wrong after): 1: `eval-004`" in md
    assert "| knowledge | 2 | 0.0% | 50.0% | 50.0% | 50.0% |" in md
    assert "ab" * 32 in md
    assert "max_new_tokens: `256`" in md
    assert "| records read | 120 |" in md and "| held out | 10 |" in md
    assert "![loss curve](loss_curve.png)" in md
    assert "Answer: 42" in md


def test_markdown_significance_and_no_plot():
    report = make_report()
    report["mcnemar_p"] = 0.021484375
    md = render_markdown(report, loss_curve=None)
    assert "p = 0.02148" in md and "significant at the 0.05 level" in md and "not significant" not in md
    assert "![loss curve]" not in md


def test_markdown_truncates_outputs_and_keeps_fences_closed():
    long_output = "```\n" + "x" * 5000 + "\nAnswer: 42"
    outputs = {**AFTER, "eval-001": (long_output, True)}
    report = build_delta_report(results(BEFORE), results(outputs), run_id="r", eval_uri="u", eval_sha256="s",
                                decode={}, losses=[], data_counts={})
    md = render_markdown(report)
    assert "x" * 401 not in md and "more characters]" in md
    assert "````text" in md  # a fence longer than the output's own ``` run
    assert "No training loss was recorded." in md


# ----------------------------------------------------------------------------------- loss plot


def test_plot_writes_png(tmp_path):
    path = tmp_path / "sub" / "loss_curve.png"
    plot_loss_curve(LOSSES, str(path))
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000


def test_plot_without_losses_still_writes_png(tmp_path):
    path = tmp_path / "loss_curve.png"
    plot_loss_curve([], str(path))
    assert path.read_bytes().startswith(b"\x89PNG")
