"""The results directory of a run: everything a person or a sweep reads afterwards."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

from fedrec.config import ConfigError, FedRecConfig
from fedrec.model.types import AdapterState
from fedrec.provenance import provenance
from fedrec.summary import Intervals, Metrics, RunSummary


def default_output_dir(mode: str) -> str:
    return str(Path("results") / f"{datetime.now():%Y%m%d-%H%M%S}-{mode}")


# What a run writes into its folder: a folder holding any of these belongs to that run.
RUN_FILES = (
    "config.toml", "metrics.jsonl", "metrics.discarded.jsonl", "summary.json", "summary.txt", "privacy.json",
    "audit.json", "adapter.safetensors", "adapter_last_round.safetensors", "valid_ndcg10.png", "checkpoint",
    "checkpoint.old", "checkpoint.tmp", "client-state",
)  # fmt: skip
LOCK = ".fedrec.lock"


def check_output_dir(path: str | Path, overwrite: bool = False) -> Path:
    """The folder a new run may write into, refused in one line (ConfigError) before any work:
    a file, a folder that cannot be made, or one holding another run's files without `overwrite`."""
    path = Path(path).resolve()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output-dir: {path} is a file, not a folder")
    probe = next((p for p in [path, *path.parents] if p.exists()), None)
    if probe is None or not os.access(probe, os.W_OK):
        raise ConfigError(f"output-dir: {path} cannot be created ({probe} is not writable)")
    held = [name for name in RUN_FILES if (path / name).exists()]
    if held and not overwrite:
        raise ConfigError(f"output-dir: {path} holds another run's files ({', '.join(held[:3])}"
                          f"{', …' if len(held) > 3 else ''}); give a new folder, --overwrite to replace them, "
                          f"or --resume {path} to continue that run")  # fmt: skip
    return path


# Folders this process holds the lock of. A driver (fedrec.simulate) locks every run's
# folder before Ray or Flower start, so a concurrent start is refused in one line at once;
# its ServerApp runs in the same process and finds the lock already its own.
_HELD: dict[Path, int] = {}
_CREATED: set[Path] = set()  # made by lock_folder: removed again if no run wrote into them


def lock_folder(path: str | Path) -> Path:
    """Hold `path`'s lock for this process's life (or until `unlock_folders`); refused in
    one line (ConfigError) while another process holds it."""
    path = Path(path).resolve()
    if path in _HELD:
        return path
    if not path.exists():
        try:
            path.mkdir(parents=True)
        except OSError as e:  # os.access can say yes to root where mkdir then fails (/proc, read-only mounts)
            raise ConfigError(f"output-dir: {path} cannot be created ({e.strerror})") from None
        _CREATED.add(path)
    _HELD[path] = _flock(path)
    return path


def _flock(folder: Path) -> int:
    """An open descriptor holding `folder`'s exclusive lock; ConfigError while another process holds it."""
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"output-dir: {folder} is in use by another run that is still going") from None
    return fd


def unlock_folders() -> None:
    """Drop every lock `lock_folder` took; a folder it made that no run wrote into goes too."""
    while _HELD:
        path, fd = _HELD.popitem()
        os.close(fd)  # closing the descriptor drops the lock
        if path in _CREATED and [p.name for p in path.iterdir()] == [LOCK]:
            (path / LOCK).unlink()
            path.rmdir()
    _CREATED.clear()


