import pytest
import torch
from flwr.app import ArrayRecord

from fedrec.aggregate import UpdateSum
from fedrec.model.base import load_base
from fedrec.model.lora import adapter_bytes, adapter_parameters, adapter_state, load_adapter_state
from fedrec.train.evaluate import evaluate_users
from fedrec.train.batches import pad_left
from fedrec.train.loop import train_users
from fedrec.train.settings import LocalTraining, RoundContext
from fedrec.workload import prepare_workload

CPU = torch.device("cpu")


def _train(model, state, data, users, cfg, clip=0.0):
    local = LocalTraining(local_epochs=2, learning_rate=0.5, max_seq_len=cfg.max_seq_len, seed=cfg.seed)
    return train_users(model, state, data, users, local, RoundContext(round=1, clipping_norm=clip, device=CPU))


def test_untrained_adapter_is_the_base_model(tiny_cfg):
    work = prepare_workload(tiny_cfg)
    base = load_base(tiny_cfg, work.data.num_items, work.base_path).eval()
    model = work.model().eval()
    x = pad_left([work.data.train[int(u)] for u in work.data.private[:8]], tiny_cfg.max_seq_len)
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_adapter_round_trips_through_a_flower_arrayrecord(tiny_cfg):
    work = prepare_workload(tiny_cfg)
    model = work.model()
    users = [int(u) for u in work.data.private[:5]]
    total = _train(model, adapter_state(model), work.data, users, tiny_cfg)
    trained = {k: v + total.delta[k] / total.weight for k, v in adapter_state(model).items()}
    received = ArrayRecord(trained).to_torch_state_dict()
    other = work.model()
    load_adapter_state(other, received)
    for k, v in adapter_state(other).items():
        assert torch.equal(v, trained[k]), k
    assert adapter_bytes(received) == 4 * sum(t.numel() for t in trained.values())


def test_training_moves_only_the_adapter_and_is_placement_independent(tiny_cfg):
    work = prepare_workload(tiny_cfg)
    model = work.model()
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    init = adapter_state(model)
    users = [int(u) for u in work.data.private[:6]]
    together = _train(model, init, work.data, users, tiny_cfg, clip=0.05)
    one_by_one = UpdateSum()
    for u in reversed(users):  # another order, another "node" per user
        one_by_one.merge(_train(work.model(), init, work.data, [u], tiny_cfg, clip=0.05))
    for k in together.delta:
        torch.testing.assert_close(together.delta[k], one_by_one.delta[k], rtol=1e-5, atol=1e-7)
    assert together.num_clipped == one_by_one.num_clipped > 0
    assert any(v.abs().sum() > 0 for v in together.delta.values())
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, base_before[n]), n
    assert set(adapter_parameters(model)) == set(init)


def test_evaluation_counts_every_user_once(tiny_cfg):
    work = prepare_workload(tiny_cfg)
    users = [int(u) for u in work.data.private]
    sums = evaluate_users(work.model(), work.data, users, "test", max_seq_len=tiny_cfg.max_seq_len, device=CPU, batch_size=7)
    assert sums["count"] == len(users)
    assert 0 <= sums["ndcg@10"] <= sums["hr@10"] <= sums["hr@20"] <= len(users)


def test_item_table_delta_starts_neutral_reaches_tied_scores_and_round_trips(tiny_cfg):
    cfg = tiny_cfg.replace(item_adapter="lowrank", item_rank=4)
    work = prepare_workload(cfg)
    base = load_base(cfg, work.data.num_items, work.base_path).eval()
    model = work.model().eval()
    x = pad_left([work.data.train[int(u)] for u in work.data.private[:8]], cfg.max_seq_len)
    torch.testing.assert_close(model.item_scores(model(x)[:, -1]), base.item_scores(base(x)[:, -1]), rtol=0, atol=0)
    state = adapter_state(model)
    item_keys = [k for k in state if "item_delta" in k]
    assert len(item_keys) == 2 and set(adapter_parameters(model)) == set(state)
    users = [int(u) for u in work.data.private[:4]]
    total = _train(model, state, work.data, users, cfg)
    assert all(total.delta[k].abs().sum() > 0 for k in item_keys)  # the delta is trained
    moved = {k: v + total.delta[k] for k, v in state.items()}
    other = work.model().eval()
    load_adapter_state(other, ArrayRecord(moved).to_torch_state_dict())
    model.eval()
    load_adapter_state(model, moved)
    scores = other.item_scores(other(x)[:, -1])
    torch.testing.assert_close(scores, model.item_scores(model(x)[:, -1]))
    assert not torch.allclose(scores, base.item_scores(base(x)[:, -1]))  # the change reaches the scores


def test_b_only_trains_and_sends_only_b_and_leaves_a_bit_identical(tiny_cfg):
    from fedrec.aggregate import ServerOptimizer, mean_update

    cfg = tiny_cfg.replace(lora_train="b-only", item_adapter="lowrank", item_rank=2)
    work = prepare_workload(cfg)
    model = work.model()
    init = adapter_state(model)
    trained = set(adapter_parameters(model))
    assert trained and all(".lora_B." in k or k.endswith("item_delta.A") for k in trained)
    total = _train(model, init, work.data, [int(u) for u in work.data.private[:5]], cfg)
    assert set(total.delta) == trained
    new = ServerOptimizer(init, "adam", 0.01).step(mean_update(total))
    for k in init:
        if k in trained:
            assert not torch.equal(new[k], init[k]), k
        else:
            assert torch.equal(new[k], init[k]), k  # A (and the item delta's B) bit-identical


