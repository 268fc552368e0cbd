import numpy as np
import pandas as pd
import pytest

from common.buckets import Bins, quantile_bins, summarize_by_bin


def test_open_bins_exclude_both_edges():
    # SPEC.md Exp.1: edges [0, 0.02, 0.5, 1, 1.5, 2], strict at both ends.
    bins = Bins((0, 0.02, 0.5, 1, 1.5, 2), closed="open")
    got = bins.assign([0.0, 0.01, 0.02, 0.3, 0.5, 1.2, 1.99, 2.0, 5.0])
    assert got.tolist() == [-1, 0, -1, 1, -1, 3, 4, -1, -1]


def test_left_closed_bins_triviaqa_correct_counts():
    # SPEC.md Exp.2: bins on #correct [0,2), [2,4), ..., [10,12); 12/12 correct falls outside.
    bins = Bins(tuple(range(0, 13, 2)), closed="left")
    got = bins.assign(list(range(13)))
    assert got.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, -1]


def test_inclusive_variant_keeps_the_all_correct_questions():
    # The paper's bins on #incorrect of 12: [1,3), ..., [11,13); 0 incorrect (12/12 correct) is dropped.
    paper = Bins((1, 3, 5, 7, 9, 11, 13), closed="left")
    assert paper.assign([0, 1, 2, 12]).tolist() == [-1, 0, 0, 5]
    assert paper.inclusive().edges == (0, 3, 5, 7, 9, 11, 13)
    assert paper.inclusive().assign([0, 1, 2, 3, 12]).tolist() == [0, 0, 0, 1, 5]
    already = Bins((0, 2, 13), closed="left")
    assert already.inclusive() is already


def test_right_closed_bins():
    assert Bins((0, 1, 2), closed="right").assign([0, 0.5, 1, 2, 2.5]).tolist() == [-1, 0, 0, 1, -1]


def test_bad_edges_are_rejected():
    with pytest.raises(ValueError):
        Bins((0, 1, 1))
    with pytest.raises(ValueError):
        Bins((0, 1), closed="both")


def test_quantile_bins_balance_counts_and_include_max():
    bins = quantile_bins(np.arange(100), 4)
    counts = np.bincount(bins.assign(np.arange(100)), minlength=4)
    assert counts.tolist() == [25, 25, 25, 25]


def test_summarize_by_bin_counts_means_stds():
    frame = pd.DataFrame({"score": [0.1, 0.2, 0.6, 0.7, 0.8, 3.0], "p": [1.0, 0.0, 0.5, 0.5, 0.2, 9.0]})
    table = summarize_by_bin(frame, "score", Bins((0, 0.5, 1, 2)), ["p"])
    assert table["count"].tolist() == [2, 3, 0]
    assert table["x_mean"].iloc[0] == pytest.approx(0.15)
    assert table["p_mean"].iloc[:2].tolist() == pytest.approx([0.5, 0.4])
    assert table["p_std"].iloc[0] == pytest.approx(0.5)  # population std of {1, 0}
    assert table["p_std"].iloc[1] == pytest.approx(np.std([0.5, 0.5, 0.2]))
    assert np.isnan(table["p_mean"].iloc[2])
    assert table["bin_label"].tolist() == ["[0, 0.5)", "[0.5, 1)", "[1, 2)"]
