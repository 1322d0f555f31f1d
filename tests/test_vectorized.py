"""The vectorized engine against the one-user-at-a-time loop (real peft model, real autograd)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fedrec.local_state import UserStateStore
from fedrec.model.lora import adapter_parameters, adapter_state
from fedrec.privacy.clipping import update_norm
from fedrec.train.batches import next_item_batch
from fedrec.train.dropout import DropoutMasks
from fedrec.train.groups import length_groups
from fedrec.train.loop import train_users
from fedrec.train.scoring import ScoringCrossEntropy
from fedrec.train.stacked import FrozenBase
from fedrec.train.vectorized import train_users_vectorized
from fedrec.workload import prepare_workload

from tests.engine_args import engine_args

CPU = torch.device("cpu")
# experiments/gpu_check.sh runs these comparisons on a GPU (FEDREC_TEST_DEVICE=cuda).
DEVICE = torch.device(os.environ.get("FEDREC_TEST_DEVICE", "cpu"))


def _kwargs(cfg, **over):
    kw = dict(
        local_epochs=2, learning_rate=0.5, clipping_norm=0.05, user_weighting="uniform",
        max_seq_len=cfg.max_seq_len, seed=cfg.seed, round_=3, device=DEVICE,
    )  # fmt: skip
    return kw | over


def _workload(tiny_cfg, **over):
    cfg = tiny_cfg.replace(**over)
    work = prepare_workload(cfg)
    return cfg, work, work.model(DEVICE)


def _perturbed_state(model, seed=0):
    """A non-trivial global adapter (B != 0), so every tensor's gradient is exercised.

    Frozen factors (A under lora-train=b-only) keep their seeded value, as in a real run.
    """
    g = torch.Generator().manual_seed(seed)
    trained = adapter_parameters(model)
    state = {k: v.cpu() for k, v in adapter_state(model).items()}
    return {k: (v + 0.05 * torch.randn(v.shape, generator=g) if k in trained else v).to(DEVICE) for k, v in state.items()}


def _mixed_users(data, k=24):
    """Private users with the shortest, longest and in-between training sequences."""
    private = [int(u) for u in data.private]
    by_len = sorted(private, key=lambda u: len(data.train[u]))
    return list(dict.fromkeys(by_len[:4] + by_len[-4:] + private[: k - 8]))


def _assert_same(a, b, rtol=1e-4, atol=1e-6):
    assert a.delta.keys() == b.delta.keys()
    for k in a.delta:
        torch.testing.assert_close(a.delta[k], b.delta[k], rtol=rtol, atol=atol, msg=k)
    assert (a.num_users, a.weight, a.num_clipped) == (b.num_users, b.weight, b.num_clipped)
    assert a.loss_sum == pytest.approx(b.loss_sum, rel=1e-5)
    assert a.norm_sum == pytest.approx(b.norm_sum, rel=1e-5)


@pytest.mark.parametrize("lora_train,weighting", [("both", "uniform"), ("b-only", "examples")])
def test_vectorized_equals_the_per_user_loop(tiny_cfg, lora_train, weighting):
    cfg, work, model = _workload(tiny_cfg, dropout=0.0, lora_train=lora_train, max_seq_len=12)
    state = _perturbed_state(model)
    users = _mixed_users(work.data)
    assert max(len(work.data.train[u]) for u in users) > cfg.max_seq_len + 1  # truncation exercised
    kw = _kwargs(cfg, user_weighting=weighting, clipping_norm=0.7)
    loop = train_users(model, state, work.data, users, *engine_args(**kw))
    vec = train_users_vectorized(model, state, work.data, users, *engine_args(vector_tokens=40, **kw))  # several groups
    _assert_same(loop, vec)
    assert 0 < vec.num_clipped < vec.num_users  # both branches of the per-user clip taken
    if lora_train == "b-only":
        assert not any(".lora_A." in k for k in vec.delta)


def test_vectorized_keeps_each_users_own_b_like_the_loop(tiny_cfg, tmp_path):
    cfg, work, model = _workload(tiny_cfg, dropout=0.0, lora_share="a-only")
    state = _perturbed_state(model)
    users = [int(u) for u in work.data.private[:10]]
    stores = {name: UserStateStore(tmp_path / name) for name in ("loop", "vec")}
    for rnd in (1, 2):  # the second round starts from the B each user kept
        kw = _kwargs(cfg, round_=rnd)
        loop = train_users(model, state, work.data, users, *engine_args(local_store=stores["loop"], **kw))
        vec = train_users_vectorized(model, state, work.data, users, *engine_args(local_store=stores["vec"], **kw))
        _assert_same(loop, vec)
        assert vec.delta and all(".lora_A." in k for k in vec.delta)
    for u in users:
        own_loop, own_vec = stores["loop"].load(u), stores["vec"].load(u)
        for k in own_loop:
            torch.testing.assert_close(own_vec[k], own_loop[k], rtol=1e-4, atol=1e-6)


def test_dropout_is_per_user_so_grouping_does_not_matter(tiny_cfg):
    cfg, work, model = _workload(tiny_cfg, dropout=0.3)
    state = _perturbed_state(model)
    users = _mixed_users(work.data, 16)
    kw = _kwargs(cfg)
    together = train_users_vectorized(model, state, work.data, users, *engine_args(**kw))
    alone = train_users_vectorized(model, state, work.data, users, *engine_args(vector_tokens=1, **kw))  # one user per group
    _assert_same(together, alone, rtol=1e-5, atol=1e-7)
    plain = train_users_vectorized(prepare_workload(cfg.replace(dropout=0.0)).model(DEVICE), state, work.data, users,
                                   *engine_args(**kw))  # fmt: skip
    diff = max(float((together.delta[k] - plain.delta[k]).abs().max()) for k in plain.delta)
    assert diff > 1e-4  # dropout is really applied
    other_round = train_users_vectorized(model, state, work.data, users, *engine_args(**(kw | {"round_": 4})))
    assert any(not torch.equal(other_round.delta[k], together.delta[k]) for k in together.delta)


def test_the_dropout_path_with_nothing_dropped_equals_the_plain_forward(tiny_cfg):
    """The hand-written attention (used whenever dropout is on) against SDPA, masks all ones."""
    cfg, work, model = _workload(tiny_cfg, dropout=0.0)
    base = FrozenBase(model)
    users = _mixed_users(work.data)
    inputs, _targets = next_item_batch([work.data.train[u] for u in users], cfg.max_seq_len)
    stack = {k: v.expand(len(users), *v.shape).clone() for k, v in _perturbed_state(model).items()}
    real = (inputs > 0).sum(dim=1).numpy()
    keep_all = DropoutMasks(real, inputs.shape[1], cfg.hidden_size, base.heads, len(base.blocks), 0.0,
                             list(range(len(users))), CPU)  # fmt: skip
    torch.testing.assert_close(base.hidden(inputs, stack, keep_all), base.hidden(inputs, stack), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("item_adapter", ["none", "lowrank"])
def test_the_engines_forward_equals_the_models_forward(tiny_cfg, item_adapter):
    """`FrozenBase.hidden` is SASRec's forward written again for stacked per-user adapters;
    with every user on the same adapter it must give the peft model's own hidden states."""
    from fedrec.model.lora import load_adapter_state

    cfg, work, model = _workload(tiny_cfg, dropout=0.0, item_adapter=item_adapter)
    state = _perturbed_state(model)
    load_adapter_state(model, state)
    model.eval()
    users = _mixed_users(work.data)
    inputs, _targets = next_item_batch([work.data.train[u] for u in users], cfg.max_seq_len)
    stack = {k: v.expand(len(users), *v.shape).clone() for k, v in state.items()}
    with torch.no_grad():
        ours, theirs = FrozenBase(model).hidden(inputs, stack), model(inputs)
    real = inputs > 0  # padded positions differ harmlessly: neither engine scores them
    torch.testing.assert_close(ours[real], theirs[real], rtol=1e-5, atol=1e-5)


