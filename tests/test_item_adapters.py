"""Item-side adapters (real peft model, real autograd): neutral at init, reach lookups and
tied scores, clipped jointly with LoRA, the same in both engines, built from public inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedrec.data.interactions import DataError
from fedrec.data.item_features import load_item_features, load_item_features_json, public_top_items
from fedrec.model.base import load_base
from fedrec.model.lora import adapter_parameters, adapter_state, load_adapter_state
from fedrec.privacy.clipping import update_norm
from fedrec.train.batches import pad_left
from fedrec.train.loop import train_users
from fedrec.train.vectorized import train_users_vectorized
from fedrec.workload import ItemSide, item_side, prepare_workload

from tests.conftest import shared_file
from tests.engine_args import engine_args

CPU = torch.device("cpu")
KINDS = ("lowrank", "rows", "table", "features", "subspace", "affine", "affine-groups")


def _setup(tiny_cfg, kind, **over):
    if kind == "affine-groups":  # scale and bias shared by public popularity buckets and attributes
        kind, over = "affine", {"affine_groups": "popularity+features"} | over
    cfg = tiny_cfg.replace(**{"item_adapter": kind, "item_rows": 20, "dropout": 0.0, "max_seq_len": 12} | over)
    work = prepare_workload(cfg)
    return cfg, work, work.model()


def _kw(cfg, **over):
    kw = dict(local_epochs=2, learning_rate=0.5, clipping_norm=0.7, user_weighting="uniform",
              max_seq_len=cfg.max_seq_len, seed=cfg.seed, round_=3, device=CPU)  # fmt: skip
    return kw | over


def _buckets(data) -> int:
    """Public popularity buckets (never, 1, 2-3, 4-7, ...) up to the most seen item's."""
    seen = np.bincount(np.concatenate(data.public_sequences()), minlength=data.num_items + 1)[1:].max()
    return int(np.floor(np.log2(seen + 1))) + 1


def _item_keys(state):
    return [k for k in state if "item_delta." in k]


@pytest.mark.parametrize("kind", KINDS)
def test_item_adapter_is_neutral_at_init_and_counted_in_d(tiny_cfg, kind):
    cfg, work, model = _setup(tiny_cfg, kind)
    base = load_base(cfg, work.data.num_items, work.base_path).eval()
    model.eval()
    x = pad_left([work.data.train[int(u)] for u in work.data.private[:8]], cfg.max_seq_len)
    torch.testing.assert_close(model.item_scores(model(x)[:, -1]), base.item_scores(base(x)[:, -1]), rtol=0, atol=0)
    d, n = cfg.hidden_size, work.data.num_items
    expected = {"lowrank": n * cfg.item_rank + cfg.item_rank * d, "rows": 20 * d, "table": n * d,
                "features": 4 * d, "subspace": cfg.item_rank * d, "affine": 2 * n,
                "affine-groups": 2 * (_buckets(work.data) + 4)}[kind]  # fmt: skip
    # (tiny_cfg: 4 synthetic clusters = 4 attributes)
    trained = adapter_parameters(model)
    assert sum(trained[k].numel() for k in _item_keys(trained)) == expected
    assert set(_item_keys(adapter_state(model))) == set(_item_keys(trained))  # they travel


@pytest.mark.parametrize("kind", KINDS)
def test_item_delta_reaches_the_input_lookup_and_the_tied_scores(tiny_cfg, kind):
    """(`affine` changes the scores alone, by design.)"""
    cfg, work, model = _setup(tiny_cfg, kind)
    model.eval()
    sasrec = model.get_base_model()
    item = int(work.item_side.rows[0]) if kind == "rows" else 3
    x = pad_left([np.array([5, item, 7])], cfg.max_seq_len)
    before_hidden = model(x)[:, -1].detach()
    h = torch.randn(4, cfg.hidden_size)
    before_scores = model.item_scores(h).detach()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in sasrec.item_delta.parameters():
            p.add_(torch.randn(p.shape, generator=g))
    delta = sasrec.item_delta.delta()
    if kind.startswith("affine"):  # scores only: the lookups keep the base's rows
        assert delta is None and torch.equal(model(x)[:, -1], before_hidden)
    else:
        delta = delta.detach()
        assert float(delta[0].abs().sum()) == 0.0 and float(delta[item].abs().sum()) > 0  # padding stays zero
        assert not torch.allclose(model(x)[:, -1], before_hidden)  # the lookup of `item` moved
    moved = (model.item_scores(h) - before_scores).abs().sum(0).detach()
    assert float(moved[item - 1]) > 0  # the tied output score of `item` moved


