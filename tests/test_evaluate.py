"""Tests for job.evaluate's kept generations: what a resumed run reads back instead of decoding again."""

from __future__ import annotations

from job import io
from job.evaluate import generations_record, load_generations, scored
from job.formats import EvalItem

ITEMS = [EvalItem(id="a", prompt="1+1?", expected_answer="2"), EvalItem(id="b", prompt="2+2?", expected_answer="4")]


def _run():
    return scored(ITEMS, [("Answer: 2", True), ("Answer: 5", False)], seconds=1.5, tokens=9)


def test_kept_generations_come_back_scored_as_they_were(tmp_path):
    uri = str(tmp_path / "gen.json")
    run = _run()
    io.write_json(uri, generations_record("k1", run))
    back = load_generations(uri, "k1", ITEMS)
    assert back is not None
    assert back.results == run.results and back.seconds == 1.5 and back.generated_tokens == 9
    assert [r.score.strict for r in back.results] == [True, False]


def test_other_settings_or_items_or_a_broken_file_mean_decoding_again(tmp_path, capfd):
    uri = str(tmp_path / "gen.json")
    assert load_generations(uri, "k1", ITEMS) is None  # none kept
    io.write_json(uri, generations_record("k1", _run()))
    assert load_generations(uri, "k2", ITEMS) is None  # another model, seed, eval set, settings...
    assert load_generations(uri, "k1", ITEMS[::-1]) is None  # other items
    assert load_generations(uri, "k1", ITEMS[:1]) is None
    io.write_text(uri, '{"key": "k1", "outputs": [')  # cut short
    assert load_generations(uri, "k1", ITEMS) is None
    assert "saved eval generations unreadable; decoding again" in capfd.readouterr().err
