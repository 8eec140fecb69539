"""Which objective and language/pair each step trains: a pure function of (seed, step), so resuming needs no RNG state
and every rank draws the same. A step is one objective x one language/pair, as in XLM."""
from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field

import numpy as np

from xlm_core.data.seeds import step_rng
from xlm_core.settings import OBJECTIVES

MONO_OBJECTIVES = ("mlm", "clm")
PARA_OBJECTIVES = ("tlm", "tr")   # drawn over pairs: TLM's concatenation, translation ranking's two encodings


def sampling_probs(token_counts: dict[str, int], alpha: float) -> dict[str, float]:
    """q_i ∝ p_i^alpha with p_i the share of tokens (XLM's multinomial smoothing; alpha=1 keeps the corpus mix)."""
    total = sum(token_counts.values())
    weights = {k: (n / total) ** alpha for k, n in token_counts.items()}
    norm = sum(weights.values())
    return {k: w / norm for k, w in weights.items()}


class _Categorical:
    """Draw a name with probability ∝ its weight from one uniform number (cheaper than Generator.choice)."""

    def __init__(self, weights: dict[str, float]):
        self.names = list(weights)
        self.cumulative = list(itertools.accumulate(weights.values()))

    def pick(self, rng: np.random.Generator) -> str:
        u = rng.random() * self.cumulative[-1]
        return self.names[min(bisect.bisect_right(self.cumulative, u), len(self.names) - 1)]


@dataclass
class StepPlan:
    step: int
    objective: str
    key: str
    rng: np.random.Generator      # the step's RNG after the two draws (TLM directions come from it)


@dataclass
class StepSchedule:
    """Which objective and language/pair each step trains: a pure function of (seed, step)."""

    seed: int
    objective_weights: dict[str, float]          # only objectives with weight > 0
    lang_probs: dict[str, float]                 # MLM/CLM
    pair_probs: dict[str, float] = field(default_factory=dict)   # TLM and translation ranking

    def __post_init__(self):
        objectives = {o: self.objective_weights[o] for o in OBJECTIVES if self.objective_weights.get(o, 0) > 0}
        self._choices = {"objective": _Categorical(objectives), "mono": _Categorical(self.lang_probs),
                         "para": _Categorical(self.pair_probs)}

    def draw(self, step: int) -> StepPlan:
        rng = step_rng(self.seed, step)
        objective = self._choices["objective"].pick(rng)
        key = self._choices["para" if objective in PARA_OBJECTIVES else "mono"].pick(rng)
        return StepPlan(step=step, objective=objective, key=key, rng=rng)