@pytest.mark.parametrize("kind", KINDS)
def test_both_engines_agree_and_clip_lora_and_item_tensors_jointly(tiny_cfg, kind):
    cfg, work, model = _setup(tiny_cfg, kind)
    g = torch.Generator().manual_seed(0)
    trained = adapter_parameters(model)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=g) if k in trained else v for k, v in adapter_state(model).items()}
    users = [int(u) for u in work.data.private[:24]]
    loop = train_users(model, state, work.data, users, *engine_args(**_kw(cfg)))
    vec = train_users_vectorized(model, state, work.data, users, *engine_args(vector_tokens=40, **_kw(cfg)))  # several groups
    assert loop.delta.keys() == vec.delta.keys() and _item_keys(vec.delta)
    for k in loop.delta:
        torch.testing.assert_close(vec.delta[k], loop.delta[k], rtol=1e-4, atol=1e-6, msg=k)
    assert (loop.num_users, loop.num_clipped) == (vec.num_users, vec.num_clipped)
    assert loop.loss_sum == pytest.approx(vec.loss_sum, rel=1e-5)
    assert loop.norm_sum == pytest.approx(vec.norm_sum, rel=1e-5)
    # One user: the bound holds over LoRA and item tensors together, and both parts are in it.
    for engine in (train_users, train_users_vectorized):
        one = engine(model, state, work.data, users[:1], *engine_args(**_kw(cfg, clipping_norm=0.05)))
        lora_part = {k: v for k, v in one.delta.items() if k not in _item_keys(one.delta)}
        item_part = {k: one.delta[k] for k in _item_keys(one.delta)}
        assert update_norm(one.delta) <= 0.05 and update_norm(lora_part) > 0 and update_norm(item_part) > 0


def test_vectorized_item_groups_stay_within_their_memory_budget(tiny_cfg, monkeypatch):
    """`table` holds a whole N×d table per user: groups are cut by users, results unchanged."""
    import fedrec.train.groups as groups

    cfg, work, model = _setup(tiny_cfg, "table")
    state = adapter_state(model)
    users = [int(u) for u in work.data.private[:12]]
    whole = train_users_vectorized(model, state, work.data, users, *engine_args(**_kw(cfg)))
    per_user = 4 * 4 * work.data.num_items * cfg.hidden_size
    monkeypatch.setattr(groups, "ITEM_GROUP_BYTES", 3 * per_user)  # three users per group
    cut = train_users_vectorized(model, state, work.data, users, *engine_args(**_kw(cfg)))
    for k in whole.delta:
        torch.testing.assert_close(cut.delta[k], whole.delta[k], rtol=1e-5, atol=1e-7)


def test_the_row_set_depends_on_public_users_only(tiny_cfg):
    cfg, work, _model = _setup(tiny_cfg, "rows")
    rows = item_side(cfg, work.data).rows
    data = work.data
    assert len(rows) == 20 and len(set(rows.tolist())) == 20
    changed = [s.copy() for s in data.train]
    rng = np.random.default_rng(5)
    for u in data.private:  # every private user's training data replaced
        changed[int(u)] = rng.integers(1, data.num_items + 1, len(changed[int(u)]))
    public = [np.append(changed[int(u)], [data.valid[int(u)], data.test[int(u)]]) for u in data.public]
    assert np.array_equal(public_top_items(public, data.num_items, 20), public_top_items(
        [data.full_sequence(int(u)) for u in data.public], data.num_items, 20))  # fmt: skip
    # and the choice is the most frequent public items: a public-only count decides it
    counts = np.bincount(np.concatenate([data.full_sequence(int(u)) for u in data.public]), minlength=data.num_items + 1)
    assert counts[rows].min() >= np.delete(counts[1:], rows - 1).max()


def test_a_features_adapter_moves_an_untrained_item_that_shares_an_attribute(tiny_cfg):
    cfg, work, model = _setup(tiny_cfg, "features")
    data, feats = work.data, work.item_side.features
    attr_of = {i + 1: int(feats.indices[feats.indptr[i]]) for i in range(data.num_items)}
    users = [int(u) for u in data.private[:6]]
    touched = set(np.concatenate([data.train[u] for u in users]).tolist())
    untouched = [i for i in range(1, data.num_items + 1) if i not in touched and attr_of[i] in {attr_of[t] for t in touched}]
    assert untouched  # an item nobody here trained on, sharing a cluster with one they did
    state = adapter_state(model)
    total = train_users_vectorized(model, state, data, users, *engine_args(**_kw(cfg, clipping_norm=0.0)))
    h = torch.randn(3, cfg.hidden_size)
    model.eval()
    before = model.item_scores(h).detach()
    load_adapter_state(model, {k: v + total.delta.get(k, 0) for k, v in state.items()})
    after = model.item_scores(h).detach()
    assert float((after - before)[:, untouched[0] - 1].abs().sum()) > 0


