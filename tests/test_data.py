import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedrec.config import FedRecConfig
from fedrec.data import DataError, load_interactions, split_users
from fedrec.data.interactions import Interactions
from fedrec.data.load import load_csv, load_movielens, load_seq_txt
from fedrec.data.split import leave_one_out
from fedrec.data.synthetic import generate_synthetic
from tests.conftest import shared_file


def test_synthetic_is_deterministic_and_seeded():
    a = generate_synthetic(50, 40, 4, 10, seed=1)
    b = generate_synthetic(50, 40, 4, 10, seed=1)
    c = generate_synthetic(50, 40, 4, 10, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a.sequences, b.sequences))
    assert not all(np.array_equal(x, y) for x, y in zip(a.sequences, c.sequences))


def test_synthetic_has_long_tail_and_sequential_signal():
    d = generate_synthetic(800, 300, 6, 20, seed=0)
    counts = np.sort(np.bincount(np.concatenate(d.sequences), minlength=301)[1:])[::-1]
    assert counts[:30].sum() > 0.3 * counts.sum()  # top 10% of items hold > 30% of interactions
    assert all(len(set(s.tolist())) == len(s) for s in d.sequences)  # no repeats within a user
    # The previous item predicts the next: the most frequent successor of an item is far
    # likelier than that item's base popularity would give.
    pairs = np.concatenate([np.stack([s[:-1], s[1:]], 1) for s in d.sequences])
    top_follow = []
    for item in np.unique(pairs[:, 0]):
        nxt = pairs[pairs[:, 0] == item, 1]
        if len(nxt) >= 20:
            top_follow.append(np.bincount(nxt).max() / len(nxt))
    assert np.mean(top_follow) > 5 * counts[0] / counts.sum()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.integers(1, 50), min_size=3, max_size=30), min_size=1, max_size=20))
def test_leave_one_out_partitions_every_sequence(seqs):
    arrays = [np.array(s) for s in seqs]
    train, valid, test = leave_one_out(arrays)
    for s, tr, v, te in zip(arrays, train, valid, test):
        assert np.array_equal(np.append(tr, [v, te]), s)
        assert te == s[-1] and v == s[-2]


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 200), st.floats(0.01, 0.99), st.integers(0, 10))
def test_public_private_split_is_a_seeded_partition(n, frac, seed):
    data = Interactions([np.array([1, 2, 3])] * n, [str(i) for i in range(n)], 3, "t")
    s1, s2 = split_users(data, frac, seed), split_users(data, frac, seed)
    assert np.array_equal(s1.public, s2.public)
    assert len(s1.public) >= 1 and len(s1.private) >= 1
    assert sorted(np.concatenate([s1.public, s1.private]).tolist()) == list(range(n))


def test_movielens_100k_and_1m_formats(tmp_path):
    (tmp_path / "u.data").write_text("1\t10\t5\t300\n1\t11\t3\t100\n1\t12\t4\t200\n2\t10\t1\t5\n")
    d = load_movielens(tmp_path, min_user_interactions=3)
    assert d.user_ids == ["1"] and d.dropped_users == 1
    assert d.sequences[0].tolist() == [2, 3, 1]  # chronological: items 11, 12, 10
    ml1m = tmp_path / "ml1m"
    ml1m.mkdir()
    (ml1m / "ratings.dat").write_text("7::3::5::30\n7::1::5::10\n7::2::5::20\n")
    assert load_movielens(ml1m).sequences[0].tolist() == [1, 2, 3]


@pytest.mark.parametrize(
    "name, text, loader, where",
    [
        ("u.data", "1\t10\t5\t300\n1\t11\t3\n", load_movielens, ":2:"),
        ("u.data", "1\t10\t5\tnoon\n", load_movielens, ":1:"),
        ("x.txt", "u1 1 2 3\nu2\n", load_seq_txt, ":2:"),
        ("x.txt", "u1 1 2 3\nu1 4 5 6\n", load_seq_txt, ":2:"),
        ("x.csv", "user,item\n1,2\n", load_csv, ":1:"),
        ("x.csv", "user,item,timestamp\n1,2,3\n1,2\n", load_csv, ":3:"),
    ],
)
def test_malformed_input_names_file_and_line(tmp_path, name, text, loader, where):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError) as err:
        loader(path)
    assert f"{path}{where}" in str(err.value)


