"""Effective length (RULER's rule, relative and absolute) and its interval, against hand-worked cases and scipy's
Wilson interval."""

from __future__ import annotations

import pytest
from scipy.stats import binomtest

from minillm.eval.effective import Cell, effective_length, effective_length_text
from minillm.eval.records import Setting
from minillm.eval.tasks import AccuracyRecord, effective_length_of, effective_lengths


@pytest.mark.parametrize("right, samples", [(0, 10), (1, 10), (7, 10), (10, 10), (37, 64), (230, 256), (1, 1)])
def test_cell_interval_is_scipys_wilson(right, samples):
    ci = binomtest(right, samples).proportion_ci(confidence_level=0.95, method="wilson")
    low, high = Cell(128, right / samples, samples).interval()
    # scipy takes z from the normal quantile (1.95996...), the package 1.96: equal to 4 decimals
    assert low == pytest.approx(ci.low, abs=1e-4) and high == pytest.approx(ci.high, abs=1e-4)


def test_relative_rule_by_hand():
    # 1x = 64: 0.9 -> bar 0.81 (threshold 0.9). 128 passes (0.85), 256 dips (0.6), 512 recovers but does not count.
    cells = [(32, 1.0, 100), (64, 0.9, 100), (128, 0.85, 100), (256, 0.6, 100), (512, 0.95, 100)]
    found = effective_length(cells, trained_length=64, threshold=0.9)
    assert (found.length, found.bar, found.reference) == (128, pytest.approx(0.81), 0.9)
    # Wilson 95% with n = 100: 0.85 -> [0.767, 0.907]; 0.9 -> [0.826, 0.945]; 0.6 -> [0.502, 0.691]
    # lower bounds: 32 [0.964..] ok, 64 0.826 ok, 128 0.767 < 0.81 -> low 64; upper: 256 0.691 < 0.81 -> high 128
    assert (found.low, found.high) == (64, 128)
    assert (found.shortest, found.longest, found.samples) == (32, 512, 100)
    assert effective_length_text(found) == "128 [64–128]"
    assert effective_length(cells[::-1], trained_length=64).length == 128  # order does not matter
    # NoLiMa's 0.85 of the base score: bar 0.765, 128's lower bound 0.767 passes now
    assert effective_length(cells, trained_length=64, threshold=0.85).low == 128


def test_relative_rule_has_no_bar_without_a_learned_reference():
    cells = [Cell(64, 0.5, 40), Cell(128, 0.5, 40)]
    assert effective_length(cells, trained_length=256).bar is None  # training length not evaluated
    assert effective_length([Cell(64, 0.0, 40), Cell(128, 0.0, 40)], trained_length=64).length is None
    floor = effective_length(cells, trained_length=64, min_reference=0.6)
    assert (floor.length, floor.low, floor.high, floor.bar, floor.reference) == (None, None, None, None, 0.5)
    assert effective_length_text(floor) == "n/a"
    assert effective_length(cells, trained_length=64, min_reference=0.5).length == 128  # at the floor: kept
    # a length shorter than the training length that fails leaves none, said as shorter than the shortest
    short = effective_length([Cell(32, 0.2, 1000), Cell(64, 1.0, 1000)], trained_length=64)
    assert (short.length, short.low, short.high) == (None, None, None)
    assert effective_length_text(short) == "<32 [<32–<32]"
    assert effective_length([], trained_length=64).bar is None


def test_absolute_rule_ignores_the_reference():
    # RULER's 85.6: 0.9, 0.86 pass, 0.85 fails; the training length need not be measured.
    cells = [(4096, 0.9, 500), (8192, 0.86, 500), (16384, 0.85, 500)]
    found = effective_length(cells, absolute=0.856)
    assert (found.length, found.bar, found.reference) == (8192, 0.856, None)
    # n = 500: 0.9 -> [0.871, 0.923]; 0.86 -> [0.827, 0.887]; 0.85 -> [0.816, 0.878]
    assert (found.low, found.high) == (4096, 16384)
    assert effective_length_text(found) == "8192 [4096–≥16384]"
    assert effective_length(cells, trained_length=4096, threshold=0.5, absolute=0.95).length is None  # absolute wins
    # a partial-credit score (RULER's string_match_part) gets the interval of score × samples successes
    ci = binomtest(3, 4).proportion_ci(method="wilson")
    assert Cell(1, 0.75, 4).interval() == pytest.approx((ci.low, ci.high), abs=1e-4)


def test_interval_brackets_the_length():
    # A ragged curve with few samples: low <= length <= high for every threshold (None: shortest of all).
    cells = [(64, 0.8, 20), (128, 0.75, 20), (256, 0.7, 20), (512, 0.55, 20), (1024, 0.6, 20), (2048, 0.2, 20)]
    order = {None: 0, 64: 1, 128: 2, 256: 3, 512: 4, 1024: 5, 2048: 6}
    for threshold in (0.3, 0.5, 0.7, 0.8, 0.9, 1.0):
        found = effective_length(cells, trained_length=64, threshold=threshold)
        assert order[found.low] <= order[found.length] <= order[found.high]
    with pytest.raises(ValueError, match="one cell per length"):
        effective_length([(64, 1.0, 4), (64, 0.5, 4)], trained_length=64)


def test_task_records_go_through_the_cells():
    setting = Setting("m", "r", 0, 64, "complex", task="mqar")
    records = [AccuracyRecord(setting, n, examples=16, answers=64, tokens=64, exact_match=em)
               for n, em in ((64, 0.75), (128, 0.7), (256, 0.25))]
    records.append(AccuracyRecord(setting, 512, applicable=False, note="refused"))  # not an evaluated length
    direct = effective_length([(64, 0.75, 64), (128, 0.7, 64), (256, 0.25, 64)], trained_length=64, threshold=0.9)
    assert effective_length_of(records, 0.9) == direct
    [record] = effective_lengths(records, 0.9, absolute=0.72)
    assert (record.effective_length, record.absolute, record.bar, record.longest_length) == (64, 0.72, 0.72, 256)
    assert record.found == effective_length_of(records, 0.9, absolute=0.72)
