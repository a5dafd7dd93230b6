"""fmt_number: one display rule for log lines, summaries, tables and chart axes."""

import math

import pytest

from lmpipeline.numbers import fmt_number, fmt_pairs


@pytest.mark.parametrize("value, shown", [
    (10730.4, "10,730"), (1073.4, "1,073"), (1000, "1,000"), (999, "999"), (12, "12"),
    (2.39171, "2.392"), (0.870312, "0.8703"), (0.0015, "0.0015"), (0.001, "0.001"),
    (5.468e-09, "5.47e-09"), (5e-4, "5e-04"), (2.5e-4, "2.5e-04"), (-3.2e-5, "-3.2e-05"),
    (0.0, "0"), (0, "0"), (float("nan"), "nan"), (math.inf, "inf"), (True, "True"), ("x", "x"), (None, "None"),
])
def test_fmt_number(value, shown):
    assert fmt_number(value) == shown


def test_fmt_pairs_skips_and_formats():
    rec = {"step": 1200, "loss": 0.87031, "learning_rate": 5.468e-09, "tokens_per_second": 10730.4}
    assert fmt_pairs(rec, skip=("step",)) == "loss=0.8703 learning_rate=5.47e-09 tokens_per_second=10,730"
