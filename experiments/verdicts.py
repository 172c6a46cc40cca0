"""Verdicts: the paper's own numbers, and the rules that turn this run's measurements into a verdict on
one of its claims (agrees, disagrees, partly, inconclusive, not measured). The results page's summary
table lists one Verdict per claim tested.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Mapping, Sequence

# the paper's numbers (ADE20K; docs/method.md, section 5)
PAPER_SAMPLING = {1: 43.47, 2: 45.85, 5: 46.82, 10: 47.1, 20: 46.78, 50: 46.13, 100: 45.78}  # mIoU by Euler steps
PAPER_SPEEDUP = 2.0  # reshaped reaches vanilla's final mIoU about 2x sooner
PAPER_ONE_STEP_SHARE = PAPER_SAMPLING[1] / PAPER_SAMPLING[10]
# "about 92%": within 5 points of it; a 1-step result above 10 steps is not what the paper reports
ONE_STEP_TOLERANCE = 0.05


@dataclass
class Verdict:
    claim: str       # the paper's claim, in words
    paper: str       # what the paper reports
    here: str        # what this run measured
    verdict: str


def seed_note(seeds: int) -> str:
    return "" if seeds > 1 else " (1 seed)"


def judge(differences: Sequence[float | None], seeds: int) -> str:
    """Verdict on a claim 'difference > 0' from per-seed differences: agrees / disagrees, or
    inconclusive when the mean lies within two standard errors of 0."""
    values = [d for d in differences if d is not None and math.isfinite(d)]
    if not values:
        return "not measured"
    mean = statistics.mean(values)
    if all(v == 0 for v in values):
        return "no difference" + seed_note(seeds)
    if len(values) > 1:
        standard_error = statistics.stdev(values) / math.sqrt(len(values))
        if abs(mean) <= 2 * standard_error:
            return f"inconclusive (within 2 s.e. over {len(values)} seeds)"
    return ("agrees" if mean > 0 else "disagrees") + seed_note(seeds)


def speed_verdict(speedup: float | None, never: int, at_first: bool) -> str:
    """The ~2x speed-up claim from the speed-up of the seed-averaged curves (None: never reached), the
    count of seeds whose own curve never reached vanilla's final mIoU, and whether the averaged curve
    was there at the first validation."""
    if speedup is None:
        return "disagrees: reshaped never reached vanilla's final mIoU"
    if at_first:
        return "inconclusive: reached at the first validation (validate earlier or train longer)"
    if speedup >= 0.8 * PAPER_SPEEDUP:
        verdict = "agrees"
    else:
        verdict = "partly: faster, by less than the paper's 2x" if speedup > 1 else "disagrees"
    return verdict + (f"; {never} seed(s) never reached it" if never else "")


def measured_order(means: Mapping[str, float]) -> list[str]:
    """Labels by mean, best first; unmeasured (nan) ones last."""
    return sorted(means, key=lambda label: -means[label] if math.isfinite(means[label]) else math.inf)


def order_verdict(means: Mapping[str, float], paper_order: Sequence[str], seeds: int) -> str:
    """The paper's ordering of rows (best first) against the measured mean of each row."""
    order = measured_order(means)
    if len(set(means.values())) == 1:
        verdict = "no difference"
    elif order == list(paper_order):
        verdict = "agrees"
    else:
        verdict = f"partly: {paper_order[0]} is best" if order[0] == paper_order[0] else "disagrees"
    return verdict + seed_note(seeds)


def all_of_verdict(verdicts: Sequence[str]) -> str:
    """One claim made of several comparisons: disagrees if any does, inconclusive if any is unclear."""
    if any(v.startswith("disagrees") for v in verdicts):
        return "disagrees"
    return "agrees" if all(v.startswith("agrees") for v in verdicts) else "inconclusive"


def best_steps_verdict(best: int, claimed: int, gains: Sequence[float], seeds: int) -> str:
    """The claim 'claimed Euler steps are best' when the best mean is at `best` steps, from the per-seed
    gains of `best` over `claimed`: a gain within noise is no evidence against the claim."""
    if best == claimed:
        return "agrees" + seed_note(seeds)
    gain = judge(gains, seeds)  # on the claim "best beats claimed"
    if gain.startswith("agrees"):
        return "disagrees" + seed_note(seeds)
    if gain.startswith("no difference"):
        return "agrees: tied" + seed_note(seeds)
    return gain  # inconclusive: within noise


def one_step_verdict(one_step_share: float) -> str:
    """1 Euler step against the paper's ~92% of the 10-step mIoU."""
    if math.isnan(one_step_share):
        return "not measured"
    return "agrees" if abs(one_step_share - PAPER_ONE_STEP_SHARE) <= ONE_STEP_TOLERANCE else "disagrees"