def test_item_features_errors_name_the_file_and_line(tmp_path):
    ids = ["1", "2", "3"]
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{\n  "1": [1, 2],\n  "2": [3,\n}\n')
    with pytest.raises(DataError, match=r"bad\.json:4: not valid JSON"):
        load_item_features_json(bad_json, ids)
    unknown = tmp_path / "unknown.json"
    unknown.write_text('{\n  "1": [1],\n  "99": [2]\n}\n')
    with pytest.raises(DataError, match=r"unknown\.json:3: item '99' is not in"):
        load_item_features_json(unknown, ids)
    not_list = tmp_path / "notlist.json"
    not_list.write_text('{"1": [1],\n"2": 5}')
    with pytest.raises(DataError, match=r"notlist\.json:2: item '2': expected a list"):
        load_item_features_json(not_list, ids)
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"1": [10, 20], "3": ["x"]}))
    f = load_item_features(good, ids)
    assert f.num_attrs == 3 and np.diff(f.indptr).tolist() == [2, 0, 1]  # item 2 has none
    assert ItemSide.from_record(ItemSide(rows=np.array([2, 3]), features=f).to_record()).features.indices.tolist() == f.indices.tolist()
    uitem = tmp_path / "u.item"
    uitem.write_text("1|Toy Story (1995)|01-Jan-1995||url|0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0\n2|bad|line\n")
    with pytest.raises(DataError, match=r"u\.item:2: expected id\|title"):
        load_item_features(uitem, ids)


def test_movielens_genres_and_beauty_attributes_load_from_shared_data():
    from fedrec.data.item_features import load_movielens_genres

    f = load_movielens_genres(shared_file("ml-100k", "u.item"), [str(i) for i in range(1, 1683)])
    assert f.num_items == 1682 and f.num_attrs == 19 and np.diff(f.indptr).min() >= 1
    beauty = load_item_features_json(shared_file("amazon-s3rec", "Beauty_item2attributes.json"),
                                     [str(i) for i in range(1, 12102)])  # fmt: skip
    assert beauty.num_attrs == 637 and abs(np.diff(beauty.indptr).mean() - 3.72) < 0.01


def test_lora_train_none_trains_and_sends_only_the_item_adapter(tiny_cfg):
    from fedrec.aggregate import ServerOptimizer, mean_update

    cfg, work, model = _setup(tiny_cfg, "features", lora_train="none")
    init = adapter_state(model)
    assert set(adapter_parameters(model)) == set(_item_keys(init))  # d counts the item adapter only
    users = [int(u) for u in work.data.private[:10]]
    loop = train_users(model, init, work.data, users, *engine_args(**_kw(cfg)))
    vec = train_users_vectorized(model, init, work.data, users, *engine_args(**_kw(cfg)))
    assert set(vec.delta) == set(loop.delta) == set(_item_keys(init))
    for k in vec.delta:
        torch.testing.assert_close(vec.delta[k], loop.delta[k], rtol=1e-4, atol=1e-6)
    new = ServerOptimizer(init, "adam", 0.01).step(mean_update(vec))
    assert all(torch.equal(new[k], init[k]) for k in init if k not in vec.delta)  # LoRA stays a no-op (B = 0)


@pytest.mark.parametrize("lora_train,clip", [("both", 0.7), ("none", 0.05), ("none", 0.0)])
def test_one_step_table_without_per_user_tables_equals_the_loop(tiny_cfg, lora_train, clip):
    """local-epochs=1: every user scores against the one global table; only ‖G_u‖ and Σ c_u G_u are formed."""
    cfg, work, model = _setup(tiny_cfg, "table", lora_train=lora_train)
    g = torch.Generator().manual_seed(0)
    trained = adapter_parameters(model)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=g) if k in trained else v for k, v in adapter_state(model).items()}
    users = [int(u) for u in work.data.private[:24]]
    kw = _kw(cfg, local_epochs=1, clipping_norm=clip)
    loop = train_users(model, state, work.data, users, *engine_args(**kw))
    vec = train_users_vectorized(model, state, work.data, users, *engine_args(vector_tokens=40, chunk=7, **kw))  # chunks cut users
    for k in loop.delta:
        torch.testing.assert_close(vec.delta[k], loop.delta[k], rtol=1e-4, atol=1e-6, msg=k)
    assert (loop.num_clipped, loop.weight) == (vec.num_clipped, vec.weight)
    assert vec.norm_sum == pytest.approx(loop.norm_sum, rel=1e-5) and vec.loss_sum == pytest.approx(loop.loss_sum, rel=1e-5)
    if clip == 0.05:
        assert vec.num_clipped == len(users)