def test_csv_sorts_by_time_and_remaps_items(tmp_path):
    path = tmp_path / "i.csv"
    path.write_text("timestamp,user,item\n2024-01-03,a,z\n2024-01-01,a,x\n2024-01-02,a,y\n")
    d = load_csv(path)
    assert d.num_items == 3 and d.sequences[0].tolist() == [1, 2, 3]


def test_timestamp_rules():
    from datetime import datetime, timezone

    from fedrec.data.parse import parse_timestamp

    utc = timezone.utc
    assert parse_timestamp("2024-01-03T10:00:00+02:00") == ("ISO-8601", datetime(2024, 1, 3, 8, tzinfo=utc))
    assert parse_timestamp(" 2024-01-03 08:00 ") == ("ISO-8601", datetime(2024, 1, 3, 8, tzinfo=utc))  # naive: UTC
    assert parse_timestamp("2024-02") == ("ISO-8601", datetime(2024, 2, 1, tzinfo=utc))
    assert parse_timestamp("1700000000000000001") == ("number", 1_700_000_000_000_000_001)  # ns: exact
    assert parse_timestamp(" 2.5 ") == parse_timestamp(2.5) == ("number", 2.5)
    for bad in ("yesterday", "01/03/2024", "inf", "nan", True, None, b"1"):
        with pytest.raises(DataError, match="timestamp"):
            parse_timestamp(bad)


def test_movielens_and_csv_share_the_timestamp_rules(tmp_path):
    (tmp_path / "u.data").write_text("1\t10\t5\t2024-01-03T00:00:00Z\n1\t11\t3\t2024-01-01\n1\t12\t4\t2024-01-02\n")
    assert load_movielens(tmp_path).sequences[0].tolist() == [2, 3, 1]


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_seq_txt(tmp_path / "nope.txt")


def test_real_movielens_100k():
    path = shared_file("ml-100k", "u.data")
    cfg = FedRecConfig(dataset="movielens", data_path=str(path.parent))
    d = load_interactions(cfg)
    assert (d.num_users, d.num_items, d.num_interactions) == (943, 1682, 100_000)


def test_real_beauty_seq_txt():
    path = shared_file("amazon-s3rec", "Beauty.txt")
    d = load_interactions(FedRecConfig(dataset="seq-txt", data_path=str(path)))
    assert (d.num_users, d.num_items, d.num_interactions) == (22_363, 12_101, 198_502)
    split = split_users(d, 0.2, 0)
    assert len(split.private) == 22_363 - round(0.2 * 22_363)


