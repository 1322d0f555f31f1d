"""What every participant of a run needs in memory: the split data and the base model.

Loaded once per process and memoized, so a worker that trains many messages reads the
data and the base weights once, not per message.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel

from fedrec.config import FedRecConfig
from fedrec.data import SplitData, load_interactions, split_users
from fedrec.data.interactions import DataError, Interactions
from fedrec.data.ragged import IndexIds, LeadingIds, Ragged
from fedrec.train.pretrain import ensure_base
from fedrec.model.base import BASE_KEYS, base_path, cache_dir, load_base
from fedrec.data.item_features import (
    ItemFeatures, cluster_features, load_item_features, load_movielens_genres, movielens_item_file, public_top_items,
)  # fmt: skip
from fedrec.data.item_text import catalogue_texts, movielens_texts, read_item_text, synthetic_texts
from fedrec.data.synthetic import synthetic_item_clusters
from fedrec.model.item_adapters import make_item_adapter
from fedrec.model.lora import adapter_bytes, adapter_parameters, adapter_state, attach_lora, freeze_lora, freeze_random_factors
from fedrec.model.types import ITEM_DELTA, AdapterState, is_local

DATA_KEYS = ("dataset", "data-path", "data-seed", "min-user-interactions", "public-fraction", "cold-items",
             "public-users", "teacher-path", "teacher-users", "teacher-temperature") + tuple(
    k for k in BASE_KEYS if k.startswith("synthetic-")
)  # fmt: skip
# What a teacher population's draw depends on besides the teacher file's content.
# Not teacher-users: every population size is a prefix of one pool (_teacher_population).
TEACHER_KEYS = ("data-seed", "min-user-interactions", "public-fraction", "teacher-temperature")
# What build_model's adapter depends on (besides the base): a model cached by a worker is
# reused only for configs that agree on these.
ITEM_KEYS = ("item-adapter", "item-rank", "item-rows", "item-features", "item-encoder", "item-text", "item-basis",
             "affine-groups")
ADAPTER_KEYS = ("seed", "lora-rank", "lora-alpha", "lora-targets", "lora-train", "local-dropout", *ITEM_KEYS)
_CACHE: dict[str, tuple[Interactions, SplitData]] = {}


@dataclass(frozen=True)
class ItemSide:
    """The public inputs an item-side adapter is built from: the row set (`rows`) or the
    item features (`features`). The same on the server, every worker and every device."""

    rows: np.ndarray | None = None
    features: ItemFeatures | None = None
    text: torch.Tensor | None = None  # (items × 384) frozen text embeddings (item-encoder)
    # (items × r) subspace's fixed A, or (items × K) affine's groups (fedrec.data.item_basis)
    basis: torch.Tensor | None = None

    def to_record(self) -> dict:
        """Plain lists, for a ConfigRecord (what a real device receives in `setup`)."""
        if self.text is not None:
            raise ValueError("item-encoder=text|id+text does not reach real devices yet (the embeddings are not shipped)")
        out: dict = {}
        if self.rows is not None:
            out["rows"] = [int(r) for r in self.rows]
        if self.basis is not None:
            out |= {"basis": [float(x) for x in self.basis.flatten()], "basis-rank": int(self.basis.shape[1])}
        if self.features is not None:
            f = self.features
            out |= {"feature-indptr": [int(i) for i in f.indptr], "feature-indices": [int(i) for i in f.indices],
                    "feature-count": f.num_attrs, "feature-source": f.source}  # fmt: skip
        return out

    @classmethod
    def from_record(cls, rec: dict) -> ItemSide:
        rows = np.asarray(rec["rows"], dtype=np.int64) if "rows" in rec else None
        features = None
        if "feature-indptr" in rec:
            features = ItemFeatures(np.asarray(rec["feature-indptr"], dtype=np.int64),
                                    np.asarray(rec["feature-indices"], dtype=np.int64),
                                    int(rec["feature-count"]), str(rec["feature-source"]))  # fmt: skip
        basis = None
        if "basis" in rec:
            basis = torch.tensor(rec["basis"], dtype=torch.float32).view(-1, int(rec["basis-rank"]))
        return cls(rows, features, basis=basis)


def describe_item_adapter(cfg: FedRecConfig, side: ItemSide, numel: int) -> str:
    """A phrase for the run's adapter line, e.g. ' + item rows (K=1,000 from public data): 64,000'."""
    what = {
        "none": "",
        "lowrank": f"low-rank item delta (r={cfg.item_rank})",
        "rows": f"item rows (K={0 if side.rows is None else len(side.rows):,}, most frequent among public users)",
        "table": "dense item-table delta",
        "features": "item features" + (f" ({side.features.describe()})" if side.features is not None else ""),
        "text": f"text projection delta (all-MiniLM-L6-v2 embeddings, item-encoder={cfg.item_encoder})",
        "affine": "score scale and bias " + ("per item" if cfg.affine_groups == "items" else
                                             f"per public group ({cfg.affine_groups}, {0 if side.basis is None else side.basis.shape[1]:,} groups)"),
        "subspace": f"item delta A·B in a public {cfg.item_basis} basis (r={cfg.item_rank}, A fixed)",
    }[cfg.item_kind]
    if what and cfg.item_kind != "text" and cfg.item_encoder == "id+text":
        what += " on the id+text table (projection frozen)"
    return f" + {what}: {numel:,}" if what else ""


