"""Distributed DP: each device adds its share of the noise, so that the sum SecAgg+ unmasks
is already private (noise-placement=devices).

The mechanism is the distributed Skellam mechanism (Agarwal, Kairouz & Liu, NeurIPS 2021)
in the integer field SecAgg+ sums in:
1. a device scales its clipped update by s and rounds it to integers at random, again until
   the rounded vector's norm stays under a bound (conditional randomized rounding, Kairouz,
   Liu & Steinke, ICML 2021): the bound is the integer sensitivity Δ2;
2. it adds Skellam noise Sk = Poisson(μ/2) − Poisson(μ/2) of variance μ_dev per coordinate
   and reduces the result modulo T (a power of two);
3. SecAgg+ sums the devices' vectors; the server reduces the sum modulo T, reads it in
   [−T/2, T/2) and divides by s.
Where the cohort is large, the field is small (T·devices must fit SecAgg+'s 32 bits) and
the scale that fits every update pointing one way leaves s·C so small that rounding inflates
Δ2 many times over. Then the devices first rotate their update with a randomized Hadamard
transform of the run's public signs (as Kairouz et al. do): a coordinate of the rotated sum
is then of the order of its norm over √D, not its norm, and s can be that much larger. The
rotation is used where it shrinks the inflation (`SkellamPlan.rotated`); the server rotates
the decoded sum back.
A sum of independent Skellams is Skellam, so the unmasked sum carries Skellam noise of
variance (survivors)·μ_dev. Modular reduction is exact as long as the true sum lies in
[−T/2, T/2): s and T are chosen so that it does even if every device's update pointed the
same way (`SkellamPlan.make`).

The assumptions the guarantee rests on:
- a device's own noise is not counted for its own privacy (its update arrives with it), so
  the noise that protects a user is that of the other survivors: at least
  `min_survivors − 1` of them. μ_dev is set so that those alone give the target variance;
- `min_survivors` = (1 − secagg-dropout-margin) × the expected cohort. A round with fewer
  survivors is not unmasked (the server refuses it before the unmask stage; it is still
  charged in the ledger, and whether it was refused depends on the cohort's size);
- sampling is Poisson and its draw is hidden from whoever sees the released model. The
  server draws the cohorts, so against the server itself no sampling amplifies: the record
  also says ε for a user after k rounds with no amplification (`server_view`).

Accounting is Rényi DP: the Skellam mechanism's RDP bound (Agarwal et al. 2021, Thm 3.5 with
μ the per-coordinate variance), amplified by Poisson sampling with Zhu & Wang's general
upper bound (ICML 2019, Thm 5), composed over rounds and converted to (ε, δ) by
dp-accounting. Written here because dp-accounting's RDP accountant has no Skellam event.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
from dp_accounting.rdp import rdp_privacy_accountant
from scipy.special import gammaln, logsumexp

from fedrec.aggregate import UpdateSum
from fedrec.model.types import AdapterState
from fedrec.privacy.accountant import RoundEvent, UserLevelAccountant, _bisect
from fedrec.privacy.mechanism import PrivacyReport, noise_seed

MODULUS_BITS = 32  # Flower's SecAgg+ sums modulo 2**32 (its `modulus_range` default and maximum)
ROUNDING_BETA = math.exp(-0.5)  # conditional rounding: the bound holds with this failure chance per try
ORDERS = tuple(range(2, 129)) + (160, 192, 256)
TOO_FEW = "too-few-devices-for-the-noise"  # the reason a refused round's masked updates are left out
FIT_STDDEVS = 6.0  # the noise's part of the field: this many standard deviations of the sum's noise
WRAP_CHANCE = 1e-6  # rotated: the chance that a coordinate of the rotated sum exceeds its bound, per coordinate
ROTATE_ABOVE = 1.01  # rotate where rounding would inflate the sensitivity by more than this


@dataclass(frozen=True)
class SkellamPlan:
    """Everything a device needs to encode its update, fixed before round 1."""

    clipping_norm: float
    dimension: int
    noise_multiplier: float  # z: the noise that protects a user has std z·Δ2 (integer domain)
    expected_users: int  # m
    min_survivors: int
    max_users: int  # the most devices a round may hold: the field fits their sum
    scale: float  # s
    field: int  # T, a power of two
    l2_sensitivity: float  # Δ2 of the rounded, scaled update
    l1_sensitivity: float  # Δ1 ≤ min(√d·Δ2, Δ2²) (an integer vector's ℓ1 is at most its ℓ2²)
    device_variance: float  # μ_dev per coordinate
    rotated: bool = False  # a randomized Hadamard rotation first, into `padded` coordinates
    padded: int = 0  # the rotation's length, a power of two ≥ dimension (0: no rotation)
    rotation_seed: int = 0  # the rotation's public signs

    @property
    def coordinates(self) -> int:
        """What the devices send and the noise covers: d, or the rotation's padded length."""
        return self.padded if self.rotated else self.dimension

    @classmethod
    def make(cls, clipping_norm: float, dimension: int, noise_multiplier: float, expected_users: int,
             dropout_margin: float, rotation_seed: int = 0) -> SkellamPlan:  # fmt: skip
        """The plan as it is, or rotated where that shrinks the rounding's inflation of Δ2."""
        plain = cls._fit(clipping_norm, dimension, noise_multiplier, expected_users, dropout_margin, rotate=False)
        if plain.l2_sensitivity / (plain.scale * clipping_norm) <= ROTATE_ABOVE:
            return plain
        rotated = cls._fit(clipping_norm, dimension, noise_multiplier, expected_users, dropout_margin, rotate=True,
                           rotation_seed=rotation_seed)  # fmt: skip
        better = rotated.l2_sensitivity / rotated.scale < plain.l2_sensitivity / plain.scale
        return rotated if better else plain

    @classmethod
    def _fit(cls, clipping_norm: float, dimension: int, noise_multiplier: float, expected_users: int,
             dropout_margin: float, rotate: bool, rotation_seed: int = 0) -> SkellamPlan:  # fmt: skip
        if clipping_norm <= 0 or noise_multiplier <= 0:
            raise ValueError("distributed DP needs clipping-norm > 0 and noise (noise-multiplier or target-epsilon)")
        padded = 1 << max(0, (dimension - 1).bit_length()) if rotate else 0
        coords = padded or dimension
        # Rotated, a coordinate of a sum of norm ≤ n·C is ~ N(0, (n·C)²/D): this many of its deviations.
        spread_of_sum = math.sqrt(2 * math.log(2 * coords / WRAP_CHANCE)) / math.sqrt(coords) if rotate else 1.0
        m = max(1, int(expected_users))
        n_min = max(2, math.floor((1 - dropout_margin) * m))
        n_max = m + math.ceil(FIT_STDDEVS * math.sqrt(m)) + 1  # a Poisson cohort beyond this: ~1e-9
        field = 2 ** math.floor(math.log2((2**MODULUS_BITS - 1) / n_max))
        if field < 2**8:
            raise ValueError(f"distributed DP: a cohort of up to {n_max} devices leaves a field of {field} in SecAgg+'s 32 bits")
        # Every device's update pointing one way sums to at most n_max·C in a coordinate; the
        # noise of n_max devices adds FIT_STDDEVS deviations. Δ2 ≥ s·C, so the fit is solved
        # for s with Δ2/(s·C) (the rounding's inflation) taken from the last s.
        inflation = 1.0
        for _ in range(50):
            spread = n_max * spread_of_sum + FIT_STDDEVS * noise_multiplier * inflation * math.sqrt(n_max / (n_min - 1))
            scale = (field / 2 - 1) / (clipping_norm * spread)
            l2 = _rounded_l2(scale * clipping_norm, coords)
            if abs(l2 / (scale * clipping_norm) - inflation) < 1e-9:
                break
            inflation = l2 / (scale * clipping_norm)
        l1 = min(math.sqrt(coords) * l2, l2**2)
        device_variance = (noise_multiplier * l2) ** 2 / (n_min - 1)
        return cls(clipping_norm, dimension, noise_multiplier, m, n_min, n_max, scale, field, l2, l1, device_variance,
                   rotate, padded, rotation_seed)  # fmt: skip

    # ------------------------------------------------------------ rotation
    def _signs(self) -> np.ndarray:
        return np.random.default_rng([self.rotation_seed, 0x40AD]).integers(0, 2, self.padded) * 2.0 - 1.0

    def rotate(self, x: np.ndarray) -> np.ndarray:
        """H·diag(signs)·x/√D on x padded with zeros to D (orthonormal: norms are kept)."""
        if not self.rotated:
            return x
        y = np.zeros(self.padded)
        y[: x.size] = x
        return _hadamard(y * self._signs()) / math.sqrt(self.padded)

    def unrotate(self, y: np.ndarray) -> np.ndarray:
        if not self.rotated:
            return y
        return (self._signs() * _hadamard(y) / math.sqrt(self.padded))[: self.dimension]

    # ------------------------------------------------------------ device side
    def encode(self, update: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A device's clipped update (flat) as integers in [0, T): scaled, rounded under Δ2, noised, reduced."""
        x = np.asarray(update, dtype=np.float64)
        if x.size != self.dimension:
            raise ValueError(f"distributed DP: the update has {x.size} coordinates, the plan {self.dimension}")
        x = self.rotate(x) * self.scale
        if float(np.linalg.norm(x)) > self.scale * self.clipping_norm * (1 + 1e-6):
            raise ValueError("distributed DP: the update is not clipped to the plan's clipping norm")
        for _ in range(1000):  # conditional randomized rounding: each try passes with prob. ≥ 1 − β
            rounded = _randomized_round(x, rng)
            if float(np.linalg.norm(rounded)) <= self.l2_sensitivity:
                break
        else:
            raise RuntimeError("distributed DP: randomized rounding did not meet its bound in 1000 tries")
        return np.mod(rounded + _skellam(rng, self.device_variance, x.shape), self.field)

    # ------------------------------------------------------------ server side
    def decode(self, summed: np.ndarray) -> np.ndarray:
        """The float sum from the devices' integers summed (in any multiple of T)."""
        centred = np.mod(np.rint(np.asarray(summed, dtype=np.float64)).astype(np.int64), self.field)
        centred = np.where(centred >= self.field // 2, centred - self.field, centred)
        return self.unrotate(centred.astype(np.float64) / self.scale)

    def noise_std(self, survivors: int) -> float:
        """Std of the noise on one coordinate of the decoded sum with `survivors` devices
        (the rotation back is orthonormal: it keeps the noise's variance per coordinate)."""
        return math.sqrt(survivors * self.device_variance) / self.scale

    def rounding_bound(self, survivors: int) -> float:
        """The most one coordinate of the (rotated) sum can be off from rounding: 1/s per
        device; the rotation back keeps the error's norm."""
        return survivors / self.scale

    def to_record(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}

    @classmethod
    def from_record(cls, record: dict) -> SkellamPlan:
        ints = ("dimension", "expected_users", "min_survivors", "max_users", "field", "padded", "rotation_seed")
        kinds = {k: int for k in ints} | {"rotated": lambda v: bool(int(v))}
        return cls(**{k: kinds.get(k, float)(record[k]) for k in cls.__dataclass_fields__ if k in record})


def _randomized_round(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each coordinate up with probability its fractional part, else down: unbiased integers."""
    floor = np.floor(x)
    return (floor + (rng.random(x.shape) < x - floor)).astype(np.int64)


def _skellam(rng: np.random.Generator, variance: float, shape: tuple[int, ...]) -> np.ndarray:
    """Skellam noise Poisson(μ/2) − Poisson(μ/2), of variance μ per coordinate."""
    return rng.poisson(variance / 2, shape) - rng.poisson(variance / 2, shape)


def _hadamard(x: np.ndarray) -> np.ndarray:
    """The unnormalized Walsh–Hadamard transform of a power-of-two-long vector, O(D log D)."""
    y = x.copy()
    h = 1
    while h < y.size:
        pairs = y.reshape(-1, 2, h)
        y = np.concatenate([pairs[:, 0] + pairs[:, 1], pairs[:, 0] - pairs[:, 1]], axis=1).reshape(-1)
        h *= 2
    return y


def _rounded_l2(norm: float, dimension: int, beta: float = ROUNDING_BETA) -> float:
    """The norm bound conditional randomized rounding enforces (Kairouz, Liu & Steinke 2021, Thm 1)."""
    d = float(dimension)
    return math.sqrt(norm**2 + d / 4 + math.sqrt(2 * math.log(1 / beta)) * (norm + math.sqrt(d) / 2))


# ---------------------------------------------------------------- accounting
def skellam_rdp(order: int, noise_multiplier: float, l2: float, l1: float) -> float:
    """RDP of the Skellam mechanism with variance μ = (z·Δ2)² per coordinate (Agarwal et al. 2021)."""
    mu = (noise_multiplier * l2) ** 2
    return order * l2**2 / (2 * mu) + min(((2 * order - 1) * l2**2 + 6 * l1) / (4 * mu**2), 3 * l1 / (2 * mu))


def subsampled_rdp(order: int, q: float, rdp: Callable[[int], float]) -> float:
    """RDP of a mechanism run on a Poisson sample of rate q (Zhu & Wang 2019, general upper bound)."""
    if q >= 1:
        return rdp(order)
    a = order
    terms = [math.log1p(-q) * (a - 1) + math.log(a * q - q + 1),
             float(gammaln(a + 1) - gammaln(3) - gammaln(a - 1)) + 2 * math.log(q) + (a - 2) * math.log1p(-q) + rdp(2)]  # fmt: skip
    ls = np.arange(3, a + 1)
    if len(ls):
        eps = np.array([rdp(int(l)) for l in ls])
        comb = gammaln(a + 1) - gammaln(ls + 1) - gammaln(a - ls + 1)
        terms += list(math.log(3) + comb + (a - ls) * math.log1p(-q) + ls * math.log(q) + (ls - 1) * eps)
    return min(float(logsumexp(terms)) / (a - 1), rdp(order))


class SkellamAccountant(UserLevelAccountant):
    """The ledger of a distributed Skellam run: same rounds, Skellam RDP composition."""

    kind = "skellam-rdp"
    samplings = ("poisson", "all")  # q < 1 amplifies by Poisson sampling; q = 1: every user in every round

    def __init__(self, sampling: str, population: int, delta: float, l2: float, l1: float) -> None:
        super().__init__(sampling, population, delta)
        self.l2, self.l1 = l2, l1

    def round_rdp(self, q: float, z: float) -> np.ndarray:
        return np.array([subsampled_rdp(a, q, lambda o: skellam_rdp(o, z, self.l2, self.l1)) for a in ORDERS])

    def _compose(self, groups):
        total = sum(self.round_rdp(q, z) * n for (q, z, _m), n in groups)
        return float(rdp_privacy_accountant.compute_epsilon(ORDERS, total, self.delta)[0])

    def epsilon_unamplified(self, z: float, rounds: int) -> float:
        """ε after a user took part in `rounds` rounds, seen by whoever knows the cohorts (the server)."""
        return self._compose([((1.0, z, 0), rounds)])

    def to_dict(self) -> dict:
        return super().to_dict() | {"l2_sensitivity": self.l2, "l1_sensitivity": self.l1}


class DistributedSkellam:
    """The mechanism of noise-placement=devices, on the server: decode, normalize, account.

    In Flower's device placement with SecAgg+ the devices encode (`clients.handlers`) and
    the port hands over the field sum (`UpdateSum.encoded`). Elsewhere (cohort placement,
    in-process runs) the clean sum is encoded here as its devices would have: rounded once at
    scale s (rotated where the plan says), then the survivors' Skellam noise and the other
    devices' roundings as a rounded Gaussian of their average variance ((n − 1)/6 per
    coordinate), drawn from the run's seed: the accuracy of the real mechanism.
    """

    enabled = True

    def __init__(self, plan: SkellamPlan, q: float, accountant: SkellamAccountant, seed: int,
                 log: Callable[[str], None] = print) -> None:  # fmt: skip
        self.plan, self.q, self.accountant, self.seed, self.log = plan, q, accountant, seed, log
        self.clipping_norm = plan.clipping_norm
        self.noise_multiplier = plan.noise_multiplier
        self.refused = 0  # rounds with fewer survivors than the plan needs: not unmasked
        self.max_rounding = 0.0

    @property
    def delta(self) -> float:
        return self.accountant.delta

    def event(self, round_: int) -> RoundEvent:
        return RoundEvent(round_, self.q, self.noise_multiplier, self.clipping_norm, self.plan.expected_users)

    def privatize(self, total: UpdateSum, template: AdapterState, round_: int) -> AdapterState | None:
        survivors = total.num_users
        self.accountant.record(self.event(round_))  # charged whether or not the round is released
        if survivors < self.plan.min_survivors:
            self.refused += 1
            arrived = survivors + total.rejected.get(TOO_FEW, 0)
            self.log(f"round {round_}: {arrived} devices' noisy updates arrived, fewer than the {self.plan.min_survivors} "
                     "the guarantee needs; the sum is not unmasked and nothing is released this round")  # fmt: skip
            return None
        keys = sorted(template) if not total.delta else list(total.delta)
        if total.encoded:
            flat = np.concatenate([total.delta[k].double().numpy().ravel() for k in keys])
            decoded = self.plan.decode(flat)
        else:
            decoded = self._simulate(total, template, keys, round_, survivors)
        self.max_rounding = max(self.max_rounding, self.plan.rounding_bound(survivors))
        out, at = {}, 0
        for k in keys:
            n = template[k].numel()
            out[k] = torch.from_numpy(decoded[at : at + n] / self.plan.expected_users).reshape(template[k].shape).to(torch.float32)
            at += n
        return out

    def _simulate(self, total: UpdateSum, template: AdapterState, keys: list[str], round_: int, survivors: int) -> np.ndarray:
        summed = total.delta or {k: torch.zeros_like(v) for k, v in template.items()}
        x = self.plan.rotate(np.concatenate([summed[k].double().numpy().ravel() for k in keys])) * self.plan.scale
        rng = np.random.default_rng(noise_seed(self.seed, round_))
        noised = _randomized_round(x, rng) + _skellam(rng, survivors * self.plan.device_variance, x.shape)
        # The other survivors' own roundings: each adds p(1 − p) per coordinate, 1/6 on average
        # over a uniform fractional part; drawn together, as a rounded Gaussian.
        others = np.rint(rng.normal(0.0, math.sqrt(max(survivors - 1, 0) / 6), x.shape)).astype(np.int64)
        return self.plan.decode(np.mod(noised + others, self.plan.field))

    def would_exceed(self, round_: int, max_epsilon: float) -> bool:
        return bool(max_epsilon and self.accountant.epsilon([*self.accountant.events, self.event(round_)]) > max_epsilon)

    def prepare(self, rounds: range) -> None:
        pass  # RDP composes in milliseconds

    def report(self, dimension: int) -> PrivacyReport:
        return PrivacyReport(self.accountant.spent, self.delta, self.noise_multiplier, self.q,
                             self.noise_on_mean(dimension, 1))  # fmt: skip

    def privacy_record(self) -> dict:
        p = self.plan
        rounds = len(self.accountant.events)
        expected = max(1, math.ceil(self.q * rounds))
        return self.accountant.to_dict() | {
            "mechanism": "distributed-skellam",
            "noise_placement": "devices",
            "plan": p.to_record(),
            "assumes": ("the noise of at least min_survivors - 1 other devices protects a user (own noise not "
                        "counted); rounds with fewer survivors are not unmasked but are charged; Poisson sampling "
                        "hidden from whoever sees the released model"),  # fmt: skip
            "refused_rounds": self.refused,
            "rounding_bound_per_coordinate": self.max_rounding,
            # At the expected cohort, in units of the sum: rounding's spread (≤ √(m/4)/s) against the noise's
            "rounding_std_bound_on_sum": math.sqrt(p.expected_users / 4) / p.scale,
            "noise_std_on_sum": p.noise_std(p.expected_users),
            "sensitivity_inflation": p.l2_sensitivity / (p.scale * p.clipping_norm),
            "server_view": {
                "note": "the server draws the cohorts, so no sampling amplifies against it: epsilon after k rounds taken part in",
                "epsilon_after_1_round": self.accountant.epsilon_unamplified(self.noise_multiplier, 1),
                f"epsilon_after_{expected}_rounds": self.accountant.epsilon_unamplified(self.noise_multiplier, expected),
            },
        }

    def noise_on_mean(self, dimension: int, round_: int) -> float:
        # In units of C: the expected cohort's noise (more than the guaranteed share) on the mean.
        return self.plan.noise_std(self.plan.expected_users) * math.sqrt(dimension) / self.plan.expected_users / self.clipping_norm

    def noise_on_sum(self, dimension: int, round_: int) -> float:
        return self.noise_on_mean(dimension, round_) * math.sqrt(max(round_, 1))

    def state_dict(self) -> dict:
        return {"clipping_norm": self.clipping_norm, "noise_multiplier": self.noise_multiplier,
                "accountant": self.accountant.to_dict(), "refused": self.refused, "max_rounding": self.max_rounding}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.noise_multiplier = float(state["noise_multiplier"])
        self.accountant.load_state_dict(state["accountant"])
        self.refused, self.max_rounding = int(state.get("refused", 0)), float(state.get("max_rounding", 0.0))


def distributed_skellam(
    *, noise_multiplier: float, target_epsilon: float, rounds: int, clipping_norm: float, q: float,
    expected_users: int, population: int, delta: float, dimension: int, dropout_margin: float, seed: int,
    log: Callable[[str], None] = print,
) -> DistributedSkellam:  # fmt: skip
    """The mechanism with z given, or calibrated on the Skellam accountant for `target_epsilon`."""

    def plan_for(z: float) -> SkellamPlan:
        return SkellamPlan.make(clipping_norm, dimension, z, expected_users, dropout_margin, rotation_seed=seed)

    def accountant_for(plan: SkellamPlan) -> SkellamAccountant:
        return SkellamAccountant("poisson" if q < 1 else "all", population, delta, plan.l2_sensitivity, plan.l1_sensitivity)

    if target_epsilon > 0:
        def fits(z: float) -> bool:
            plan = plan_for(z)
            return accountant_for(plan).epsilon([RoundEvent(1, q, z, clipping_norm, expected_users)] * rounds) <= target_epsilon

        if not fits(500.0):
            raise ValueError(f"target-epsilon {target_epsilon} is out of reach within noise multiplier 500")
        noise_multiplier = _bisect(fits, 0.05, 500.0)[1]
        log(f"privacy: noise multiplier {noise_multiplier:.4f} calibrated for ε={target_epsilon} at δ={delta:.3g} "
            f"after {rounds} rounds (distributed Skellam, RDP)")  # fmt: skip
    plan = plan_for(noise_multiplier)
    mech = DistributedSkellam(plan, q, accountant_for(plan), seed, log)
    log(f"privacy: distributed DP on the devices (Skellam under SecAgg+), {'Poisson sampling' if q < 1 else 'every user'} "
        f"q={q:.4g}, z={noise_multiplier:.4g}, "
        f"C={clipping_norm}, δ={delta:.3g}; field 2^{int(math.log2(plan.field))}, scale {plan.scale:.4g}, "
        + (f"randomized Hadamard rotation to {plan.padded} coordinates, " if plan.rotated else "")
        + f"sensitivity ×{plan.l2_sensitivity / (plan.scale * clipping_norm):.4f} from rounding; each device adds "
        f"variance {plan.device_variance:.4g} so that {plan.min_survivors - 1} others cover a user "
        f"(at least {plan.min_survivors} of ~{plan.expected_users} must report)")  # fmt: skip
    return mech