def test_cli_reports_malformed_data_in_one_line(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "bad.txt"
    bad.write_text("u1 1 2 3\nu2\n")
    proc = subprocess.run(
        [sys.executable, "-m", "fedrec.simulate", "--run-config", f"dataset=seq-txt data-path={bad}",
         "--output-dir", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"fedrec: data error: {bad}:2: expected 'user item item ...', got 'u2'"]


def test_synthetic_data_read_back_from_the_cache_equals_a_fresh_generation(tmp_path):
    from fedrec.config import FedRecConfig
    from fedrec.data import load_interactions
    from fedrec.workload import _load_or_generate

    cfg = FedRecConfig(synthetic_users=80, synthetic_items=50, cache_dir=str(tmp_path))
    fresh = load_interactions(cfg)
    _load_or_generate(cfg)  # writes the cache
    assert len(list(tmp_path.glob("synthetic-*/items.npy"))) == 1
    cached = _load_or_generate(cfg)
    assert cached.describe() == fresh.describe() and cached.user_ids == fresh.user_ids
    assert all(np.array_equal(a, b) for a, b in zip(cached.sequences, fresh.sequences, strict=True))
    other = _load_or_generate(cfg.replace(seed=1))  # another seed is another dataset, not a stale hit
    assert not all(np.array_equal(a, b) for a, b in zip(other.sequences, fresh.sequences))


def test_the_cached_base_is_keyed_by_file_content_not_path_or_mtime(tmp_path):
    import os
    import shutil

    from fedrec.model.base import base_path

    def key(path, dataset="seq-txt"):
        return base_path(FedRecConfig(dataset=dataset, data_path=str(path), cache_dir=str(tmp_path / "cache")))

    data = tmp_path / "a" / "beauty.txt"
    data.parent.mkdir()
    data.write_text("1 1 2 3\n2 2 3 4\n")
    copy = tmp_path / "b.txt"
    shutil.copy(data, copy)
    os.utime(copy, (1, 1))  # a re-sync or a touch: another path and another mtime, same bytes
    assert key(copy) == key(data)
    copy.write_text("1 1 2 3\n2 2 3 5\n")  # same size, changed content
    assert key(copy) != key(data)
    assert key(data, "csv") != key(data)  # read another way: another base

    folder = tmp_path / "ml"  # a MovieLens folder is keyed by the ratings file it reads
    folder.mkdir()
    (folder / "u.data").write_text("1\t1\t5\t10\n")
    before = key(folder, "movielens")
    (folder / "u.data").write_text("1\t2\t5\t10\n")
    assert key(folder, "movielens") != before
    (folder / "u.item").write_text("unrelated\n")
    assert key(folder, "movielens") == key(folder / "u.data", "movielens")


def test_the_vectorized_generator_draws_the_per_user_process_of_the_reference():
    """Same config, other draws: the two must agree on every statistic of the process
    (lengths, cluster stays, successor following, item popularity) to sampling error."""
    from fedrec.data.synthetic import synthetic_item_clusters
    from tests.synthetic_reference import reference_sequences

    n, items, clusters = 3000, 300, 6
    new = list(generate_synthetic(n, items, clusters, 20, seed=3).sequences)
    ref = reference_sequences(n, items, clusters, 20, seed=3)
    cluster_of = synthetic_item_clusters(items, clusters, 3)

    def stats(seqs):
        lengths = np.array([len(s) for s in seqs])
        stay = np.mean([np.mean(cluster_of[s[1:] - 1] == cluster_of[s[:-1] - 1]) for s in seqs])
        counts = np.bincount(np.concatenate(seqs), minlength=items + 1)[1:]
        pairs = np.concatenate([s[:-1] * (items + 1) + s[1:] for s in seqs])
        top_pairs = np.sort(np.bincount(pairs))[::-1][:200].sum() / len(pairs)  # successor following
        return lengths, stay, counts / counts.sum(), top_pairs

    (len_a, stay_a, pop_a, pairs_a), (len_b, stay_b, pop_b, pairs_b) = stats(new), stats(ref)
    assert all(len(set(s.tolist())) == len(s) for s in new)  # no repeats within a user
    assert abs(len_a.mean() - len_b.mean()) < 0.3 and abs(len_a.std() - len_b.std()) < 0.3
    assert abs(stay_a - stay_b) < 0.01
    assert abs(pairs_a - pairs_b) < 0.01
    assert np.corrcoef(pop_a, pop_b)[0, 1] > 0.95  # the same items popular (the same catalogue draws)
    assert np.abs(pop_a - pop_b).sum() < 0.1


def test_ragged_sequences_split_like_lists():
    from fedrec.data.ragged import IndexIds, Ragged

    seqs = [np.array([3, 1, 2, 5]), np.array([4, 4, 1]), np.array([7, 8, 9, 1, 2, 3])]
    ragged = Ragged.from_list(seqs)
    assert len(ragged) == 3 and all(np.array_equal(a, b) for a, b in zip(ragged, seqs, strict=True))
    (t1, v1, e1), (t2, v2, e2) = leave_one_out(ragged), leave_one_out(seqs)
    assert all(np.array_equal(a, b) for a, b in zip(t1, t2, strict=True))
    assert np.array_equal(v1, v2) and np.array_equal(e1, e2)
    assert t1[2].base is not None  # a view into the flat array, not a copy
    with pytest.raises(ValueError, match="at least 3"):
        leave_one_out(Ragged.from_list([np.array([1, 2])]))
    ids = IndexIds(3)
    assert list(ids) == ["0", "1", "2"] and ids[-1] == "2" and ids == ["0", "1", "2"]
    with pytest.raises(IndexError):
        ids[3]


def test_pretrain_users_caps_pretraining_on_a_seeded_sample_with_its_own_base(tmp_path):
    from fedrec.model.base import base_path
    from fedrec.train.pretrain import pretraining_users

    public = np.arange(0, 1000, 3)
    sample = pretraining_users(public, 50, seed=4)
    assert len(sample) == 50 and set(sample) <= set(public.tolist()) and sample == sorted(sample)
    assert sample == pretraining_users(public, 50, seed=4) != pretraining_users(public, 50, seed=5)
    assert pretraining_users(public, 0, seed=4) == pretraining_users(public, 10_000, seed=4) == public.tolist()
    cfg = FedRecConfig(cache_dir=str(tmp_path))
    assert base_path(cfg) != base_path(cfg.replace(pretrain_users=50))  # another base, not a stale cache hit
    assert "-g2-" in base_path(cfg).name  # keyed by the generator's version too
