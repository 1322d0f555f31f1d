"""User-level privacy accounting for DP-FedAvg rounds, amplified by sampling, resumable.

The accountant's whole state is its ledger of rounds (q, z, C, cohort size): ε is
recomposed from the ledger, so restoring a checkpoint's ledger gives exactly the ε an
uninterrupted run reports. Composition uses well-kept libraries:
- `pld` (default for Poisson sampling): dp-accounting's privacy loss distributions, composed
  as its PLDAccountant composes them, with one round's PLD kept per (q, z) (see below);
- `prv`: Opacus's PRV accountant (Poisson only; its ε comes close to PLD's:
  experiments/README.md#prv-accountant);
- `rdp`: dp-accounting's Rényi accountant, the only one of these that handles fixed-size
  sampling without replacement (Wang, Balle & Kasiviswanathan, AISTATS 2019). That bound
  is for replace-one neighbours, for which the sum of clipped updates has sensitivity
  2C, so the noise multiplier it is given is z/2.
"""

from __future__ import annotations

import atexit
import functools
import importlib.metadata
import itertools
import json
import math
import os
import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import dp_accounting as dpa
from dp_accounting import pld, rdp

@dataclass(frozen=True)
class RoundEvent:
    round: int
    q: float
    noise_multiplier: float
    clipping_norm: float
    sample_size: int


class UserLevelAccountant:
    """The ledger of rounds and ε after each; subclasses differ only in how they compose."""

    kind = ""
    samplings: tuple[str, ...] = ("poisson",)  # the sampling schemes this accountant has a bound for

    def __init__(self, sampling: str, population: int, delta: float) -> None:
        if sampling not in self.samplings:
            raise ValueError(
                f"accountant: {self.kind} has no bound for {sampling}-size sampling; use accountant=rdp or sampling=poisson"
            )
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        self.sampling, self.population, self.delta = sampling, population, delta
        self.events: list[RoundEvent] = []
        self.epsilons: list[float] = []

    # ------------------------------------------------------------------ ledger
    def record(self, event: RoundEvent, epsilon: float | None = None) -> float:
        """Add a round; `epsilon` may be passed when already composed for these events."""
        self.events.append(event)
        self.epsilons.append(self.epsilon(self.events) if epsilon is None else epsilon)
        return self.epsilons[-1]

    @property
    def spent(self) -> float:
        return self.epsilons[-1] if self.epsilons else 0.0

    def to_dict(self) -> dict:
        return {
            "accountant": self.kind,
            "sampling": self.sampling,
            "population": self.population,
            "delta": self.delta,
            "rounds": [asdict(e) | {"epsilon": eps} for e, eps in zip(self.events, self.epsilons)],
        }

    @staticmethod
    def from_dict(state: dict) -> UserLevelAccountant:
        acc = make_accountant(state["accountant"], state["sampling"], state["population"], state["delta"])
        acc.load_state_dict(state)
        return acc

    def load_state_dict(self, state: dict) -> None:
        """Take a stored ledger's rounds, if it was kept for the same kind of accountant,
        sampling, population and δ: the ε of a ledger composed under other terms would be
        another mechanism's, so a mismatch is refused rather than silently continued."""
        mine = {"accountant": self.kind, "sampling": self.sampling, "population": self.population, "delta": self.delta}
        differ = [f"{k} {state.get(k)!r} (this run: {v!r})" for k, v in mine.items() if state.get(k) != v]
        if differ:
            raise ValueError("checkpoint: the stored privacy ledger does not fit this run's mechanism: " + ", ".join(differ))
        self.events = [RoundEvent(**{k: row[k] for k in RoundEvent.__dataclass_fields__}) for row in state["rounds"]]
        self.epsilons = [float(row["epsilon"]) for row in state["rounds"]]

    # ------------------------------------------------------------- composition
    def epsilon(self, events: list[RoundEvent]) -> float:
        """ε at this accountant's δ after `events` (identical consecutive rounds grouped)."""
        groups = [(key, sum(1 for _ in grp)) for key, grp in itertools.groupby(events, key=self._key)]
        return self._compose(groups) if groups else 0.0

    def _compose(self, groups: list[tuple[tuple[float, float, int], int]]) -> float:
        """ε of consecutive groups ((q, z, cohort size), rounds)."""
        raise NotImplementedError

    def compose_ahead(self, planned: list[RoundEvent]) -> None:
        """Prepare ε after each of the `planned` rounds; only slow accountants need to."""

    def _key(self, e: RoundEvent) -> tuple[float, float, int]:
        return (e.q, e.noise_multiplier, e.sample_size if self.sampling == "fixed" else 0)