def test_dropout_masks_drop_at_the_configured_rate_and_keep_the_mean():
    lengths = np.array([50, 7, 0, 33])
    drop = DropoutMasks(lengths, 50, 16, 2, 2, 0.3, [1, 2, 3, 4], CPU)
    masks = drop.draw()
    assert drop.scale == pytest.approx(1 / 0.7, rel=1e-4)  # the rate is rounded to a multiple of 1/65536
    assert len(masks) == 1 + 4 * 2
    values = torch.unique(torch.cat([m.flatten() for m in masks])).tolist()
    assert values == [0.0, pytest.approx(drop.scale)]
    real = torch.cat([m[0, -50:].flatten() for m in masks])  # the longest user's own positions
    assert float((real == 0).float().mean()) == pytest.approx(0.3, abs=0.01)
    assert float(real.mean()) == pytest.approx(1.0, abs=0.02)
    assert torch.allclose(masks[0][2], torch.tensor(drop.scale))  # a user with no positions: padding only, never dropped
    assert not torch.equal(drop.draw()[0], masks[0])  # each step draws afresh


# (heads, d): 7·7·d and 2·heads·7² bits, in whole 64-bit words or not
@pytest.mark.parametrize(("heads", "d"), [(2, 8), (3, 8), (2, 6)])
def test_a_users_dropout_bits_do_not_depend_on_the_groups_width(heads, d):
    """A user as wide as the group draws straight into their own slabs, a shorter one
    through scratch into padded slices: the same bits either way."""
    full = DropoutMasks(np.array([7]), 7, d, heads, 2, 0.3, [42], CPU).draw()
    padded = DropoutMasks(np.array([7, 10]), 10, d, heads, 2, 0.3, [42, 43], CPU).draw()
    for a, b in zip(full, padded):
        assert torch.equal(a[0], b[0][..., -7:, -7:] if a.dim() == 4 else b[0][-7:])