def test_a_only_keeps_each_users_b_local_and_shares_only_a(tiny_cfg, tmp_path):
    from fedrec.local_state import UserStateStore

    cfg = tiny_cfg.replace(lora_share="a-only")
    work = prepare_workload(cfg)
    model = work.model()
    init = adapter_state(model)
    store = UserStateStore(tmp_path / "state")
    users = [int(u) for u in work.data.private[:3]]
    local = LocalTraining(local_epochs=2, learning_rate=0.5, max_seq_len=cfg.max_seq_len, seed=0)
    rounds = {r: RoundContext(round=r, clipping_norm=0.0, device=CPU, local_store=store) for r in (1, 2)}
    first = train_users(model, init, work.data, users, local, rounds[1])
    assert first.delta and all(".lora_A." in k for k in first.delta)  # B never travels
    own_b = {u: store.load(u) for u in users}
    assert all(b and all(".lora_B." in k and v.abs().sum() > 0 for k, v in b.items()) for b in own_b.values())
    # Round 2 starts each user from their own B: their B keeps moving from where it was.
    train_users(model, init, work.data, users[:1], local, rounds[2])
    again = store.load(users[0])
    assert any(not torch.equal(again[k], own_b[users[0]][k]) for k in again)
    assert all(torch.equal(store.load(u)[k], own_b[u][k]) for u in users[1:] for k in own_b[u])
    # Evaluation uses each user's own B, and leaves the model's global B as it was.
    load_adapter_state(model, init)
    plain = evaluate_users(model, work.data, users, "test", max_seq_len=cfg.max_seq_len, device=CPU)
    personal = evaluate_users(model, work.data, users, "test", max_seq_len=cfg.max_seq_len, device=CPU, local_store=store)
    assert personal["count"] == plain["count"] == len(users)
    assert all(torch.equal(v, init[k]) for k, v in adapter_state(model).items())
    # The batched evaluation (each user's B stacked) equals loading each user's B in turn.
    one_by_one: dict[str, float] = {}
    for u in users:
        load_adapter_state(model, init | store.load(u))
        got = evaluate_users(model, work.data, [u], "test", max_seq_len=cfg.max_seq_len, device=CPU)
        one_by_one = {k: one_by_one.get(k, 0.0) + v for k, v in got.items()}
    load_adapter_state(model, init)
    assert one_by_one.keys() == personal.keys()
    assert all(personal[k] == pytest.approx(one_by_one[k], abs=1e-6) for k in personal)
    ranks_differ = any(abs(personal[k] - plain[k]) > 0 for k in plain if k != "count")
    scores = {}
    for u in users:  # at least the scores move, whether or not a rank crosses a cut-off
        load_adapter_state(model, init | store.load(u))
        model.eval()
        x = pad_left([work.data.history(u, "test")], cfg.max_seq_len)
        scores[u] = model.item_scores(model(x)[:, -1])
    load_adapter_state(model, init)
    base_scores = model.item_scores(model(pad_left([work.data.history(users[0], "test")], cfg.max_seq_len))[:, -1])
    assert ranks_differ or not torch.allclose(scores[users[0]], base_scores)


def test_early_stopping_keeps_and_returns_the_best_validation_epoch(tiny_cfg):
    from dataclasses import replace

    from fedrec.model.base import new_model
    from fedrec.train.pretrain import Fitting, fit_sequences

    work = prepare_workload(tiny_cfg)
    torch.manual_seed(0)
    model = new_model(tiny_cfg, work.data.num_items)
    scores = iter([0.0, 0.10, 0.30, 0.20, 0.25, 0.05, 0.99])  # epoch 0 first; best at epoch 2; patience 2 stops after 4
    snapshots, seen = {}, []

    def on_epoch(epoch, loss, score):
        snapshots[epoch] = {k: v.clone() for k, v in model.state_dict().items()}
        seen.append((epoch, score))

    seqs = [work.data.train[int(u)] for u in work.data.private]
    fit = Fitting(epochs=6, lr=1e-2, batch_size=16, max_seq_len=tiny_cfg.max_seq_len, seed=0, device=CPU, patience=2)
    best = fit_sequences(model, seqs, list(model.parameters()), fit, validate=lambda: next(scores), on_epoch=on_epoch)
    assert best == 2 and [e for e, _ in seen] == [1, 2, 3, 4] and seen[1][1] == 0.30
    assert all(torch.equal(v, snapshots[2][k]) for k, v in model.state_dict().items())
    assert not all(torch.equal(v, snapshots[4][k]) for k, v in model.state_dict().items())
    # A run that never beats its starting point returns it: epoch 0, the weights it started from.
    start = {k: v.clone() for k, v in model.state_dict().items()}
    scores = iter([0.5, 0.4, 0.3])
    fit = replace(fit, epochs=5)
    assert fit_sequences(model, seqs, list(model.parameters()), fit, validate=lambda: next(scores)) == 0
    assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())
    # min_epochs: patience may not stop it before then; the best epoch is still the one kept.
    scores, seen = iter([0.0, 0.2, 0.1, 0.1, 0.3, 0.1, 0.1, 0.1, 0.1]), []
    fit = replace(fit, epochs=8, min_epochs=5)
    assert fit_sequences(model, seqs, list(model.parameters()), fit, validate=lambda: next(scores), on_epoch=on_epoch) == 4
    assert [e for e, _ in seen] == [1, 2, 3, 4, 5, 6]  # without min_epochs: stopped after epoch 3
