"""The confidence intervals `cwm compare` prints (cwm_operator.stats) and its tables with them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cwm_operator.cli import main as cwm
from cwm_operator.report import interval_lines, paired_lines, write_comparison
from cwm_operator.stats import mcnemar_exact, pair_by_key, paired, wilson


def test_wilson_matches_published_values():
    # Wilson (1927) / Newcombe (1998) table values, 95%.
    assert wilson(0, 10).low == 0.0 and wilson(0, 10).high == pytest.approx(0.2775, abs=1e-4)
    five = wilson(5, 10)
    assert (five.low, five.high) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson(10, 10).high == 1.0 and wilson(10, 10).low == pytest.approx(0.7225, abs=1e-4)
    # Newcombe (1998) example: 81/263.
    assert (wilson(81, 263).low, wilson(81, 263).high) == pytest.approx((0.2553, 0.3662),
                                                                        abs=1e-4)


@pytest.mark.parametrize("right,total", [(-1, 10), (11, 10), (0, 0)])
def test_wilson_refuses_impossible_counts(right, total):
    with pytest.raises(ValueError, match="wilson"):
        wilson(right, total)


def test_mcnemar_exact_is_the_two_sided_binomial_tail():
    # 10 discordant for A, 2 for B: 2 * P(X <= 2), X ~ Bin(12, 1/2) = 2 * (1 + 12 + 66) / 4096.
    assert mcnemar_exact(10, 2) == pytest.approx(158 / 4096)
    assert mcnemar_exact(2, 10) == mcnemar_exact(10, 2)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(20, 0) == pytest.approx(2 / 2 ** 20)


def test_paired_identical_runs_differ_by_nothing():
    verdicts = [True, False, True, True, False] * 40
    result = paired(verdicts, verdicts)
    assert result.difference.value == result.difference.low == result.difference.high == 0
    assert result.a_only == result.b_only == 0 and result.p_value == 1.0
    assert result.a == result.b == wilson(120, 200)


def test_paired_bootstrap_agrees_with_the_normal_approximation_at_large_n():
    # 400 problems: 80 right only in A, 30 only in B, 150 both, 140 neither.
    a = [True] * 80 + [False] * 30 + [True] * 150 + [False] * 140
    b = [False] * 80 + [True] * 30 + [True] * 150 + [False] * 140
    result = paired(a, b)
    n, only_a, only_b = 400, 80, 30
    difference = (only_a - only_b) / n
    se = math.sqrt((only_a + only_b) / n ** 2 - (only_a - only_b) ** 2 / n ** 3)
    assert result.difference.value == pytest.approx(difference)
    assert result.difference.low == pytest.approx(difference - 1.96 * se, abs=0.006)
    assert result.difference.high == pytest.approx(difference + 1.96 * se, abs=0.006)
    assert (result.a_only, result.b_only, result.n) == (80, 30, 400)
    assert result.p_value == pytest.approx(mcnemar_exact(80, 30)) and result.p_value < 1e-5
    assert paired(a, b) == result  # seeded: the same verdicts, the same interval


def test_paired_refuses_unpaired_verdicts():
    with pytest.raises(ValueError, match="different numbers"):
        paired([True, False], [True])
    with pytest.raises(ValueError, match="no problems"):
        paired([], [])


def test_pair_by_key_keeps_only_shared_problems_in_one_order():
    keys, a, b = pair_by_key({"p2": True, "p1": False, "p3": True}, {"p1": True, "p2": True})
    assert (keys, a, b) == (["p1", "p2"], [False, True], [True, True])


def test_interval_lines_count_right_answers_from_accuracy_and_problems():
    lines = interval_lines("sft", [
        ("with", {"heldout_output_direct": 0.5, "heldout_output_problems": 10.0}),
        ("without", {"heldout_output_direct": 0.0, "heldout_output_problems": 10.0})])
    row = next(line for line in lines if line.startswith("| heldout_output_direct"))
    assert "0.500 [0.237, 0.763] (5/10)" in row and "0.000 [0.000, 0.278] (0/10)" in row
    assert interval_lines("sft", [("a", {"validation_loss": 1.0})]) == []


def test_paired_lines_name_the_difference_in_points():
    base = {"heldout_output_direct": {f"p{i}": i < 30 for i in range(100)}}
    other = {"heldout_output_direct": {f"p{i}": i < 10 for i in range(100)}}
    (row,) = [line for line in paired_lines([("with", base), ("without", other)])
              if line.startswith("| heldout_output_direct")]
    assert "| without | 100 |" in row and "| +20.0 [" in row and "| 20 / 0 |" in row


def _run(workdir: Path, name: str, metrics: dict, verdicts: dict | None) -> Path:
    (workdir / "steps" / "sft").mkdir(parents=True)
    (workdir / "run.json").write_text(json.dumps({"pipeline": name, "steps": ["sft"]}))
    (workdir / "steps" / "sft" / "state.json").write_text(json.dumps(
        {"name": "sft", "state": "Succeeded", "metrics": metrics}))
    if verdicts is not None:
        (workdir / "verdicts.json").write_text(json.dumps({"evaluations": verdicts}))
    return workdir


def test_compare_prints_intervals_and_paired_differences(tmp_path, capsys):
    metrics = {"heldout_output_direct": 0.3, "heldout_output_problems": 100.0}
    a = _run(tmp_path / "a", "with", metrics,
             {"heldout_output_direct": {f"p{i}": i < 30 for i in range(100)}})
    b = _run(tmp_path / "b", "without", {**metrics, "heldout_output_direct": 0.1},
             {"heldout_output_direct": {f"p{i}": i < 10 for i in range(100)}})
    assert cwm(["compare", str(a), str(b), "--out", str(tmp_path / "c.md")]) == 0
    text = capsys.readouterr().out
    assert "## Accuracies after sft, with 95% confidence intervals (Wilson)" in text
    assert "(30/100)" in text and "(10/100)" in text
    assert "## Paired differences: with minus each other run" in text and "+20.0 [" in text


def test_compare_without_verdicts_prints_no_paired_section(tmp_path):
    metrics = {"heldout_output_direct": 0.3, "heldout_output_problems": 100.0}
    out = write_comparison([_run(tmp_path / "a", "x", metrics, None),
                            _run(tmp_path / "b", "y", metrics, None)], tmp_path / "c.md")
    text = out.read_text()
    assert "Wilson" in text and "Paired" not in text


def test_compare_names_a_malformed_verdicts_file(tmp_path, capsys):
    metrics = {"heldout_output_direct": 0.3, "heldout_output_problems": 100.0}
    a = _run(tmp_path / "a", "x", metrics, {"heldout_output_direct": {"p": "yes"}})
    b = _run(tmp_path / "b", "y", metrics, None)
    assert cwm(["compare", str(a), str(b), "--out", str(tmp_path / "c.md")]) == 1
    assert "verdicts.json" in capsys.readouterr().err