@settings(max_examples=15, deadline=None)
@given(bound=st.floats(1e-4, 1.0), lr=st.floats(0.01, 2.0), pick=st.integers(0, 50))
def test_one_users_contribution_never_exceeds_the_bound(vec_workload, bound, lr, pick):
    cfg, work, model, state = vec_workload
    user = int(work.data.private[pick % len(work.data.private)])
    kw = _kwargs(cfg, clipping_norm=bound, learning_rate=lr)
    total = train_users_vectorized(model, state, work.data, [user], *engine_args(**kw))
    assert update_norm(total.delta) <= bound


@pytest.fixture(scope="module")
def vec_workload(shared_cache):
    from fedrec.config import FedRecConfig

    cfg = FedRecConfig(
        synthetic_users=120, synthetic_items=60, synthetic_clusters=4, synthetic_mean_length=12, public_fraction=0.25,
        hidden_size=16, num_heads=2, num_blocks=1, max_seq_len=20, pretrain_epochs=5, cache_dir=str(shared_cache),
    )  # fmt: skip
    work = prepare_workload(cfg)
    model = work.model(DEVICE)
    return cfg, work, model, _perturbed_state(model)


def test_fused_cross_entropy_matches_autograd():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(300, 16, generator=g, dtype=torch.float64, requires_grad=True)
    table = torch.randn(57, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 57, (300,), generator=g)
    w = torch.rand(300, generator=g, dtype=torch.float64)
    loss, ce = ScoringCrossEntropy.apply(h, table, y, w, 64, torch.float64, None, None, None, None)
    (grad,) = torch.autograd.grad(3.0 * loss, h)
    ref_ce = F.cross_entropy(h @ table.T, y, reduction="none")
    (ref_grad,) = torch.autograd.grad(3.0 * (ref_ce * w).sum(), h)
    torch.testing.assert_close(ce, ref_ce.detach())
    torch.testing.assert_close(grad, ref_grad)


def test_fused_cross_entropy_reports_the_loss_when_the_targets_probability_underflows():
    """p_y below float32's range: the loss comes from the logits themselves, finite and exact."""
    table = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    h = torch.tensor([[60.0, 0.0], [0.0, 2.0], [-80.0, 1.0]], requires_grad=True)
    y = torch.tensor([1, 2, 0])  # row 0: logit gap 120, row 2: 160 (exp underflows); row 1 ordinary
    w = torch.ones(3)
    loss, ce = ScoringCrossEntropy.apply(h, table, y, w, 2, torch.float32, None, None, None, None)
    ref = F.cross_entropy(h.detach().double() @ table.double().T, y, reduction="none")
    assert torch.isfinite(ce).all() and float(ce[0]) > 100
    torch.testing.assert_close(ce.double(), ref, rtol=1e-5, atol=1e-4)
    (grad,) = torch.autograd.grad(loss, h)
    (ref_grad,) = torch.autograd.grad(F.cross_entropy(h @ table.T, y, reduction="sum"), h)
    torch.testing.assert_close(grad, ref_grad)


def test_length_groups_cover_every_user_once_within_the_token_budget():
    lengths = np.random.default_rng(0).integers(0, 80, 500)
    groups = length_groups(lengths, max_len=50, tokens=600)
    assert sorted(np.concatenate(groups).tolist()) == list(range(500))
    for g in groups:
        width = max(1, int(np.minimum(lengths[g], 50).max()))
        assert len(g) == 1 or len(g) * width <= 600


def test_bfloat16_scoring_stays_close_to_float32(tiny_cfg):
    cfg, work, model = _workload(tiny_cfg, dropout=0.0)
    state = _perturbed_state(model)
    users = _mixed_users(work.data)
    kw = _kwargs(cfg, clipping_norm=0.0)
    full = train_users_vectorized(model, state, work.data, users, *engine_args(**kw))
    half = train_users_vectorized(model, state, work.data, users, *engine_args(scoring_dtype=torch.bfloat16, **kw))
    flat = lambda t: torch.cat([v.flatten() for v in t.delta.values()])  # noqa: E731
    rel = float((flat(full) - flat(half)).norm() / flat(full).norm())
    assert 0 < rel < 0.03  # really computed in bfloat16, and within its ~3 significant digits
    assert half.loss_sum == pytest.approx(full.loss_sum, rel=1e-2)