class ResultsDir:
    def __init__(self, path: str | Path, resume_round: int | None = None, overwrite: bool = False) -> None:
        """A new run starts in a folder of its own (`check_output_dir`; with `overwrite` the
        other run's files are removed first); a resumed one (`resume_round`) keeps its rows.
        The folder is locked for the run's life: a second run into it stops at once."""
        self.path = Path(path).resolve() if resume_round is not None else check_output_dir(path, overwrite)
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock: int | None = None
        if self.path not in _HELD:  # the driver's lock (lock_folder) covers this run already
            self._lock = _flock(self.path)
        self.metrics_path = self.path / "metrics.jsonl"
        if resume_round is None:
            for name in RUN_FILES:  # only with overwrite: check_output_dir refused them otherwise
                target = self.path / name
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
            self.metrics_path.write_text("")
        else:
            self._keep_rounds_up_to(resume_round)

    def release(self) -> None:
        """The run is over: another may now write here (with --overwrite or --resume)."""
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor drops the lock
            self._lock = None

    def _keep_rounds_up_to(self, last: int) -> None:
        """Rows a crashed run wrote after its checkpoint will be run again: they move to
        `metrics.discarded.jsonl` (nothing is lost), the rest stays as it was written."""
        lines = self.metrics_path.read_text().splitlines(keepends=True) if self.metrics_path.exists() else []
        keep = [line for line in lines if json.loads(line)["round"] <= last]
        later = [line for line in lines if json.loads(line)["round"] > last]
        if later:
            with (self.path / "metrics.discarded.jsonl").open("a") as fh:
                fh.writelines(later)
            tmp = self.metrics_path.with_suffix(".tmp")
            tmp.write_text("".join(keep))
            tmp.replace(self.metrics_path)

    def write_config(self, cfg: FedRecConfig) -> None:
        (self.path / "config.toml").write_text(cfg.to_toml())

    def append_metrics(self, row: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")

    def write_summary(self, summary: RunSummary | dict[str, Any]) -> None:
        """A federated run's typed summary, or the centralized and local-only modes' dicts."""
        data = summary.to_dict() if isinstance(summary, RunSummary) else dict(summary)
        data.setdefault("provenance", provenance())  # the commit, the packages and the machine
        (self.path / "summary.json").write_text(json.dumps(data, indent=2) + "\n")
        (self.path / "summary.txt").write_text(summary_text(as_summary(summary)))

    def write_json(self, name: str, record: dict[str, Any]) -> None:
        (self.path / name).write_text(json.dumps(record, indent=2) + "\n")

    def write_privacy(self, ledger: dict[str, Any]) -> None:
        (self.path / "privacy.json").write_text(json.dumps(ledger, indent=2) + "\n")

    def save_adapter(self, state: AdapterState, name: str = "adapter.safetensors") -> Path:
        from safetensors.torch import save_file

        path = self.path / name
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        return path

    def plot_validation(self, rows: list[dict[str, Any]], metric: str = "ndcg@10") -> Path | None:
        points = [(r["round"], r["valid"][metric]) for r in rows if r.get("valid")]
        if not points:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        ax.set_xlabel("round")
        ax.set_ylabel(f"validation {metric.upper()}")
        ax.set_title("Validation NDCG@10 per round (round 0 = base model)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = self.path / "valid_ndcg10.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


_ROWS = (
    ("most_popular_test", "most popular"),
    ("base_test", "base model"),
    ("test", "federated"),
    ("local_test", "local only (no federation)"),
    ("last_round_test", "federated, last round"),
    ("base_test_warm", "base, warm targets"),
    ("test_warm", "federated, warm targets"),
    ("base_test_cold", "base, cold targets"),
    ("test_cold", "federated, cold targets"),
    ("ceiling_scratch_test", "ceiling: from scratch"),
    ("ceiling_full_test", "ceiling: full fine-tune"),
    ("ceiling_transformer_test", "ceiling: transformer (items frozen)"),
    ("ceiling_same_test", "ceiling: same parameters"),
)


def as_summary(summary: RunSummary | dict[str, Any]) -> RunSummary:
    return summary if isinstance(summary, RunSummary) else RunSummary.from_dict(summary)


def comparison_rows(summary: RunSummary) -> list[tuple[str, Metrics, Intervals]]:
    """(label, test metrics, their 95% intervals) for every model the summary holds, base first."""
    labels = list(_ROWS)
    if summary.best_round == summary.rounds:
        labels.remove(("last_round_test", "federated, last round"))  # the same adapter
    flat = summary.to_dict()  # built once for every row, not once per row
    rows = [(label, flat.get(key) or {}, flat.get(f"{key}_ci") or {}) for key, label in labels]
    return [row for row in rows if row[1]]


def interval_text(value: float, ci: list[float] | None, digits: int = 4) -> str:
    """`0.0452 [0.0431, 0.0474]`, or the value alone without an interval."""
    if not ci:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def summary_text(summary: RunSummary) -> str:
    lines = [f"fedrec {summary.mode} run", "", "test split, full ranking; [95% bootstrap interval over users]"]
    lines.append(f"{'model':<28} {'HR@10':>26} {'NDCG@10':>26} {'HR@20':>8} {'NDCG@20':>8}")
    for label, m, ci in comparison_rows(summary):
        lines.append(f"{label:<28} {interval_text(m['hr@10'], ci.get('hr@10')):>26} "
                     f"{interval_text(m['ndcg@10'], ci.get('ndcg@10')):>26} {m['hr@20']:8.4f} {m['ndcg@20']:8.4f}")  # fmt: skip
    gain = summary.test_gain_ci.get("ndcg@10")
    if gain:
        lines.append(f"federated − base, NDCG@10 (paired by user): [{gain[0]:+.4f}, {gain[1]:+.4f}]")
    lines.append("")
    flat = summary.to_dict()
    for key in ("rounds", "best_round", "epsilon", "delta", "noise_multiplier", "noise_to_signal", "adapter_dimension",
                "users_trained", "wall_seconds", "adapter_bytes", "adapter_parameters", "ceiling_scratch_epoch",
                "ceiling_full_epoch", "ceiling_transformer_epoch", "ceiling_same_epoch", "selection"):  # fmt: skip
        if key in flat:
            lines.append(f"{key}: {flat[key]}")
    return "\n".join(lines) + "\n"
