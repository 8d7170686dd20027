from __future__ import annotations

import pytest

from fxprune import InvalidBudgetError
from fxprune.budget import format_macs, parse_latency_budget, parse_mac_budget

BASE = 4_000_000_000


@pytest.mark.parametrize(
    "spec,expected",
    [
        (0.5, 2_000_000_000),
        ("50%", 2_000_000_000),
        ("12.5 %", 500_000_000),
        (1.0, BASE),
        ("100%", BASE),
        (1.8e9, 1_800_000_000),
        ("1.8G", 1_800_000_000),
        ("1.8g", 1_800_000_000),
        ("500M", 500_000_000),
        ("500 MMACs", 500_000_000),
        ("2.5e9", 2_500_000_000),
        ("1800000000", 1_800_000_000),
        ("1_800_000_000", 1_800_000_000),
        (3_000_000_000, 3_000_000_000),
        ("0.25", 1_000_000_000),
        ("250K", 250_000),
    ],
)
def test_accepted_forms(spec, expected):
    assert parse_mac_budget(spec, BASE) == expected


@pytest.mark.parametrize("spec", [None, True, -1, 0, "0%", "-5%", "abc", "1.8X", float("nan"), float("inf"), [0.5], "G"])
def test_rejected_forms_list_the_accepted_ones(spec):
    with pytest.raises(InvalidBudgetError) as err:
        parse_mac_budget(spec, BASE)
    assert "accepted forms" in str(err.value)
    assert isinstance(err.value, ValueError)


def test_latency_budget_forms():
    assert parse_latency_budget("20ms") == 20.0
    assert parse_latency_budget("500us") == 0.5
    assert parse_latency_budget("0.02s") == 20.0
    assert parse_latency_budget(12.5) == 12.5
    assert parse_latency_budget("60%", base_ms=50.0) == pytest.approx(30.0)
    with pytest.raises(InvalidBudgetError):
        parse_latency_budget("fast")
    with pytest.raises(InvalidBudgetError):
        parse_latency_budget("60%")


def test_format_macs():
    assert format_macs(4_089_184_256) == "4.089 G"
    assert format_macs(512) == "512"