def test_one_step_table_with_dropout_does_not_depend_on_grouping(tiny_cfg):
    cfg, work, model = _setup(tiny_cfg, "table", dropout=0.3)
    state = adapter_state(model)
    users = [int(u) for u in work.data.private[:20]]
    kw = _kw(cfg, local_epochs=1, clipping_norm=0.1)
    small = train_users_vectorized(model, state, work.data, users, *engine_args(vector_tokens=30, **kw))
    whole = train_users_vectorized(model, state, work.data, users, *engine_args(vector_tokens=10_000, **kw))
    for k in whole.delta:
        torch.testing.assert_close(small.delta[k], whole.delta[k], rtol=1e-5, atol=1e-7)
    assert small.loss_sum == pytest.approx(whole.loss_sum, rel=1e-6)


def test_the_cli_stops_on_a_bad_features_file_with_its_line(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "features.json"
    bad.write_text('{\n  "1": [1],\n  "9999": [2]\n}\n')
    tiny = ("synthetic-users=60 synthetic-items=30 synthetic-clusters=3 hidden-size=16 num-blocks=1 max-seq-len=10 "
            f"pretrain-epochs=1 cache-dir={tmp_path / 'cache'}")  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "fedrec.simulate", "--output-dir", str(tmp_path / "o"), "--run-config",
                           f"{tiny} item-adapter=features item-features={bad}"], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"fedrec: data error: {bad}:3: item '9999' is not in the interaction data's catalogue"


def test_one_step_table_keeps_each_users_own_b_like_the_loop(tiny_cfg, tmp_path):
    """lora-share=a-only: the one-step table path must not stand in the global B for a user's own."""
    from fedrec.local_state import UserStateStore

    cfg, work, model = _setup(tiny_cfg, "table", lora_share="a-only")
    state = adapter_state(model)
    users = [int(u) for u in work.data.private[:12]]
    stores = {name: UserStateStore(tmp_path / name) for name in ("loop", "vec")}
    for rnd in (1, 2):  # the second round starts from the B each user kept
        kw = _kw(cfg, local_epochs=1, round_=rnd)
        loop = train_users(model, state, work.data, users, *engine_args(local_store=stores["loop"], **kw))
        vec = train_users_vectorized(model, state, work.data, users, *engine_args(local_store=stores["vec"], **kw))
        assert set(vec.delta) == set(loop.delta) and not any(".lora_B." in k for k in vec.delta)
        for k in loop.delta:
            torch.testing.assert_close(vec.delta[k], loop.delta[k], rtol=1e-4, atol=1e-6, msg=k)
    for u in users:
        own_loop, own_vec = stores["loop"].load(u), stores["vec"].load(u)
        assert own_loop and own_vec is not None
        for k in own_loop:
            torch.testing.assert_close(own_vec[k], own_loop[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("local_epochs", [1, 2])  # 1: the shared-table path; 2: the per-user path
def test_cold_items_stay_out_of_the_training_softmax_in_every_engine(tiny_cfg, local_epochs):
    """Cold items arrive after training: no engine may push their rows as negatives, so
    their rows of a table update are exactly zero, while with the mask off they are not."""
    cfg, work, model = _setup(tiny_cfg, "table", cold_items=0.1)
    cold = torch.as_tensor(work.data.cold)
    assert len(cold) and bool(model.get_base_model().absent[cold - 1].all())
    users = [int(u) for u in work.data.private[:12]]
    state = adapter_state(model)
    kw = _kw(cfg, local_epochs=local_epochs, clipping_norm=0.0)
    key = next(k for k in state if k.startswith("base_model.model.item_delta"))
    for engine in (train_users, train_users_vectorized):
        rows = engine(model, state, work.data, users, *engine_args(**kw)).delta[key][cold - 1]
        assert torch.count_nonzero(rows) == 0, engine.__name__
    model.get_base_model().set_absent([])
    rows = train_users_vectorized(model, state, work.data, users, *engine_args(**kw)).delta[key][cold - 1]
    assert torch.count_nonzero(rows) > 0


def test_local_dropout_zero_trains_the_base_as_it_scores(tiny_cfg):
    """local-dropout=0: a base pretrained with dropout trains without it (both engines alike)."""
    cfg, work, model = _setup(tiny_cfg, "affine", dropout=0.3, local_dropout=0.0)
    sasrec = model.get_base_model()
    assert sasrec.emb_drop.p == 0.0 and all(b.drop.p == 0.0 and b.attn.dropout == 0.0 for b in sasrec.blocks)
    users = [int(u) for u in work.data.private[:10]]
    state = adapter_state(model)
    loop = train_users(model, state, work.data, users, *engine_args(**_kw(cfg)))
    vec = train_users_vectorized(model, state, work.data, users, *engine_args(**_kw(cfg)))
    for k in loop.delta:
        torch.testing.assert_close(vec.delta[k], loop.delta[k], rtol=1e-4, atol=1e-6, msg=k)