class PLDAccountant(UserLevelAccountant):
    kind = "pld"

    def _compose(self, groups):
        key = (tuple((q, z, n) for (q, z, _m), n in groups), self.delta)
        return _AHEAD.get(key, lambda: _pld_epsilon(*key))

    def compose_ahead(self, planned: list[RoundEvent]) -> None:
        """Start composing ε after each of the `planned` rounds on a background thread.

        A `pld` ε is not cheap (dp-accounting's self-convolution and its ε search:
        experiments/README.md#accounting-cost),
        and a run asks for it after every round while the server sits idle waiting for the
        clients. Composed ahead, the same value is ready when asked
        for; `epsilon` waits for one still being composed.
        """
        keys = []
        for k in range(1, len(planned) + 1):
            groups = itertools.groupby([*self.events, *planned[:k]], key=self._key)
            keys.append((tuple((q, z, sum(1 for _ in g)) for (q, z, _m), g in groups), self.delta))
        _AHEAD.submit(keys)


class PRVAccountant(UserLevelAccountant):
    kind = "prv"

    def _compose(self, groups):
        from opacus.accountants import PRVAccountant as OpacusPRV

        acc = OpacusPRV()
        acc.history = [(z, q, n) for (q, z, _m), n in groups]
        return float(acc.get_epsilon(self.delta))


class RDPAccountant(UserLevelAccountant):
    kind = "rdp"
    samplings = ("poisson", "fixed")

    def _compose(self, groups):
        relation = dpa.NeighboringRelation.REPLACE_ONE if self.sampling == "fixed" else dpa.NeighboringRelation.ADD_OR_REMOVE_ONE
        accountant = rdp.RdpAccountant(neighboring_relation=relation)
        for (q, z, m), n in groups:
            accountant.compose(dpa.SelfComposedDpEvent(self._dp_event(q, z, m), n))
        return float(accountant.get_epsilon(self.delta))

    def _dp_event(self, q: float, z: float, m: int) -> dpa.DpEvent:
        if self.sampling == "poisson":
            return dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z))
        return dpa.SampledWithoutReplacementDpEvent(self.population, m, dpa.GaussianDpEvent(z / 2))


# The one registry of accountants: `accountant=<kind>` in the config names one of these
# (`fedrec.config.ACCOUNTANTS` lists the same kinds plus `auto`; a test holds them equal).
REGISTRY: dict[str, type[UserLevelAccountant]] = {a.kind: a for a in (PLDAccountant, PRVAccountant, RDPAccountant)}


def make_accountant(kind: str, sampling: str, population: int, delta: float) -> UserLevelAccountant:
    """`auto` is PLD for Poisson sampling and RDP for fixed-size cohorts (the only bound here)."""
    if kind == "auto":
        kind = "pld" if sampling == "poisson" else "rdp"
    if kind not in REGISTRY:
        raise ValueError(f"accountant: unknown kind {kind!r}; choose from auto, {', '.join(REGISTRY)}")
    return REGISTRY[kind](sampling, population, delta)


# Building dp-accounting's PLD of one Poisson-sampled Gaussian round (at its 1e-4
# discretization) costs several times more than self-composing it over a run's rounds
# (experiments/README.md#accounting-cost);
# PLDAccountant builds it again on every call, and a run asks for ε after every
# round. So the one-round PLD is kept per (q, z), and composed exactly as
# PLDAccountant composes (tests/test_dp.py holds the two equal).
_PLD_INTERVAL = 1e-4  # PLDAccountant's default value_discretization_interval


def _gaussian_round_pld(q: float, z: float, interval: float):
    """PLD of one Poisson-sampled Gaussian round (add/remove-one neighbours)."""
    return pld.privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=z, value_discretization_interval=interval, sampling_prob=q,
        neighboring_relation=dpa.NeighboringRelation.ADD_OR_REMOVE_ONE,
    )  # fmt: skip


@functools.lru_cache(maxsize=8)
def _one_round_pld(q: float, z: float):
    return _gaussian_round_pld(q, z, _PLD_INTERVAL)


