"""The delta report: what fine-tuning changed on the eval set, as JSON, Markdown and a loss plot.

Before and after are paired item by item, so the report can say which items were fixed and which
broken, and an exact McNemar test on those discordant pairs says whether the change is more than
noise on an eval set of a few dozen items.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from job.score import ItemResult

SIGNIFICANCE_LEVEL = 0.05
EXAMPLE_OUTPUT_CHARS = 400


def mcnemar_exact_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value for b and c discordant pairs (a binomial test at 1/2)."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)  # exact integers until this one division


def _phase_summary(results: Sequence[ItemResult]) -> dict:
    n = len(results)
    strict = sum(r.score.strict for r in results)
    flexible = sum(r.score.flexible for r in results)
    compliant = sum(r.score.has_answer_line and r.finished for r in results)
    finished = sum(r.finished for r in results)
    return {
        "n": n,
        "strict_correct": strict,
        "flexible_correct": flexible,
        "strict_accuracy": strict / n,
        "flexible_accuracy": flexible / n,
        # The trained format: an "Answer:" line, and generation that stopped at <end_of_turn>.
        "format_compliance": compliant / n,
        "finished_fraction": finished / n,
    }


def _finite(value: object) -> float | None:
    # NaN/inf are not JSON; a diverged loss is reported as null.
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _loss_summary(losses: list[dict]) -> dict:
    train = [r for r in losses if "loss" in r]
    values = [_finite(r["loss"]) for r in train]
    finite = [v for v in values if v is not None]
    evals = [_finite(r["eval_loss"]) for r in losses if "eval_loss" in r]
    return {
        "first": values[0] if values else None,
        "last": values[-1] if values else None,
        "min": min(finite) if finite else None,
        "steps": max((int(r["step"]) for r in train if "step" in r), default=0),
        "points": len(train),
        "eval_last": evals[-1] if evals else None,
    }


def _example(before: ItemResult, after: ItemResult) -> dict:
    def side(r: ItemResult) -> dict:
        return {
            "output": r.output,
            "extracted": r.score.extracted,
            "strict": r.score.strict,
            "flexible": r.score.flexible,
            "finished": r.finished,
        }

    item = before.item
    return {
        "id": item.id,
        "category": item.category,
        "prompt": item.prompt,
        "expected": item.expected_answer,
        "before": side(before),
        "after": side(after),
    }


def build_delta_report(
    before: list[ItemResult],
    after: list[ItemResult],
    *,
    run_id: str,
    eval_uri: str,
    eval_sha256: str,
    decode: dict,
    losses: list[dict],
    data_counts: dict,
    examples: int = 5,
) -> dict:
    """Pair before/after results by item id (in the order of `before`, the eval set's) and compare."""
    ids = [r.item.id for r in before]
    after_by_id = {r.item.id: r for r in after}
    if not before:
        raise ValueError("no eval results to report on")
    if len(set(ids)) != len(ids) or len(after_by_id) != len(after) or set(ids) != set(after_by_id):
        only_before = sorted(set(ids) - set(after_by_id))
        only_after = sorted(set(after_by_id) - set(ids))
        raise ValueError(
            "before and after must score the same eval items once each "
            f"(only before: {only_before[:5]}, only after: {only_after[:5]}, {len(before)} vs {len(after)} results)"
        )
    pairs = [(b, after_by_id[b.item.id]) for b in before]

    fixed = [b.item.id for b, a in pairs if not b.score.flexible and a.score.flexible]
    broken = [b.item.id for b, a in pairs if b.score.flexible and not a.score.flexible]
    unchanged = [b.item.id for b, a in pairs if b.score.flexible == a.score.flexible]
    strict_fixed = sum(not b.score.strict and a.score.strict for b, a in pairs)
    strict_broken = sum(b.score.strict and not a.score.strict for b, a in pairs)

    categories: dict[str, list[tuple[ItemResult, ItemResult]]] = {}
    for b, a in pairs:
        categories.setdefault(b.item.category, []).append((b, a))
    per_category = {
        name: {
            "n": len(group),
            "before_strict": sum(b.score.strict for b, _ in group) / len(group),
            "before_flexible": sum(b.score.flexible for b, _ in group) / len(group),
            "after_strict": sum(a.score.strict for _, a in group) / len(group),
            "after_flexible": sum(a.score.flexible for _, a in group) / len(group),
        }
        for name, group in sorted(categories.items())
    }

    by_id = {b.item.id: (b, a) for b, a in pairs}
    fixed_set, broken_set = set(fixed), set(broken)
    ordered = fixed + broken + [i for i in ids if i not in fixed_set and i not in broken_set]

    before_summary, after_summary = _phase_summary(before), _phase_summary([a for _, a in pairs])
    return {
        "run_id": run_id,
        "eval_uri": eval_uri,
        "eval_sha256": eval_sha256,
        "before": before_summary,
        "after": after_summary,
        "delta": {
            "strict": after_summary["strict_accuracy"] - before_summary["strict_accuracy"],
            "flexible": after_summary["flexible_accuracy"] - before_summary["flexible_accuracy"],
        },
        "fixed": fixed,
        "broken": broken,
        "unchanged": unchanged,
        "mcnemar_p": mcnemar_exact_p(len(fixed), len(broken)),
        "mcnemar_p_strict": mcnemar_exact_p(strict_fixed, strict_broken),
        "per_category": per_category,
        "decode": dict(decode),
        "examples": [_example(*by_id[i]) for i in ordered[:examples]],
        "loss": _loss_summary(losses),
        "data": dict(data_counts),
    }


# ------------------------------------------------------------------------------------ Markdown


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _pp(x: float) -> str:
    return f"{100 * x:+.1f} pp"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _fenced(text: str) -> str:
    # A fence longer than any backtick run in the text, so model output cannot close it early.
    run, longest = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def _truncate(text: str, limit: int = EXAMPLE_OUTPUT_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + f"… [{len(text) - limit} more characters]"


def _ids(ids: list[str]) -> str:
    return ", ".join(f"`{i}`" for i in ids) if ids else "none"


def _significance(p: float, fixed: int, broken: int, n: int) -> str:
    verdict = (
        f"the change is significant at the {SIGNIFICANCE_LEVEL} level"
        if p < SIGNIFICANCE_LEVEL
        else f"the change is not significant at the {SIGNIFICANCE_LEVEL} level and may be noise"
    )
    return (
        f"Exact McNemar test on flexible outcomes: p = {p:.4g} ({fixed} fixed vs {broken} broken "
        f"among n = {n} paired items); {verdict}."
    )


def _md_headline(report: dict) -> list[str]:
    """The title, the before/after scores table and what its scores mean."""
    b, a, d = report["before"], report["after"], report["delta"]
    return [
        f"# Delta report: run `{report['run_id']}`",
        "",
        "| score | before | after | delta |",
        "| --- | ---: | ---: | ---: |",
        f"| strict accuracy | {_pct(b['strict_accuracy'])} ({b['strict_correct']}/{b['n']}) "
        f"| {_pct(a['strict_accuracy'])} ({a['strict_correct']}/{a['n']}) | {_pp(d['strict'])} |",
        f"| flexible accuracy | {_pct(b['flexible_accuracy'])} ({b['flexible_correct']}/{b['n']}) "
        f"| {_pct(a['flexible_accuracy'])} ({a['flexible_correct']}/{a['n']}) | {_pp(d['flexible'])} |",
        f"| format compliance | {_pct(b['format_compliance'])} | {_pct(a['format_compliance'])} "
        f"| {_pp(a['format_compliance'] - b['format_compliance'])} |",
        f"| finished (stopped at `<end_of_turn>`) | {_pct(b['finished_fraction'])} | {_pct(a['finished_fraction'])} "
        f"| {_pp(a['finished_fraction'] - b['finished_fraction'])} |",
        "",
        "Strict: the reply has an `Answer:` line whose text matches the expected answer. Flexible: the "
        "extracted answer (that line, else the last number) matches, or the expected answer appears in "
        "the answer line. Format compliance: an `Answer:` line and generation that stopped by itself.",
    ]


def _md_significance(report: dict) -> list[str]:
    return [
        _significance(report["mcnemar_p"], len(report["fixed"]), len(report["broken"]), report["before"]["n"])
        + f" On strict outcomes p = {report['mcnemar_p_strict']:.4g}."
    ]


def _md_items(report: dict) -> list[str]:
    fixed, broken, unchanged = report["fixed"], report["broken"], report["unchanged"]
    return [
        "## Items",
        "",
        f"- fixed (wrong before, right after): {len(fixed)}: {_ids(fixed)}",
        f"- broken (right before, wrong after): {len(broken)}: {_ids(broken)}",
        f"- unchanged: {len(unchanged)}: {_ids(unchanged)}",
    ]


def _md_per_category(report: dict) -> list[str]:
    lines = [
        "## Per category",
        "",
        "| category | n | before strict | before flexible | after strict | after flexible |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, c in report["per_category"].items():
        lines.append(
            f"| {_cell(name)} | {c['n']} | {_pct(c['before_strict'])} | {_pct(c['before_flexible'])} "
            f"| {_pct(c['after_strict'])} | {_pct(c['after_flexible'])} |"
        )
    return lines


def _md_training(report: dict, loss_curve: str | None) -> list[str]:
    loss = report["loss"]
    lines = ["## Training", ""]
    if loss["points"]:
        lines.append(
            f"Loss over {loss['steps']} steps: first {_num(loss['first'])}, last {_num(loss['last'])}, "
            f"min {_num(loss['min'])}"
            + (f"; last eval loss {_num(loss['eval_last'])}." if loss.get("eval_last") is not None else ".")
        )
    else:
        lines.append("No training loss was recorded.")
    if loss_curve:
        lines += ["", f"![loss curve]({loss_curve})"]
    lines += ["", "| data | count |", "| --- | ---: |"]
    lines += [f"| {_cell(str(k).replace('_', ' '))} | {_cell(v)} |" for k, v in report["data"].items()]
    return lines


def _md_evaluation(report: dict) -> list[str]:
    lines = ["## Evaluation", "", f"- eval set: `{report['eval_uri']}`", f"- eval sha256: `{report['eval_sha256']}`"]
    lines += [f"- {k}: `{v}`" for k, v in report["decode"].items()]
    return lines


def _md_reply(phase: str, side: dict) -> list[str]:
    """One side of an example: what was extracted, how it scored, and the (truncated) reply."""
    verdict = "strict" if side["strict"] else "flexible" if side["flexible"] else "wrong"
    return [
        f"{phase.capitalize()}: extracted "
        + (f"`{_cell(side['extracted'])}`" if side["extracted"] is not None else "nothing")
        + f" ({verdict}"
        + ("" if side["finished"] else ", did not stop")
        + ")",
        "",
        _fenced(_truncate(side["output"])),
    ]


def _md_examples(report: dict) -> list[str]:
    lines = ["## Examples"]
    fixed_set, broken_set = set(report["fixed"]), set(report["broken"])
    for ex in report["examples"]:
        tag = "fixed" if ex["id"] in fixed_set else "broken" if ex["id"] in broken_set else "unchanged"
        lines += [
            "",
            f"### `{ex['id']}` ({tag}, {ex['category']})",
            "",
            f"Expected: `{_cell(ex['expected'])}`",
            "",
            _fenced(_truncate(ex["prompt"])),
        ]
        for phase in ("before", "after"):
            lines += ["", *_md_reply(phase, ex[phase])]
    return lines


def render_markdown(report: dict, loss_curve: str | None = "loss_curve.png") -> str:
    """The report for people: headline numbers first, then where they come from."""
    sections = [
        _md_headline(report),
        _md_significance(report),
        _md_items(report),
        _md_per_category(report),
        _md_training(report, loss_curve),
        _md_evaluation(report),
        _md_examples(report),
    ]
    return "\n\n".join("\n".join(section) for section in sections) + "\n"


# ---------------------------------------------------------------------------------- loss plot


def plot_loss_curve(losses: list[dict], path: str) -> None:
    """Train loss against step (and eval loss points), as a PNG at a local path."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a training node; must precede pyplot
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in losses if "loss" in r and "step" in r]
    evals = [(r["step"], r["eval_loss"]) for r in losses if "eval_loss" in r and "step" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        if train:
            ax.plot([s for s, _ in train], [v for _, v in train], label="train loss")
        if evals:
            ax.plot([s for s, _ in evals], [v for _, v in evals], "o", label="eval loss")
        if not train and not evals:
            ax.text(0.5, 0.5, "no loss recorded", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.legend()
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
