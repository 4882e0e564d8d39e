"""Metric functions and distribution helpers vs hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mfllm.evaluation import distributions as D
from mfllm.evaluation import metrics as M
from mfllm.labels.base import ActionLabels

# ------------------------------------------------------------------ KL


def test_kl_hand_value_without_smoothing():
    # 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75)
    want = 0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75)
    assert M.kl([0.5, 0.5], [0.25, 0.75], eps=0) == pytest.approx(want, abs=1e-12)
    assert M.kl([0.5, 0.5], [0.25, 0.75]) == pytest.approx(want, rel=1e-5)


def test_kl_counts_are_normalised_and_identical_is_zero():
    assert M.kl([2, 2], [1, 3], eps=0) == pytest.approx(M.kl([0.5, 0.5], [0.25, 0.75], eps=0))
    assert M.kl([3, 1, 0], [3, 1, 0]) == pytest.approx(0.0, abs=1e-12)


def test_kl_zero_bins_use_smoothing():
    e = 1e-6
    # real has a zero bin: p' = [(1+e), e] / (1+2e), q' = [0.5, 0.5]
    p = np.array([1 + e, e]) / (1 + 2 * e)
    want = float(np.sum(p * np.log(p / 0.5)))
    assert M.kl([1, 0], [0.5, 0.5], eps=e) == pytest.approx(want, rel=1e-9)
    assert want == pytest.approx(math.log(2), rel=1e-4)
    # the simulation misses a category: large but finite, = sum p ln(p / q') with q' smoothed
    q = np.array([1 + e, e]) / (1 + 2 * e)
    p2 = np.array([0.5 + e, 0.5 + e]) / (1 + 2 * e)
    want2 = float(np.sum(p2 * np.log(p2 / q)))
    got = M.kl([0.5, 0.5], [1, 0], eps=e)
    assert got == pytest.approx(want2, rel=1e-9)
    assert got == pytest.approx(0.5 * math.log(0.5 / 1e-6) + 0.5 * math.log(0.5), rel=1e-5)


def test_kl_one_category():
    assert M.kl([4], [1]) == 0.0


@pytest.mark.parametrize("fn", [M.kl, M.js, M.wasserstein, M.total_variation])
def test_distribution_errors(fn):
    with pytest.raises(ValueError):
        fn([0, 0], [1, 0])
    with pytest.raises(ValueError):
        fn([1, 0], [1, 0, 0])
    with pytest.raises(ValueError):
        fn([], [])
    with pytest.raises(ValueError):
        fn([-1, 2], [1, 1])


# ------------------------------------------------------------------ JS / W1 / TV


def test_js_hand_values():
    assert M.js([1, 0], [0, 1]) == pytest.approx(1.0)
    assert M.js([0.3, 0.7], [0.3, 0.7]) == pytest.approx(0.0, abs=1e-12)
    # M = [0.75, 0.25]; KL(p||M) = log2(4/3); KL(q||M) = 0.5 log2(2/3) + 0.5 log2(2)
    want = 0.5 * (math.log2(4 / 3) + 0.5 * math.log2(2 / 3) + 0.5)
    assert M.js([1, 0], [0.5, 0.5]) == pytest.approx(want, abs=1e-12)
    assert M.js([1, 0], [0.5, 0.5]) == pytest.approx(0.311278, abs=1e-6)


def test_wasserstein_hand_values():
    assert M.wasserstein([1, 0, 0], [0, 0, 1]) == pytest.approx(2.0)
    assert M.wasserstein([0.5, 0.5, 0], [0, 0.5, 0.5]) == pytest.approx(1.0)  # |CDF diff| = 0.5 + 0.5
    assert M.wasserstein([1, 3], [1, 3]) == pytest.approx(0.0)
    assert M.wasserstein([1], [5]) == 0.0


def test_total_variation_hand_values():
    assert M.total_variation([0.5, 0.5, 0], [0, 0.5, 0.5]) == pytest.approx(0.5)
    assert M.total_variation([1, 0], [0, 1]) == pytest.approx(1.0)
    assert M.total_variation([2, 2], [1, 1]) == pytest.approx(0.0)


# ------------------------------------------------------------------ DTW


def test_dtw_unequal_lengths_warp_to_zero():
    real = [[1, 0], [0, 1]]
    sim = [[1, 0], [1, 0], [0, 1]]
    assert M.dtw(real, sim) == pytest.approx(0.0)


def test_dtw_one_bin_against_two():
    # per category: [1] vs [.5, .5] -> sqrt(.25 + .25); [0] vs [.5, .5] -> same; mean of the two
    assert M.dtw([[1, 0]], [[0.5, 0.5], [0.5, 0.5]]) == pytest.approx(math.sqrt(0.5))


def test_dtw_averages_over_categories():
    # category 0: [1, 0] vs [0.5, 0] -> 0.5; category 1: [0, 1] vs [0.5, 1] -> 0.5; category 2: 0
    real = [[1, 0, 0], [0, 1, 0]]
    sim = [[0.5, 0.5, 0], [0, 1, 0]]
    assert M.dtw(real, sim) == pytest.approx(1 / 3)
    assert M.dtw([0.0, 0.0], [1.0]) == pytest.approx(math.sqrt(2))  # 1-D = one category


def test_dtw_errors():
    with pytest.raises(ValueError):
        M.dtw(np.zeros((0, 2)), [[1, 0]])
    with pytest.raises(ValueError):
        M.dtw([[1, 0]], [[1, 0, 0]])


# ------------------------------------------------------------------ micro-F1


def test_micro_f1_single_label_equals_accuracy():
    assert M.micro_f1(["a", "b", "c", "a"], ["a", "b", "a", "b"]) == pytest.approx(0.5)
    assert M.micro_f1(["a"], ["a"]) == 1.0


def test_micro_f1_missing_labels():
    # real None: skipped; sim None: a false negative only.  TP=1, FP=1, FN=2 -> 2/(2+1+2)
    assert M.micro_f1(["a", "b", "a", None], ["a", "a", None, "b"]) == pytest.approx(0.4)


def test_micro_f1_sets():
    # TP = 2 (x, z), FP = 1 (w), FN = 1 (y) -> 4 / 6
    assert M.micro_f1([{"x", "y"}, {"z"}], [{"x"}, {"z", "w"}]) == pytest.approx(2 / 3)
    assert M.micro_f1([set()], [set()]) == 1.0
    assert M.micro_f1([frozenset()], [{"x"}]) == 0.0


def test_micro_f1_errors():
    with pytest.raises(ValueError):
        M.micro_f1([None, None], ["a", "b"])
    with pytest.raises(ValueError):
        M.micro_f1(["a"], ["a", "b"])


# ------------------------------------------------------------------ summarize


def test_summarize():
    s = M.summarize([1.0, 2.0, 3.0])
    half = 4.302652729749464 / math.sqrt(3)  # t_{0.975, 2} * std(=1) / sqrt(3)
    assert s["mean"] == 2.0 and s["std"] == pytest.approx(1.0) and s["n"] == 3
    assert s["ci95"] == pytest.approx([2 - half, 2 + half])
    assert M.summarize([5.0]) == {"mean": 5.0, "std": None, "ci95": None, "n": 1}
    assert M.summarize([]) == {"mean": None, "std": None, "ci95": None, "n": 0}
    assert M.summarize([1.0, None, float("nan"), 3.0])["n"] == 2


# ------------------------------------------------------------------ distributions helpers


def test_horizon_bins():
    assert D.horizon_bins(1) == {"short": 1, "mid": 1, "long": 1}
    assert D.horizon_bins(2) == {"short": 1, "mid": 2, "long": 2}
    assert D.horizon_bins(3) == {"short": 1, "mid": 2, "long": 3}
    assert D.horizon_bins(4) == {"short": 2, "mid": 3, "long": 4}
    assert D.horizon_bins(9) == {"short": 3, "mid": 6, "long": 9}
    assert D.horizon_bins(0) == {"short": 0, "mid": 0, "long": 0}


def test_assign_bins():
    steps, times = [5, 5, 6, 6, 8], [0.0, 1, 2, 3, 4]
    assert D.assign_bins(steps, times, D.Binning("steps", 1)) == [0, 0, 1, 1, 2]
    assert D.assign_bins(steps, times, D.Binning("steps", 2)) == [0, 0, 0, 0, 1]
    assert D.assign_bins(steps, times, D.Binning("actions", 2)) == [0, 0, 1, 1, 2]
    assert D.assign_bins([1, 1, 1], [100.0, 150.0, 320.0], D.Binning("seconds", 100)) == [0, 0, 2]
    assert D.assign_bins([], [], D.Binning()) == []


def test_binning_validation():
    from mfllm.errors import ConfigError

    for by, size in (("days", 1), ("steps", 0), ("actions", 1.5), ("seconds", float("nan"))):
        with pytest.raises(ConfigError):
            D.Binning(by, size)


def _al(stance: str | None = None, kw: tuple[str, ...] = ()) -> ActionLabels:
    return ActionLabels(labels={"stance": stance} if stance else {}, keywords=list(kw))


def test_counts_shares_and_keywords_vocab():
    labels = [_al("support", ("谣言", "辟谣")), _al("oppose", ("谣言",)), None, _al("support", ("警察",))]
    cats = D.categories("stance")
    assert cats == ("support", "oppose", "neutral")
    assert D.counts(labels, "stance", cats).tolist() == [2, 1, 0]
    bins = [0, 0, 1, 1]
    vocab = D.keyword_vocab(labels, bins, top_n=1)
    assert vocab == ("谣言", "警察")  # bin 0's top-1 and bin 1's top-1, by overall frequency
    kcats = D.categories("keywords", vocab)
    assert kcats == ("谣言", "警察", D.OTHER)
    assert D.counts(labels, "keywords", kcats).tolist() == [2, 1, 1]  # 辟谣 -> other
    bc = D.bin_counts(labels, bins, 3, "stance", cats)
    assert bc.tolist() == [[1, 1, 0], [1, 0, 0], [0, 0, 0]]
    sh = D.shares(bc)
    assert sh[0].tolist() == [0.5, 0.5, 0] and np.isnan(sh[2]).all()


def _event(warm, real, sim, bins) -> D.EventLabels:
    return D.EventLabels("e", warm, [0] * len(warm), real, sim, bins)


def test_persistence_and_marginal_predictions():
    warm = [_al("oppose", ("辟谣",)), _al("neutral"), _al("oppose", ("辟谣", "警察"))]
    ev = _event(warm, [_al("support")] * 4, [_al("support")] * 4, [0, 0, 1, 1])
    cats = D.categories("stance")
    p = D.persistence_prediction(ev, "stance", cats)
    assert p.dist.shape == (2, 3)
    assert p.dist[1] == pytest.approx([0, 2 / 3, 1 / 3])
    assert p.items == [["oppose"] * 4]  # one crowd: the majority label for every agent
    pk = D.persistence_prediction(ev, "keywords", D.categories("keywords", ("警察",)))
    assert pk.dist[0] == pytest.approx([1 / 3, 2 / 3]) and pk.items[0][0] == frozenset({"辟谣"})
    assert D.persistence_prediction(_event([], ev.real, ev.sim, ev.bins), "stance", cats) is None

    marg = {
        "distributions": {"stance": {"support": 0.2, "oppose": 0.5, "neutral": 0.3}},
        "keywords": {"total": 10, "counts": {"警察": 4, "谣言": 6}},
    }
    m = D.marginal_prediction(marg, ev, "stance", cats)
    assert m.dist[0] == pytest.approx([0.2, 0.5, 0.3]) and m.items[0][0] == "oppose"
    mk = D.marginal_prediction(marg, ev, "keywords", D.categories("keywords", ("警察",)))
    assert mk.dist[0] == pytest.approx([0.4, 0.6]) and mk.items[0][0] == frozenset({"谣言"})
    assert D.marginal_prediction(None, ev, "stance", cats) is None
    assert D.marginal_prediction({"distributions": {}}, ev, "stance", cats) is None


def test_row_metrics_match_scalar_ones():
    rng = np.random.default_rng(0)
    for k in (1, 2, 3, 6):
        p = rng.integers(0, 5, size=(40, k)).astype(float)
        q = rng.random((40, k))
        q[rng.random((40, k)) < 0.3] = 0
        p[:, 0] += 1  # no all-zero row
        q[:, -1] += 0.1
        for rows, scalar in (
            (M.kl_rows, M.kl),
            (M.js_rows, M.js),
            (M.wasserstein_rows, M.wasserstein),
            (M.total_variation_rows, M.total_variation),
        ):
            want = [scalar(a, b) for a, b in zip(p, q, strict=True)]
            assert rows(p, q) == pytest.approx(want, abs=1e-12), rows.__name__
    with pytest.raises(ValueError):
        M.kl_rows([[0, 0]], [[1, 0]])


def test_metric_intervals_need_three_events_and_stay_in_the_metrics_range():
    w1 = [0.1, 12.0]  # two events: a t-interval would reach far below 0
    assert M.summarize(w1)["ci95"][0] < 0
    assert M.summarize_metric("wasserstein", w1)["ci95"] is None
    s = M.summarize_metric("kl", [0.01, 0.02, 3.0])
    assert s["n"] == 3 and s["ci95"][0] == 0.0 and s["ci95"][1] > s["mean"]
    f1 = M.summarize_metric("micro_f1", [0.99, 1.0, 0.2])
    assert f1["ci95"][1] == 1.0