@dataclass
class AdapterInfo:
    initial: AdapterState  # every adapter tensor at init (B = 0): the global adapter of round 0
    dimension: int  # parameters each user trains and sends: the d of the DP noise
    parameters: int  # all adapter parameters, frozen factors included
    sent: list[str] = field(default_factory=list)  # the tensors a user sends (`update_keys`)


def describe_adapter(cfg: FedRecConfig, model: PeftModel, side: ItemSide, log: Callable[[str], None] = print) -> AdapterInfo:
    """The adapter a run federates, said in one line (plus what its item adapter reveals)."""
    initial = adapter_state(model)
    info = AdapterInfo(initial, sum(p.numel() for p in adapter_parameters(model).values()),
                       sum(t.numel() for t in initial.values()), update_keys(cfg, model))  # fmt: skip
    item = describe_item_adapter(cfg, side, sum(v.numel() for k, v in initial.items() if ITEM_DELTA in k))
    log(
        f"adapter: LoRA r={cfg.lora_rank} on {cfg.lora_targets}{item}: {info.parameters:,} parameters, "
        f"{adapter_bytes(initial):,} bytes; {info.dimension:,} trained and sent per user ({cfg.lora_train})"
    )
    if cfg.item_kind != "none" and not cfg.dp_enabled:
        log(
            f"note: item-adapter={cfg.item_kind} sends an image of the item table's gradient, which shows which "
            "items a user touched; without DP noise only the sum protects it (cohort placement sums inside the "
            "worker; device placement needs secure-aggregation=secagg+)"
        )
    if cfg.secure_aggregation == "secagg+":
        log(
            f"privacy: SecAgg+ ({cfg.secagg_shares} shares, threshold {cfg.secagg_threshold}): the server learns only "
            "the sum of the cohort's clipped updates, never one user's; per-user loss and norm stay on the devices"
        )
    if cfg.partition == "silo":
        log(
            f"privacy: partition=silo, {cfg.num_silos} silos, sample-level DP-SGD (Opacus, PRV) with "
            f"z={cfg.dpsgd_noise_multiplier}, C={cfg.dpsgd_max_grad_norm}: protects each example (a user's "
            "sequence) within a silo, not users across silos"
        )
    return info


def update_keys(cfg: FedRecConfig, model: PeftModel) -> list[str]:
    """The tensors a user sends: the trained ones, less what stays on the device (a-only's B)."""
    return [k for k in adapter_parameters(model) if not (cfg.lora_share == "a-only" and is_local(k))]


_ITEM_SIDE: dict[str, ItemSide] = {}


