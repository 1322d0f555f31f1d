"""Populations drawn from a teacher (`dataset=teacher`, fedrec.model.teacher) and generated
public users shared across population sizes (`public-users`).

A small "real" file (synthetic users written as seq-txt) trains a small teacher once per
session; the sampler is then checked against the teacher's own softmax and the real
length distribution, and a teacher population against the real data's split and base.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from fedrec.config import ConfigError, FedRecConfig
from fedrec.data.synthetic import generate_synthetic
from fedrec.model.base import base_path
from fedrec.model.teacher import draw_population, load_teacher, next_item_probs

SMALL = ("min-user-interactions=3 public-fraction=0.2 max-seq-len=10 hidden-size=16 num-blocks=1 num-heads=1 "
         "dropout=0.1 batch-size=64 eval-users=60 centralized-patience=2 pretrain-learning-rate=0.01")  # fmt: skip


@pytest.fixture(scope="session")
def real_file(tmp_path_factory) -> Path:
    data = generate_synthetic(num_users=400, num_items=40, num_clusters=4, mean_length=8, seed=3)
    path = tmp_path_factory.mktemp("teacher") / "real.txt"
    path.write_text("".join(f"u{i} " + " ".join(f"i{x}" for x in s) + "\n" for i, s in enumerate(data.sequences)))
    return path


@pytest.fixture(scope="session")
def teacher_file(real_file: Path, tmp_path_factory) -> tuple[Path, FedRecConfig]:
    from fedrec.config import parse_run_config
    from fedrec.teacher import train_teacher

    cache = tmp_path_factory.mktemp("cache")
    cfg = FedRecConfig.from_mapping(parse_run_config(f"dataset=seq-txt data-path={real_file} cache-dir={cache} {SMALL}"))
    out = real_file.parent / "teacher.pt"
    train_teacher(cfg, out, epochs=3, log=lambda _m: None)
    return out, cfg


def _draws(teacher, n: int, temperature: float, seed: int = 0):
    return draw_population(teacher, n, temperature, seed, log=lambda _m: None)


def _chi2_p(counts: np.ndarray, probs: np.ndarray) -> float:
    """Goodness of fit, cells with under 5 expected draws pooled into one."""
    expected = probs * counts.sum()
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    return float(stats.chisquare(obs[keep], exp[keep] * obs[keep].sum() / exp[keep].sum()).pvalue)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_next_items_follow_the_teachers_softmax_on_fixed_prefixes(teacher_file, temperature):
    teacher = load_teacher(teacher_file[0])
    n_items = teacher.num_items
    first = np.zeros(n_items)
    first[4] = 1.0  # every user starts from item 5
    fixed = dataclasses.replace(teacher, first_items=first, length_values=np.array([3]), length_probs=np.array([1.0]))
    seqs = np.stack(list(_draws(fixed, 6000, temperature)))
    assert (seqs[:, 0] == 5).all()
    # the second item after the prefix (5)
    p2 = next_item_probs(fixed, torch.tensor([[5]]), temperature)[0].numpy()
    assert p2[4] == 0.0  # no repeats: the real data have none
    counts2 = np.bincount(seqs[:, 1] - 1, minlength=n_items)
    assert counts2[4] == 0
    assert _chi2_p(counts2, p2) > 1e-3
    # the third item after the most frequent prefix (5, s)
    s = int(np.argmax(counts2)) + 1
    rows = seqs[seqs[:, 1] == s]
    p3 = next_item_probs(fixed, torch.tensor([[5, s]]), temperature)[0].numpy()
    counts3 = np.bincount(rows[:, 2] - 1, minlength=n_items)
    assert counts3[[4, s - 1]].sum() == 0
    assert _chi2_p(counts3, p3) > 1e-3
    # and the frequencies differ from a uniform draw (the test can tell one from the other)
    assert _chi2_p(counts2, np.where(np.arange(n_items) == 4, 0.0, 1.0 / (n_items - 1))) < 1e-6


def test_a_lower_temperature_draws_more_regular_users(teacher_file):
    teacher = load_teacher(teacher_file[0])
    p_hot = next_item_probs(teacher, torch.tensor([[5, 9]]), 2.0)[0]
    p_cold = next_item_probs(teacher, torch.tensor([[5, 9]]), 0.5)[0]

    def entropy(p):
        return float(-(p[p > 0] * p[p > 0].log()).sum())

    assert entropy(p_cold) < entropy(p_hot)


def test_lengths_and_first_items_follow_the_real_data(teacher_file, real_file):
    teacher = load_teacher(teacher_file[0])
    drawn = _draws(teacher, 5000, 1.0, seed=1)
    lengths = drawn.lengths
    index = {v: i for i, v in enumerate(teacher.length_values.tolist())}
    counts = np.bincount([index[int(x)] for x in lengths], minlength=len(index))
    assert _chi2_p(counts, teacher.length_probs) > 1e-3
    firsts = np.bincount(drawn.flat[drawn.starts] - 1, minlength=teacher.num_items)
    assert _chi2_p(firsts, teacher.first_items) > 1e-3
    for s in drawn:  # no user repeats an item
        assert len(np.unique(s)) == len(s)
    # the real distribution is the private users' (lengths as in the file)
    real = [len(line.split()) - 1 for line in real_file.read_text().splitlines()]
    assert set(teacher.length_values.tolist()) <= set(real)


def test_a_draw_is_deterministic_in_its_seed(teacher_file):
    teacher = load_teacher(teacher_file[0])
    a, b, c = _draws(teacher, 300, 1.0, 7), _draws(teacher, 300, 1.0, 7), _draws(teacher, 300, 1.0, 8)
    assert np.array_equal(a.ends, b.ends) and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_a_teacher_population_keeps_the_real_public_users_and_base(teacher_file, real_file):
    from fedrec.workload import _CACHE, _split

    path, real_cfg = teacher_file
    cfg = real_cfg.replace(dataset="teacher", teacher_path=str(path), teacher_users=700, teacher_temperature=0.8)
    _CACHE.clear()
    interactions, data = _split(cfg, lambda _m: None)
    _real_inter, real = _split(real_cfg, lambda _m: None)
    assert len(data.private) == 700 and len(data.public) == len(real.public)
    for mine, theirs in zip(data.public_sequences(), real.public_sequences()):
        assert np.array_equal(mine, theirs)
    assert data.item_ids == real.item_ids
    assert [interactions.user_ids[i] for i in range(2)] == [real.user_ids[int(u)] for u in real.public[:2]]
    assert interactions.user_ids[len(real.public)] == "drawn-0"
    assert base_path(cfg) == base_path(real_cfg)  # one base, the real data's
    assert base_path(cfg.replace(teacher_users=900)) == base_path(cfg)
    _CACHE.clear()
    again, _ = _split(cfg, lambda _m: None)  # the cached draw, memory-mapped
    assert isinstance(again.sequences.flat, np.memmap)
    assert all(np.array_equal(a, b) for a, b in zip(again.sequences, interactions.sequences))
    # a larger population grows the pool by whole blocks: the smaller one is its prefix
    _CACHE.clear()
    larger, _ = _split(cfg.replace(teacher_users=2500), lambda _m: None)
    assert larger.num_users == len(real.public) + 2500
    assert all(np.array_equal(a, b) for a, b in zip(interactions.sequences, larger.sequences))
    folders = list(Path(cfg.cache_dir).glob("teacher-*"))  # one pool, grown: not a second draw
    assert len(folders) == 1 and max(int(p.name.split("-")[1]) for p in folders[0].glob("pool-*")) >= 2500
    assert len(list(folders[0].glob("pool-*"))) == 1  # the pools it grew from are gone
    assert all(np.array_equal(a, b) for a, b in zip(interactions.sequences, larger.sequences))  # still mapped, still whole


def test_a_teacher_refuses_another_data_file(teacher_file, tmp_path):
    from fedrec.data.interactions import DataError
    from fedrec.workload import _CACHE, _split

    path, real_cfg = teacher_file
    other = tmp_path / "other.txt"
    other.write_text("a 1 2 3 4\nb 2 3 4 5\nc 1 3 5 2\n")
    cfg = real_cfg.replace(dataset="teacher", teacher_path=str(path), data_path=str(other), cache_dir=str(tmp_path))
    _CACHE.clear()
    with pytest.raises(DataError, match="not the file the teacher"):
        _split(cfg, lambda _m: None)


def test_a_teacher_config_passes_the_checks_before_start(teacher_file, monkeypatch):
    """`python -m fedrec.simulate` parses a run's data before Ray starts: for a teacher
    population that is the real file its teacher was trained on. The teacher's path is
    written one way (absolute) whatever the working directory."""
    from fedrec.simulate import check_data

    path, real_cfg = teacher_file
    monkeypatch.chdir(path.parent)
    cfg = real_cfg.replace(dataset="teacher", teacher_path=path.name, teacher_users=700)
    assert cfg.teacher_path == str(path.resolve())
    check_data(cfg)  # raised "dataset=teacher reads no file of its own here" before
    with pytest.raises(ConfigError, match="private user"):
        check_data(cfg.replace(public_fraction=0.999))
    with pytest.raises(ConfigError, match="teacher-users: 1 drawn user"):  # the drawn users are the private ones
        check_data(cfg.replace(teacher_users=1))


def test_teacher_and_public_users_keys_are_checked():
    with pytest.raises(ConfigError, match="teacher-path"):
        FedRecConfig(dataset="teacher", data_path="x.txt")
    with pytest.raises(ConfigError, match="public-users"):
        FedRecConfig(dataset="seq-txt", data_path="x.txt", public_users=10)
    with pytest.raises(ConfigError, match="public-users"):
        FedRecConfig(synthetic_users=100, public_users=100)
    with pytest.raises(ConfigError, match="teacher-path"):
        FedRecConfig(teacher_path="t.pt")


def test_generated_public_users_and_base_are_the_same_for_every_size(tmp_path):
    from fedrec.workload import _CACHE, _split

    small = FedRecConfig(synthetic_users=300, public_users=50, cache_dir=str(tmp_path), data_seed=4, seed=1)
    large = small.replace(synthetic_users=900, seed=2)
    _CACHE.clear()
    _i, a = _split(small, lambda _m: None)
    _i, b = _split(large, lambda _m: None)
    assert len(a.public) == len(b.public) == 50 and len(b.private) == 850
    for x, y in zip(a.public_sequences(), b.public_sequences()):
        assert np.array_equal(x, y)
    assert base_path(small) == base_path(large)
    assert base_path(small) != base_path(small.replace(data_seed=5))
    # without data-seed, the seed is the data's
    assert base_path(small.replace(data_seed=-1, seed=4)) == base_path(small)


def test_the_samplers_fast_forward_equals_the_models(teacher_file):
    from fedrec.model.teacher import last_hidden

    teacher = load_teacher(teacher_file[0])
    gen = torch.Generator().manual_seed(0)
    for n in (1, 4, 10):
        seqs = torch.randint(1, teacher.num_items + 1, (64, n), generator=gen)
        with torch.no_grad():
            assert torch.allclose(last_hidden(teacher.model, seqs), teacher.model(seqs)[:, -1], atol=1e-5)
