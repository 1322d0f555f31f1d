import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedrec.metrics import add_sums, metric_means, metric_sums, target_ranks


def test_ndcg_hand_computed():
    # ranks 0, 2, 12: NDCG@10 = (1/log2(2) + 1/log2(4) + 0) / 3 = (1 + 0.5) / 3
    m = metric_means(metric_sums(np.array([0, 2, 12])))
    assert math.isclose(m["ndcg@10"], 0.5)
    assert math.isclose(m["hr@10"], 2 / 3)
    assert math.isclose(m["hr@20"], 1.0)
    assert math.isclose(m["ndcg@20"], (1 + 0.5 + 1 / math.log2(14)) / 3)
    assert math.isclose(m["ndcg@5"], 0.5)


def test_rank_excludes_history_but_never_the_target():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.1]])  # items 1..4
    target = torch.tensor([3])
    assert target_ranks(scores, target).item() == 2
    exclude = torch.tensor([[True, False, False, False]])  # item 1 is history
    assert target_ranks(scores, target, exclude).item() == 1
    exclude[0, 2] = True  # marking the target itself changes nothing
    assert target_ranks(scores, target, exclude).item() == 1


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 100), min_size=1, max_size=50), st.lists(st.integers(0, 100), max_size=50))
def test_sums_add_and_metrics_are_ordered(a, b):
    m = metric_means(add_sums(metric_sums(np.array(a)), metric_sums(np.array(b))))
    whole = metric_means(metric_sums(np.array(a + b)))
    assert all(math.isclose(m[k], whole[k], abs_tol=1e-12) for k in whole)
    assert m["hr@5"] <= m["hr@10"] <= m["hr@20"]
    assert m["ndcg@10"] <= m["hr@10"] + 1e-12


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 1000), st.lists(st.integers(1, 150), max_size=40), st.integers(1, 150))
def test_sampled_negatives_are_unseen_distinct_and_seeded(user, history, target):
    from fedrec.metrics import sample_negatives

    hist = np.array(history, dtype=np.int64)
    neg = sample_negatives(user, hist, target, 150)
    assert np.array_equal(neg, sample_negatives(user, hist, target, 150))
    assert len(set(neg.tolist())) == len(neg) == min(100, 150 - len(set(history) | {target}))
    assert not (set(neg.tolist()) & (set(history) | {target}))
    assert neg.min(initial=1) >= 1 and neg.max(initial=150) <= 150


def test_a_bootstrap_interval_contains_its_estimate_and_narrows_as_users_are_added():
    from fedrec.metrics import bootstrap_intervals, per_user_values

    rng = np.random.default_rng(0)
    widths = []
    for n in (200, 2000, 20000):
        ranks = rng.geometric(0.05, size=n) - 1
        names, values = per_user_values(ranks)
        ci = bootstrap_intervals(ranks, samples=400, seed=1)
        for name, mean in zip(names, values.mean(axis=0)):
            lo, hi = ci[name]
            assert lo <= mean <= hi, name
        widths.append(ci["ndcg@10"][1] - ci["ndcg@10"][0])
    assert widths[0] > 2 * widths[1] > 4 * widths[2] > 0  # ~1/sqrt(n): 10x users, ~3x narrower


def test_a_paired_interval_sees_a_gain_that_marginal_intervals_cannot():
    from fedrec.metrics import bootstrap_intervals

    rng = np.random.default_rng(3)
    base = rng.geometric(0.05, size=3000) - 1
    better = np.where(rng.random(3000) < 0.1, np.maximum(base - 3, 0), base)  # 10% of users move up a little
    paired = bootstrap_intervals(better, baseline=base, samples=400)["ndcg@10"]
    a, b = bootstrap_intervals(better, samples=400)["ndcg@10"], bootstrap_intervals(base, samples=400)["ndcg@10"]
    assert paired[0] > 0  # the gain is a statement
    assert a[0] < b[1]  # while the two marginal intervals overlap
