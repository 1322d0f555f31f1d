import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedrec.aggregate import ServerOptimizer, UpdateSum, mean_update
from fedrec.cohort import sample_cohort, split_among
from fedrec.privacy.clipping import clip_update, update_norm

finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


def _update(values: list[float]) -> dict[str, torch.Tensor]:
    t = torch.tensor(values, dtype=torch.float32)
    half = len(values) // 2
    return {"a": t[:half].clone(), "b": t[half:].clone()}


@settings(max_examples=200, deadline=None)
@given(st.lists(finite, min_size=2, max_size=64), st.floats(1e-3, 100.0))
def test_clipped_norm_never_exceeds_bound_and_keeps_direction(values, bound):
    upd = _update(values)
    clipped, norm = clip_update(upd, bound)
    assert update_norm(clipped) <= bound
    assert np.isclose(norm, update_norm(upd))
    if norm <= bound:
        assert all(torch.equal(clipped[k], upd[k]) for k in upd)
    else:
        flat_a = torch.cat([upd["a"], upd["b"]]).double()
        flat_b = torch.cat([clipped["a"], clipped["b"]]).double()
        cos = (flat_a @ flat_b) / (flat_a.norm() * flat_b.norm())
        assert cos > 1 - 1e-5


def test_clipping_off_is_identity():
    upd = _update([3.0, 4.0, 0.0, 12.0])
    clipped, norm = clip_update(upd, 0.0)
    assert norm == 13.0 and clipped is upd


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.lists(finite, min_size=4, max_size=4), min_size=1, max_size=12),
    st.integers(1, 5),
    st.floats(0.1, 10.0),
)
def test_sum_is_the_same_however_users_are_split_among_workers(users, workers, bound):
    whole = UpdateSum()
    for i, u in enumerate(users):
        d, n = clip_update(_update(u), bound)
        whole.add_user(d, 1.0 + i % 3, loss=float(i), norm=n, clipped=n > bound)
    merged = UpdateSum()
    for share in split_among(np.arange(len(users)), workers):
        part = UpdateSum()
        for i in share:
            d, n = clip_update(_update(users[i]), bound)
            part.add_user(d, 1.0 + i % 3, loss=float(i), norm=n, clipped=n > bound)
        merged.merge(part)
    assert merged.num_users == whole.num_users and merged.weight == whole.weight
    assert merged.num_clipped == whole.num_clipped
    for k in whole.delta:
        torch.testing.assert_close(merged.delta[k], whole.delta[k], rtol=1e-5, atol=1e-4)


def test_sgd_server_with_lr_one_is_fedavg():
    init = {"w": torch.zeros(3)}
    total = UpdateSum()
    total.add_user({"w": torch.tensor([1.0, 2.0, 3.0])}, 1.0, 0.0, 0.0, False)
    total.add_user({"w": torch.tensor([3.0, 0.0, 1.0])}, 3.0, 0.0, 0.0, False)
    new = ServerOptimizer(init, "sgd", 1.0).step(mean_update(total))
    torch.testing.assert_close(new["w"], torch.tensor([2.5, 0.5, 1.5]))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 300), st.integers(1, 400), st.integers(0, 5), st.integers(1, 50))
def test_cohort_draw_is_seeded_and_within_population(n, size, seed, rnd):
    pop = np.arange(1000, 1000 + n)
    a = sample_cohort(pop, size, seed, rnd)
    assert np.array_equal(a, sample_cohort(pop, size, seed, rnd))
    assert len(a) == min(n, size) and len(set(a.tolist())) == len(a)
    assert set(a.tolist()) <= set(pop.tolist())