def item_side(cfg: FedRecConfig, data: SplitData) -> ItemSide:
    """The row set or item features the config's item adapter needs, and the items' text
    embeddings under item-encoder=text|id+text (memoized per process).

    Rows are the `item-rows` items most frequent among the public users; features come
    from `item-features`, or the dataset's own item file (MovieLens genres, the synthetic
    clusters).
    """
    grouped = cfg.item_adapter == "affine" and cfg.affine_groups != "items"
    if cfg.item_adapter not in ("rows", "features", "subspace") and not grouped and cfg.item_encoder == "id":
        return ItemSide()
    key = cfg.fingerprint(*DATA_KEYS, *ITEM_KEYS)
    if key not in _ITEM_SIDE:
        text = item_text_embeddings(cfg, data) if cfg.item_encoder != "id" else None
        rows = features = basis = None
        if cfg.item_adapter == "subspace":
            basis = _item_basis(cfg, data, text)
        elif grouped:
            basis = _affine_groups(cfg, data)
        if cfg.item_adapter == "rows":
            public = [data.full_sequence(int(u)) for u in data.public]
            rows = public_top_items(public, data.num_items, cfg.item_rows)
        elif cfg.item_adapter == "features":
            features = _item_features(cfg, data)
        _ITEM_SIDE[key] = ItemSide(rows, features, text, basis)
    return _ITEM_SIDE[key]


def _item_basis(cfg: FedRecConfig, data: SplitData, text: torch.Tensor | None) -> torch.Tensor:
    """item-adapter=subspace's A: public users' co-occurrence, or the items' text embeddings."""
    from fedrec.data.item_basis import cooccurrence_basis, text_basis

    if cfg.item_basis == "text":
        return text_basis(text if text is not None else item_text_embeddings(cfg, data), cfg.item_rank)
    return cooccurrence_basis(data.public_sequences(), data.num_items, cfg.item_rank)


def _affine_groups(cfg: FedRecConfig, data: SplitData) -> torch.Tensor:
    """item-adapter=affine's public groups: public popularity buckets and/or item attributes."""
    from fedrec.data.item_basis import feature_groups, popularity_groups

    parts = []
    if "popularity" in cfg.affine_groups:
        parts.append(popularity_groups(data.public_sequences(), data.num_items))
    if "features" in cfg.affine_groups:
        f = _item_features(cfg, data)
        parts.append(feature_groups(f.indptr, f.indices, f.num_attrs))
    return torch.as_tensor(np.concatenate(parts, axis=1))


def _item_features(cfg: FedRecConfig, data: SplitData) -> ItemFeatures:
    if cfg.item_features:
        return load_item_features(Path(cfg.item_features), data.item_ids)
    if cfg.dataset == "synthetic":
        return cluster_features(synthetic_item_clusters(cfg.synthetic_items, cfg.synthetic_clusters, cfg.data_seed_value))
    if cfg.dataset == "movielens":
        return load_movielens_genres(movielens_item_file(Path(cfg.data_path)), data.item_ids)
    raise ValueError(f"item-adapter=features: no item features for dataset={cfg.dataset}; set item-features")


def item_text_embeddings(cfg: FedRecConfig, data: SplitData, log: Callable[[str], None] = print) -> torch.Tensor:
    """The catalogue's texts (item-text, the dataset's own item file, or the synthetic
    clusters' words) through the frozen encoder, cached by content."""
    from fedrec.model.text_encoder import cached_embeddings

    if cfg.item_text:
        by_id, source = read_item_text(Path(cfg.item_text)), cfg.item_text
    elif cfg.dataset == "synthetic":
        clusters = synthetic_item_clusters(cfg.synthetic_items, cfg.synthetic_clusters, cfg.data_seed_value)
        by_id, source = synthetic_texts(clusters, cfg.data_seed_value), "synthetic clusters"
    elif cfg.dataset == "movielens":
        path = movielens_item_file(Path(cfg.data_path))
        by_id, source = movielens_texts(path), str(path)
    else:
        raise ValueError(f"item-encoder={cfg.item_encoder}: no item texts for dataset={cfg.dataset}; set item-text")
    # Under id+text an item without text keeps its ID row; its text embedding is the empty text's.
    texts = catalogue_texts(by_id, data.item_ids, source, allow_missing=cfg.item_encoder == "id+text")
    return cached_embeddings(texts, cache_dir(cfg), log=log)