def _pld_epsilon(groups: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """ε of consecutive groups of `n` identical rounds (q, z, n), Poisson-sampled Gaussian."""
    composed = pld.privacy_loss_distribution.identity(value_discretization_interval=_PLD_INTERVAL)
    for q, z, n in groups:
        if q == 0:
            continue
        if z == 0:
            return math.inf
        composed = composed.compose(_one_round_pld(q, z).self_compose(n))
    return float(composed.get_epsilon_for_delta(delta))


class _ComposeAhead:
    """ε of ledgers a run will ask for, composed in order on one daemon thread.

    Written here rather than with concurrent.futures: its worker threads are joined at
    interpreter exit, so a run stopped early would wait for every queued ledger. At exit the
    queue is dropped and the one ledger in progress is waited for (`stop`): a daemon thread
    still inside SciPy's FFT while the interpreter finalizes aborted the process (exit -6,
    seen once in CI after a run stopped at max-epsilon).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: list[tuple] = []  # the head is the one being composed
        self._done: dict[tuple, float] = {}
        self._running = False

    def submit(self, keys: list[tuple]) -> None:
        with self._cond:
            self._queue += [k for k in keys if k not in self._done and k not in self._queue]
            if self._queue and not self._running:
                self._running = True
                threading.Thread(target=self._work, name="fedrec-compose-ahead", daemon=True).start()

    def stop(self, timeout: float = 60.0) -> None:
        """Drop what is queued and wait for the ledger being composed (at interpreter exit)."""
        with self._cond:
            del self._queue[1:]
            self._cond.wait_for(lambda: not self._running, timeout=timeout)

    def get(self, key: tuple, compute) -> float:
        with self._cond:
            while key in self._queue:
                self._cond.wait()
            if key in self._done:
                return self._done[key]
        return compute()

    def _work(self) -> None:
        # Lowest priority for this thread alone (Linux sets a nice value per thread): it runs
        # while the workers train or evaluate on the same cores, and a ledger is only needed
        # when a round ends, when they are idle (experiments/README.md#population-1p8m).
        if sys.platform == "linux":
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
            except OSError:
                pass
        while True:
            with self._cond:
                if not self._queue:
                    self._running = False
                    self._cond.notify_all()  # `stop` waits for this
                    return
                key = self._queue[0]
            try:
                value = _pld_epsilon(*key)
            except Exception:  # noqa: BLE001 - the caller composes it again and sees the error itself
                value = None
            with self._cond:
                self._queue.pop(0)
                if value is not None:
                    if len(self._done) > 100_000:
                        self._done.clear()
                    self._done[key] = value
                self._cond.notify_all()


_AHEAD = _ComposeAhead()
atexit.register(_AHEAD.stop)


def calibrate_noise(
    target_epsilon: float, rounds: int, make_accountant, q: float, sample_size: int, lo: float = 0.05, hi: float = 500.0,
    store: Path | None = None,
) -> float:
    """Smallest noise multiplier (to 0.1%) whose `rounds` rounds stay within target ε.

    A geometric bisection on the accountant's own ε. With `pld` each of its 14 steps would
    build a new one-round PLD at the 1e-4 discretization, the costly part of a PLD ε, all
    before round 1; so the bisection is first run on PLDs at 1e-3 (far cheaper to build,
    and ε very close to the 1e-4 one: experiments/README.md#accounting-cost), then its final bracket is checked
    with the accountant itself. Both bisections halve the same brackets and ε falls as z grows, so if the check passes
    the answer is the one the exact bisection gives (a wrong step would leave the true
    threshold outside the final bracket); if it fails, the exact bisection runs.

    `store`: a JSON file of earlier calibrations by their inputs (and dp-accounting's
    version), read before and written after calibrating.
    """

    accountant = make_accountant()
    key = _calibration_key(accountant, target_epsilon, rounds, q, sample_size, lo, hi)
    if key not in _CALIBRATED and store is not None:
        stored = {k: v for k, v in _read_store(store).items() if k not in _CALIBRATED}
        _CALIBRATED.update(stored)
        _FROM_STORE.update(stored)
    with _LOCK:  # the same calibration already under way (started ahead: fedrec.run.calibrate_ahead)? wait for it
        running = _RUNNING.get(key)
        if running is None and key not in _CALIBRATED:
            _RUNNING[key] = threading.Event()
    if running is not None:
        running.wait()
        if key in _CALIBRATED:
            return _CALIBRATED[key]
        return calibrate_noise(target_epsilon, rounds, make_accountant, q, sample_size, lo, hi, store)  # it failed
    if key in _CALIBRATED:
        return _CALIBRATED[key]
    try:
        _CALIBRATED[key] = _calibrate(target_epsilon, rounds, make_accountant, accountant, q, sample_size, lo, hi)
        if store is not None:
            _write_store(store, key, _CALIBRATED[key])
    finally:
        with _LOCK:
            _RUNNING.pop(key).set()
    return _CALIBRATED[key]


# z by its calibration's inputs, in memory for a sweep's seeds (one process runs them all),
# on disk for later processes: at a small q a calibration costs seconds to tens of seconds,
# each of its PLDs built point by point in Python (experiments/README.md#population-1p8m).
_CALIBRATED: dict[str, float] = {}
_RUNNING: dict[str, threading.Event] = {}
_FROM_STORE: set[str] = set()  # the keys read from a store, not calibrated by this process
_LOCK = threading.Lock()
_STORE_FORMAT = 1
_DPA_VERSION = importlib.metadata.version("dp-accounting")


def _read_store(store: Path) -> dict[str, float]:
    try:
        return {k: float(v) for k, v in json.loads(store.read_text()).items()}
    except (OSError, ValueError, AttributeError):  # absent, or unreadable: calibrated again, and rewritten
        return {}


def _write_store(store: Path, key: str, z: float) -> None:
    """Atomic (a temporary file renamed), so a reader never sees half a file; two runs
    writing at once may lose one entry, which is calibrated again when next asked for."""
    entries = _read_store(store) | {key: z}
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        tmp = store.with_name(f"{store.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=0))
        os.replace(tmp, store)
    except OSError:  # a read-only cache: the run goes on with the z it calibrated
        pass


def _calibration_key(acc: UserLevelAccountant, target_epsilon, rounds, q, sample_size, lo=0.05, hi=500.0) -> str:
    return repr((_STORE_FORMAT, _DPA_VERSION, acc.kind, acc.sampling, acc.population, acc.delta, target_epsilon,
                 rounds, q, sample_size, lo, hi, _PREDICT_INTERVAL, _PLD_INTERVAL))  # fmt: skip


def stored_calibration(target_epsilon: float, rounds: int, make_accountant, q: float, sample_size: int) -> bool:
    """Whether `calibrate_noise` took this z from a store, calibrated by an earlier process
    (asked after it, for the log)."""
    return _calibration_key(make_accountant(), target_epsilon, rounds, q, sample_size) in _FROM_STORE


def _calibrate(target_epsilon, rounds, make_accountant, accountant, q, sample_size, lo, hi) -> float:
    def eps(z: float) -> float:
        acc = make_accountant()
        return acc.epsilon([RoundEvent(1, q, z, 1.0, sample_size)] * rounds)

    if eps(hi) > target_epsilon:
        raise ValueError(f"target-epsilon {target_epsilon} is out of reach within noise multiplier {hi}")
    if accountant.kind == "pld" and q > 0:
        delta = accountant.delta
        p_lo, p_hi = _bisect(lambda z: _coarse_pld_epsilon(q, z, rounds, delta) <= target_epsilon, lo, hi)
        if eps(p_hi) <= target_epsilon and (p_lo == lo or eps(p_lo) > target_epsilon):
            return p_hi
    return _bisect(lambda z: eps(z) <= target_epsilon, lo, hi)[1]


_PREDICT_INTERVAL = 1e-3


def _coarse_pld_epsilon(q: float, z: float, rounds: int, delta: float) -> float:
    return float(_gaussian_round_pld(q, z, _PREDICT_INTERVAL).self_compose(rounds).get_epsilon_for_delta(delta))


def _bisect(enough, lo: float, hi: float) -> tuple[float, float]:
    """Final (lo, hi) of a geometric bisection to hi/lo <= 1.001, `enough(hi)` assumed true."""
    while hi / lo > 1.001:
        mid = math.sqrt(lo * hi)
        if enough(mid):
            hi = mid
        else:
            lo = mid
    return lo, hi


# ------------------------------------------------------- one Gaussian mechanism
@functools.lru_cache(maxsize=4096)
def gaussian_epsilon(noise_multiplier: float, delta: float) -> float:
    """ε at δ of one Gaussian mechanism (no sampling, add/remove-one) whose noise is
    `noise_multiplier` times its L2 sensitivity: dp-accounting's PLD, as for the rounds above."""
    if noise_multiplier <= 0:
        return math.inf
    dist = pld.privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=noise_multiplier, value_discretization_interval=_PLD_INTERVAL)
    return float(dist.get_epsilon_for_delta(delta))


def calibrate_gaussian(target_epsilon: float, delta: float, lo: float = 0.05, hi: float = 500.0) -> float:
    """Smallest multiplier (to 0.1%) with `gaussian_epsilon` within the target."""
    if gaussian_epsilon(hi, delta) > target_epsilon:
        raise ValueError(f"target-epsilon {target_epsilon} is out of reach within noise multiplier {hi}")
    return _bisect(lambda z: gaussian_epsilon(z, delta) <= target_epsilon, lo, hi)[1]
