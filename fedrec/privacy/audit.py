"""An empirical check that a run's noise matches its accounting: canary clients.

The ε a run prints is computed from the mechanism it is meant to run; a bug in sampling,
clipping, the noise scale or the server step would leave that number unchanged. Canaries
measure what the trained model actually reveals:

- `CanarySet`: M extra clients. Each is included in the population independently with
  probability ½; an included one, whenever the cohort sampler draws it, sends a fixed
  random unit direction (seeded per canary) scaled to the round's clip C, over the whole
  space of what users send. It goes through the same sampling, clipping, noise and server
  step as real users and is never evaluated.
- After the run, each canary is scored by the cosine between the model's total change and
  its direction. Two readings of those scores:
  - `one_run_lower_bound`: Steinke, Nasr and Jagielski (NeurIPS 2023, "Privacy Auditing with
    One (1) Training Run"): guess in/out for the highest and lowest scores; the number of
    right guesses gives a p-value under (ε, δ)-DP (their Theorem 5.2), and the largest ε
    that the guesses reject at 95% confidence is a lower bound on the run's true ε.
  - `one_shot_estimate`: Andrew et al. (ICLR 2024, "One-shot Empirical Privacy Estimation
    for Federated Learning"): the cosines of unseen directions are ≈ N(0, 1/d); the
    included canaries' cosines, fitted by a Gaussian, are shifted from it; the ε that
    separates the two Gaussians at the run's δ is the estimate (an estimate, not a bound).

Written here from the papers' statements (scipy for the binomial and normal laws).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fedrec.aggregate import UpdateSum
from fedrec.model.types import AdapterState
from fedrec.privacy.clipping import clip_update

CANARY_ID_BASE = 1 << 40  # canary ids sit far above any user index
_TAG = 0xCA4A
EPSILON_CAP = 60.0  # the searches stop here: beyond it the reported value reads "at least"
CONFIDENCE = 0.95
# Guesses per side tried by the one-run bound (each capped at M/2); the confidence is split
# over them (Bonferroni), so trying several does not inflate the bound.
GUESS_COUNTS = (5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


@dataclass
class CanarySet:
    """M canary clients over an adapter's layout; every draw comes from (seed, canary)."""

    count: int
    seed: int
    shapes: dict[str, tuple[int, ...]]  # what users send, key → shape

    def __post_init__(self) -> None:
        rng = np.random.default_rng([self.seed, _TAG])
        self.included = rng.random(self.count) < 0.5
        self.ids = CANARY_ID_BASE + np.arange(self.count, dtype=np.int64)
        self.keys = sorted(self.shapes)
        self.dimension = int(sum(math.prod(self.shapes[k]) for k in self.keys))

    @classmethod
    def for_adapter(cls, count: int, seed: int, template: AdapterState) -> CanarySet:
        return cls(count, seed, {k: tuple(v.shape) for k, v in template.items()})

    @property
    def included_ids(self) -> np.ndarray:
        return self.ids[self.included]

    def direction(self, index: int) -> torch.Tensor:
        """Canary `index`'s unit direction, flat, float64."""
        state = np.random.SeedSequence([self.seed, int(index), _TAG]).generate_state(1)[0]
        g = torch.randn(self.dimension, generator=torch.Generator().manual_seed(int(state)), dtype=torch.float64)
        return g / g.norm()

    def update_sum(self, ids: np.ndarray, clipping_norm: float) -> UpdateSum:
        """The drawn canaries' updates, each C·u clipped to C like a user's, summed."""
        total = UpdateSum()
        for cid in np.asarray(ids, dtype=np.int64):
            update = self.unflatten(self.direction(int(cid - CANARY_ID_BASE)) * clipping_norm)
            clipped, norm = clip_update(update, clipping_norm)
            total.add_user(clipped, 1.0, 0.0, norm, False)
        return total

    def unflatten(self, flat: torch.Tensor) -> AdapterState:
        out, at = {}, 0
        for k in self.keys:
            n = math.prod(self.shapes[k])
            out[k] = flat[at : at + n].reshape(self.shapes[k]).to(torch.float32)
            at += n
        return out

    def flatten(self, state: AdapterState) -> torch.Tensor:
        return torch.cat([state[k].detach().reshape(-1).to(torch.float64) for k in self.keys])

    def scores(self, change: AdapterState) -> np.ndarray:
        """Cosine of the model's change with every canary's direction."""
        flat = self.flatten(change)
        norm = float(flat.norm())
        if norm == 0:
            return np.zeros(self.count)
        return np.array([float(self.direction(i) @ flat) / norm for i in range(self.count)])