@dataclass
class Workload:
    cfg: FedRecConfig
    interactions: Interactions
    data: SplitData
    base_path: Path

    def model(self, device: torch.device | None = None) -> PeftModel:
        """A fresh base+LoRA model; the LoRA init is seeded, B = 0."""
        model = build_model(self.cfg, self.data.num_items, self.base_path, device, self.item_side)
        model.get_base_model().set_absent(self.data.cold)  # cold items stay out of training's softmax
        return model

    @property
    def item_side(self) -> ItemSide:
        return item_side(self.cfg, self.data)

    def cold_subsets(self, users: np.ndarray) -> dict[str, np.ndarray]:
        """With cold items: the users whose test target is cold, and the others (warm)."""
        if not len(self.data.cold) or not len(self.data.private):  # enrolled devices' targets stay on them
            return {}
        cold = self.data.cold_target_users(users)
        return {"cold": cold, "warm": np.setdiff1d(np.asarray(users, dtype=np.int64), cold)}


def build_model(
    cfg: FedRecConfig, num_items: int, path: Path, device: torch.device | None = None, side: ItemSide | None = None
) -> PeftModel:
    """The frozen base at `path` with the run's seeded LoRA and item adapter: the same on
    server, workers and devices (`side` holds the item adapter's public inputs)."""
    base = load_base(cfg, num_items, path)
    if cfg.local_dropout >= 0:
        base.set_dropout(cfg.local_dropout)
    item = None
    if cfg.item_kind != "none":
        side = side or ItemSide()
        d = base.item_emb.embedding_dim

        def item():
            return make_item_adapter(cfg.item_kind, num_items, d, rank=cfg.item_rank, alpha=cfg.lora_alpha,
                                     rows=side.rows, features=side.features, text=side.text, basis=side.basis)  # fmt: skip

    model = attach_lora(base, cfg.lora_rank, cfg.lora_alpha, cfg.lora_target_list(), cfg.seed, item_adapter=item)
    if cfg.lora_train == "b-only":
        freeze_random_factors(model)
    elif cfg.lora_train == "none":
        freeze_lora(model)
    return model.to(device or torch.device("cpu"))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but torch sees no CUDA device")
    return torch.device(name)


def _load_or_generate(cfg: FedRecConfig, log: Callable[[str], None] = lambda _m: None) -> Interactions:
    """Real data from its file; synthetic data from the cache dir once generated.

    Synthetic data is deterministic in the config, so the first process writes it beside
    the cached base model as flat arrays, and every other process (each Ray worker)
    memory-maps them: the workers share one copy in the page cache instead of generating
    and holding their own (experiments/README.md#populations).
    """
    if cfg.dataset == "teacher":
        return _teacher_population(cfg, log)
    if cfg.dataset != "synthetic":
        return load_interactions(cfg)
    from fedrec.data.synthetic import GENERATOR_VERSION

    keys = [k for k in DATA_KEYS if k.startswith("synthetic-")] + ["data-seed"] + (["public-users"] if cfg.public_users else [])
    folder = cache_dir(cfg) / f"synthetic-{cfg.fingerprint(*keys)}-g{GENERATOR_VERSION}"
    if not (folder / "meta.json").exists():
        interactions = load_interactions(cfg)
        _store(folder, interactions, {})
        return interactions
    return _stored(folder)


