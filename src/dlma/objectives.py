"""The training objectives and the methods that use them, in one registry.

Each objective says what it needs: which responses of a record it scores (the chosen one, the
pair, or all ranked best-of-K responses), whether it reads the self-reward R, whether it needs
reference log-probs, and which extra terms it takes (the NLL term on the chosen response, that
term over the whole chosen response where the pair loss is cut to openings, the KL term that
holds the untouched model's answers). The trainer, the config checks, `dlma run --method` and
the help texts all read this module, so adding a loss is one `register(Objective(...))` and one
pure function `(LossBatch, LossSettings) -> PairLoss` (see `dlma.losses`).

Kept free of torch so that `dlma --help` and configuration checks stay instant; the loss
function is imported when training resolves it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from .errors import DlmaError

RESPONSES = ("chosen", "pair", "ranked")
TERMS = ("nll", "nll_whole", "kl")


@dataclass(frozen=True)
class Objective:
    """One `--loss`: its pure function and what it needs."""

    name: str
    function: str | Callable[..., Any]  # "module:attribute" of a (LossBatch, LossSettings) -> PairLoss, or the function
    summary: str
    responses: str = "pair"  # chosen: o+ only; pair: o+ and o-; ranked: all 2K responses of a best-of-K record, best first
    uses_reward: bool = False  # reads each record's self-reward R
    reference: bool = True  # needs reference log-probs of its responses
    terms: frozenset[str] = frozenset(TERMS)  # extra terms it accepts (rpo_alpha, rpo_whole, kl_alpha)
    method: str | None = None  # the `dlma run --method` that trains with it
    judge: str | None = "self-reward"  # how that method scores its pairs (None: it scores nothing)
    selects_by_reward: bool | None = None  # that method drops/flips pairs by R (min_reward, ...); default: uses_reward

    def __post_init__(self) -> None:
        if self.responses not in RESPONSES:
            raise ValueError(f"objective {self.name}: responses must be one of {RESPONSES}")
        if set(self.terms) - set(TERMS):
            raise ValueError(f"objective {self.name}: unknown terms {sorted(set(self.terms) - set(TERMS))}")

    def resolve(self) -> Callable[..., Any]:
        """The loss function itself (imports its module the first time)."""
        if callable(self.function):
            return self.function
        module, _, attr = self.function.partition(":")
        return getattr(importlib.import_module(module), attr)

    def takes(self, term: str) -> bool:
        return term in self.terms


@dataclass(frozen=True)
class Method:
    """One `dlma run --method`: how its pairs are scored and oriented, and the objective it trains."""

    name: str
    loss: str
    judge: str | None  # self-reward, text, or None (no scoring stage)
    orient: str | None = None  # a field whose sign re-orients each pair before training (RLAIF's text judge)
    summary: str = ""
    selects_by_reward: bool = False  # the R-based pair selection (min_reward, flip_negative, reward_norm, shuffle_reward) applies


_OBJECTIVES: dict[str, Objective] = {}
_METHODS: dict[str, Method] = {}  # methods that are not one objective's own (RLAIF: another judge, the dpo loss)


def register(obj: Objective) -> Objective:
    """Add (or replace) an objective; its `method`, if any, becomes a `dlma run --method`."""
    _OBJECTIVES[obj.name] = obj
    return obj


def register_method(m: Method) -> Method:
    """Add a method that trains an existing objective with another judge or orientation."""
    _METHODS[m.name] = m
    return m


def objective(name: str) -> Objective:
    try:
        return _OBJECTIVES[name]
    except KeyError:
        raise DlmaError(f"loss (--loss) must be one of {', '.join(_OBJECTIVES)}, got {name!r}") from None


def objectives() -> dict[str, Objective]:
    return dict(_OBJECTIVES)


def methods() -> dict[str, Method]:
    """Every `dlma run --method`: each objective's own, then the registered extras."""
    own = {o.method: Method(o.method, o.name, o.judge, None, o.summary,
                            o.uses_reward if o.selects_by_reward is None else o.selects_by_reward)
           for o in _OBJECTIVES.values() if o.method}
    return {**own, **_METHODS}


def method(name: str) -> Method:
    all_methods = methods()
    try:
        return all_methods[name]
    except KeyError:
        raise DlmaError(f"unknown method {name!r}; available: {', '.join(all_methods)}") from None


def loss_help() -> str:
    return "objective: " + "; ".join(f"{o.name} ({o.summary})" for o in _OBJECTIVES.values())


def method_help() -> str:
    return "; ".join(f"{m.name} ({m.summary or 'loss ' + m.loss})" for m in methods().values())


register(Objective("dlma", "dlma.losses:dlma", "DPO shifted by w * clamp(R): the paper's loss", uses_reward=True,
                   method="dlma"))
register(Objective("dpo", "dlma.losses:dpo", "plain DPO; on contrastive pairs the RLCD baseline, on human labels the "
                   "upper reference", method="rlcd"))
register(Objective("ipo", "dlma.losses:ipo", "IPO: squared distance of the log-ratio gap from 1/(2 beta)"))
register(Objective("sft", "dlma.losses:sft", "context distillation: NLL of the chosen response", responses="chosen",
                   reference=False, terms=frozenset(), method="context-distillation", judge=None))
register(Objective("listwise", "dlma.losses:listwise", "Plackett-Luce over all 2K responses of a --num-samples K "
                   "record, ranked by their self-reward log-ratio, shifted by w as dlma", responses="ranked",
                   terms=frozenset({"nll", "kl"}), method="dlma-listwise", selects_by_reward=True))
register_method(Method("rlaif", "dpo", "text", "judge_score",
                       "the same model labels each pair by answering 'which is better, A or B?', then DPO"))