def audit_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[at least v of r guesses right] under (ε, δ)-DP with m canaries each included with
    probability ½ (Steinke et al. 2023, Thm. 5.2):
    f(v) + 2mδ·max_i (f(v−i) − f(v))/i, with f(v) = P[Binomial(r, e^ε/(1+e^ε)) ≥ v]."""
    from scipy import special, stats  # here, not at import: every run imports this module, few audit

    p = float(special.expit(epsilon))
    tail = float(stats.binom.sf(v - 1, r, p))
    if v <= 0 or delta <= 0:
        return min(1.0, tail)
    below = stats.binom.pmf(np.arange(v - 1, -1, -1), r, p)  # P[Bin = v−1], P[Bin = v−2], ...
    slope = float(np.max(np.cumsum(below) / np.arange(1, v + 1)))
    return min(1.0, tail + 2 * m * delta * slope)


def _largest_rejected(p_value, alpha: float) -> float:
    """sup{ε ≥ 0: p_value(ε) ≤ alpha}, for p_value increasing in ε (0 when none is)."""
    if p_value(0.0) > alpha:
        return 0.0
    if p_value(EPSILON_CAP) <= alpha:
        return EPSILON_CAP
    lo, hi = 0.0, EPSILON_CAP
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p_value(mid) <= alpha else (lo, mid)
    return lo


def one_run_lower_bound(scores: np.ndarray, included: np.ndarray, delta: float,
                        confidence: float = CONFIDENCE) -> dict:  # fmt: skip
    """The largest ε the canaries' guesses reject, over the guess counts tried."""
    m = len(scores)
    order = np.argsort(scores, kind="stable")
    counts = [k for k in GUESS_COUNTS if 2 * k <= m] or ([m // 2] if m >= 2 else [])
    alpha = (1 - confidence) / max(len(counts), 1)
    best = {"epsilon": 0.0, "guesses": 0, "correct": 0}
    tried = []
    for k in counts:
        guessed_in, guessed_out = order[-k:], order[:k]
        v = int(included[guessed_in].sum() + (~included[guessed_out]).sum())
        eps = _largest_rejected(lambda e, r=2 * k, v=v: audit_p_value(m, r, v, e, delta), alpha)
        tried.append({"guesses": 2 * k, "correct": v, "epsilon": eps})
        if eps > best["epsilon"] or not best["guesses"]:
            best = {"epsilon": eps, "guesses": 2 * k, "correct": v}
    # The most all-correct guesses could show (k per side cannot pass the smaller side):
    # the bound's ceiling with these canaries, whatever the run.
    sides = min(int(included.sum()), int((~included).sum()))
    top = max([k for k in counts if k <= sides], default=0)
    ceiling = _largest_rejected(lambda e: audit_p_value(m, 2 * top, 2 * top, e, delta), alpha) if top else 0.0
    return {"method": "Steinke, Nasr, Jagielski 2023 (one run)", "confidence": confidence, "delta": delta,
            "epsilon_lower_bound": best["epsilon"], "guesses": best["guesses"], "correct": best["correct"],
            "ceiling": ceiling, "tried": tried}  # fmt: skip


def gaussian_pair_delta(epsilon: float, mu: float, sigma: float, sigma0: float) -> float:
    """The (ε, δ) curve of telling N(0, σ0²) from N(μ, σ²), both directions: the largest
    hockey-stick divergence, computed exactly on the intervals where the log-likelihood
    ratio exceeds ε (a quadratic in x)."""
    return max(_hockey_stick(epsilon, (mu, sigma), (0.0, sigma0)), _hockey_stick(epsilon, (0.0, sigma0), (mu, sigma)))


def _hockey_stick(epsilon: float, p: tuple[float, float], q: tuple[float, float]) -> float:
    """∫ max(0, P − e^ε Q) for 1-D Gaussians P, Q."""
    (m1, s1), (m2, s2) = p, q
    # log p(x) − log q(x) − ε = a x² + b x + c
    a = 1 / (2 * s2**2) - 1 / (2 * s1**2)
    b = m1 / s1**2 - m2 / s2**2
    c = m2**2 / (2 * s2**2) - m1**2 / (2 * s1**2) + math.log(s2 / s1) - epsilon
    if abs(a) < 1e-12 * max(1 / s1**2, 1 / s2**2):
        if b == 0:
            intervals = [(-math.inf, math.inf)] if c > 0 else []
        else:
            root = -c / b
            intervals = [(root, math.inf)] if b > 0 else [(-math.inf, root)]
    else:
        disc = b * b - 4 * a * c
        if disc <= 0:
            intervals = [(-math.inf, math.inf)] if a > 0 else []
        else:
            r1, r2 = sorted(((-b - math.sqrt(disc)) / (2 * a), (-b + math.sqrt(disc)) / (2 * a)))
            intervals = [(-math.inf, r1), (r2, math.inf)] if a > 0 else [(r1, r2)]

    from scipy import special

    def mass(mean: float, sd: float, lo: float, hi: float) -> float:
        return float(special.ndtr((hi - mean) / sd) - special.ndtr((lo - mean) / sd))

    total = sum(mass(m1, s1, lo, hi) - math.exp(epsilon) * mass(m2, s2, lo, hi) for lo, hi in intervals)
    return max(0.0, total)


def one_shot_estimate(included_scores: np.ndarray, dimension: int, delta: float,
                      unseen_scores: np.ndarray | None = None) -> dict:  # fmt: skip
    """ε at δ between the null N(0, 1/d) and a Gaussian fitted to the included canaries' cosines."""
    sigma0 = dimension**-0.5
    out = {"method": "Andrew et al. 2024 (one-shot estimate)", "delta": delta, "null_std": sigma0}
    if len(included_scores) < 2:
        return out | {"epsilon_estimate": None, "why": "fewer than 2 included canaries"}
    mu, sigma = float(np.mean(included_scores)), float(np.std(included_scores, ddof=1))
    sigma = max(sigma, 1e-12)
    eps = _largest_rejected(lambda e: -gaussian_pair_delta(e, mu, sigma, sigma0), -delta)
    # _largest_rejected finds sup{ε: −δ(ε) ≤ −δ} = sup{ε: δ(ε) ≥ δ}: the ε at which δ(ε) falls to δ.
    out |= {"epsilon_estimate": eps, "at_cap": eps >= EPSILON_CAP, "included_mean": mu, "included_std": sigma,
            "shift_in_null_stds": mu / sigma0}  # fmt: skip
    if unseen_scores is not None and len(unseen_scores) > 1:
        out |= {"unseen_mean": float(np.mean(unseen_scores)), "unseen_std": float(np.std(unseen_scores, ddof=1))}
    return out


def audit(canaries: CanarySet, change: AdapterState, delta: float, claimed_epsilon: float | None) -> dict:
    """Both estimators on a finished run's total change; the record `audit.json` holds."""
    scores = canaries.scores(change)
    inc = canaries.included
    bound = one_run_lower_bound(scores, inc, delta)
    estimate = one_shot_estimate(scores[inc], canaries.dimension, delta, scores[~inc])
    return {
        "canaries": canaries.count,
        "included": int(inc.sum()),
        "dimension": canaries.dimension,
        "delta": delta,
        "claimed_epsilon": claimed_epsilon,
        "epsilon_lower_bound": bound["epsilon_lower_bound"],
        "epsilon_estimate": estimate["epsilon_estimate"],
        "one_run": bound,
        "one_shot": estimate,
        "scores": [round(float(s), 8) for s in scores],
        "included_mask": [bool(b) for b in inc],
    }