def _store(folder: Path, interactions: Interactions, meta: dict) -> None:
    """A population as flat arrays in the cache, written under a temporary name and renamed."""
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    seqs = interactions.sequences
    np.save(tmp / "items.npy", seqs.flat)
    np.save(tmp / "ends.npy", seqs.ends)
    meta = {"num_items": interactions.num_items, "source": interactions.source,
            "leading_public": interactions.leading_public, "item_ids": interactions.item_ids} | meta  # fmt: skip
    if isinstance(interactions.user_ids, LeadingIds):
        meta["public_ids"] = interactions.user_ids.leading
    (tmp / "meta.json").write_text(json.dumps(meta))
    try:
        os.rename(tmp, folder)
    except OSError:  # another process wrote it first: the same content
        shutil.rmtree(tmp, ignore_errors=True)


def _stored(folder: Path) -> Interactions:
    """A cached population, memory-mapped: every worker shares the page cache's one copy."""
    meta = json.loads((folder / "meta.json").read_text())
    flat = np.load(folder / "items.npy", mmap_mode="r")
    ends = np.load(folder / "ends.npy")
    lead = int(meta.get("leading_public", 0))
    ids = IndexIds(len(ends)) if "public_ids" not in meta else LeadingIds(meta["public_ids"], len(ends) - lead, "drawn-")
    return Interactions(Ragged.from_ends(flat, ends), ids, int(meta["num_items"]), str(meta["source"]),
                        item_ids=list(meta.get("item_ids") or []), leading_public=lead)  # fmt: skip


def _teacher_population(cfg: FedRecConfig, log: Callable[[str], None]) -> Interactions:
    """The real data's public users (its split's, in order), then `teacher-users` users drawn
    from the teacher (fedrec.model.teacher).

    The cache holds one growing pool per teacher, temperature and data seed: the public
    users, then whole blocks of drawn users. A population of N is the pool's first N drawn
    users, so every size of a study is a prefix of the largest, drawn once; a size beyond
    the pool draws only the blocks it lacks."""
    from fedrec.model.teacher import BLOCK, SAMPLER_VERSION, cached_teacher, draw_blocks

    teacher = cached_teacher(cfg.teacher_path)
    folder = cache_dir(cfg) / f"teacher-{teacher.digest}-{cfg.fingerprint(*TEACHER_KEYS)}-s{SAMPLER_VERSION}"
    pool = _teacher_pool(folder)
    if pool is None:
        pool = _stored(_new_teacher_pool(cfg, teacher, folder, log))
    lead = pool.leading_public
    n = cfg.teacher_users or int(json.loads((folder / "real.json").read_text())["private_users"])
    have = len(pool.sequences) - lead
    if n > have:
        blocks = range(have // BLOCK, -(-n // BLOCK))
        log(f"data: drawing {len(blocks) * BLOCK:,} more users from the teacher {cfg.teacher_path} at temperature "
            f"{cfg.teacher_temperature:g} (the cached pool has {have:,}; {folder})")  # fmt: skip
        started = time.time()
        more = draw_blocks(teacher, blocks, cfg.teacher_temperature, cfg.data_seed_value, log)
        grown = dataclasses.replace(pool, sequences=pool.sequences.followed_by(more))
        _store(folder / f"pool-{len(grown.sequences) - lead}", grown, {"draw_seconds": round(time.time() - started, 1)})
        pool = _teacher_pool(folder, drop_smaller=True)
    seqs = pool.sequences
    return dataclasses.replace(
        pool, sequences=Ragged(seqs.flat, seqs.starts[: lead + n], seqs.ends[: lead + n]),
        user_ids=LeadingIds(pool.user_ids.leading, n, "drawn-"),
        source=f"teacher({cfg.teacher_path}: {n:,} users drawn at temperature {cfg.teacher_temperature:g}; {pool.source})",
    )  # fmt: skip


def _teacher_pool(folder: Path, drop_smaller: bool = False) -> Interactions | None:
    """The largest pool drawn so far (pool-K: K drawn users), memory-mapped; None if none.

    `drop_smaller`: the pools it grew from are deleted (each is a prefix of it, and together
    they took a good part of its size again: experiments/README.md#population-1p8m). A process that still maps one keeps reading it: an
    unlinked file stays whole until its last mapping closes."""
    pools = sorted((int(p.name.split("-")[1]), p) for p in folder.glob("pool-*") if (p / "meta.json").exists()) \
        if folder.exists() else []  # fmt: skip
    if drop_smaller:
        for _k, smaller in pools[:-1]:
            shutil.rmtree(smaller, ignore_errors=True)
    return _stored(pools[-1][1]) if pools else None


def _new_teacher_pool(cfg: FedRecConfig, teacher, folder: Path, log: Callable[[str], None]) -> Path:
    """The pool with no drawn user yet: the real data's public users, checked against the
    file the teacher was trained on."""
    from fedrec.data.load import source_file
    from fedrec.model.base import _content_digest
    from fedrec.model.teacher import real_data_config

    kind, trained_on = teacher.meta["dataset"], teacher.meta["data_digest"]
    if _content_digest(source_file(kind, Path(cfg.data_path).expanduser().resolve())) != trained_on:
        raise DataError(f"data-path: '{cfg.data_path}' is not the file the teacher {cfg.teacher_path} was trained on "
                        f"({teacher.meta.get('source', '?')})")  # fmt: skip
    real = load_interactions(real_data_config(cfg))
    if real.num_items != teacher.num_items:
        raise DataError(f"teacher-path: the teacher has {teacher.num_items:,} items, {cfg.data_path} {real.num_items:,}")
    split = split_users(real, cfg.public_fraction, cfg.data_seed_value)
    public = [np.asarray(real.sequences[int(u)], dtype=np.int32) for u in split.public]
    ends = np.cumsum([len(x) for x in public], dtype=np.int64)
    base = Interactions(Ragged.from_ends(np.concatenate(public), ends), [real.user_ids[int(u)] for u in split.public],
                        real.num_items, f"the {len(public):,} public users of {real.source}", item_ids=real.item_ids,
                        leading_public=len(public))  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "real.json").write_text(json.dumps({"private_users": len(split.private), "source": real.source}))
    _store(folder / "pool-0", base, {"public_ids": list(base.user_ids), "item_ids": real.item_ids})
    return folder / "pool-0"


def load_workload(cfg: FedRecConfig, log: Callable[[str], None] = lambda _m: None) -> Workload:
    """Data split and base model for `cfg`, the base already made (`prepare_workload`):
    loading never trains, so a worker or a device only ever reads what the driver made.

    The data is memoized by what determines it; the returned Workload always carries
    `cfg` itself, so adapter shape and other federated knobs are never stale.
    """
    interactions, data = _split(cfg, log)
    path = base_path(cfg)
    if not path.exists():
        raise FileNotFoundError(f"base model {path} is missing; the server creates it before round 1")
    return Workload(cfg, interactions, data, path)


def prepare_workload(cfg: FedRecConfig, log: Callable[[str], None] = lambda _m: None) -> Workload:
    """The driver's step before anything else: pretrain the base if it is missing, then load."""
    _interactions, data = _split(cfg, log)
    ensure_base(cfg, data, log, text=item_side(cfg, data).text if cfg.item_encoder != "id" else None)
    return load_workload(cfg, log)


def _split(cfg: FedRecConfig, log: Callable[[str], None]):
    key = cfg.fingerprint(*DATA_KEYS, "private-users")
    if key not in _CACHE:
        interactions = _load_or_generate(cfg, log)
        log(f"data: {interactions.describe()}")
        enrolled = cfg.private_users == "enrolled"
        data = split_users(interactions, cfg.public_fraction, cfg.data_seed_value, cfg.cold_items, all_public=enrolled)
        log(f"split: {len(data.public):,} public users (pretraining), "
            + ("private users: the devices that enroll (private-users=enrolled)" if enrolled
               else f"{len(data.private):,} private users (federated)")
            + (f"; {len(data.cold):,} cold items held out of every training prefix" if len(data.cold) else ""))  # fmt: skip
        _CACHE[key] = (interactions, data)
    return _CACHE[key]
