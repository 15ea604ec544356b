"""Which pairs carry the extra training terms: the NLL term on o+ (`rpo_alpha`) and the KL term
that holds the untouched model's answers (`kl_alpha`).

A term is attached to presets by name (`rpo_presets`, `kl_presets`) or by the role a preset
declares (`rpo_roles`, `kl_roles`; `role:` in a preset, `dlma.prompts.ROLES`). By role, the
shipped terms find the presets whose p+ keeps the model's own answers (`retain`) in any run,
whatever a user's presets are called. Kept free of torch: `dlma run` checks its configuration
with these rules before any model loads, and the trainer applies the same ones to its pairs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from .errors import DlmaError
from .prompts import load_preset

if TYPE_CHECKING:
    from .config import TrainConfig


def role_terms(cfg: TrainConfig, roles: dict[str, str]) -> tuple[TrainConfig, list[str]]:
    """The terms' presets once roles are read: the presets among `roles` ({preset: its role}, the
    presets of the pairs) whose role --rpo-roles / --kl-roles names join --rpo-presets / --kl-presets.
    A term named by roles alone that no preset has is switched off rather than spread over every
    pair, so the shipped terms meant for `retain` presets stay off in a run without one. Returns the
    settings to train with and a note per term switched off."""
    changes: dict = {}
    notes = []
    for term, alpha, named, wanted, _ in TERMS:
        want = getattr(cfg, wanted)
        if not want or not getattr(cfg, alpha):
            continue
        members = [p for p, role in sorted(roles.items()) if role in want and p not in getattr(cfg, named)]
        presets = [*getattr(cfg, named), *members]
        if presets:
            changes[named] = presets
        else:
            changes[alpha] = 0.0
            notes.append(f"the {term} term ({alpha}) applies to presets of role {', '.join(want)}; none of "
                         f"{', '.join(sorted(roles)) or 'the presets'} declares it, so the term is off")
    return dataclasses.replace(cfg, **changes), notes


def preset_roles(presets: Iterable[str | None]) -> dict[str, str]:
    """{preset: the role it declares} for the presets pairs name (bundled names or YAML paths; a pair
    of no preset has none to attach a term to)."""
    return {p: load_preset(p).role for p in presets if p is not None}


def nll_on(cfg: TrainConfig, preset: str | None) -> bool:
    """Whether a pair of `preset` carries the NLL term (--rpo-presets; every pair where none are named)."""
    return not cfg.rpo_presets or preset in cfg.rpo_presets


def kl_on(cfg: TrainConfig, preset: str | None) -> bool:
    """Whether a pair of `preset` carries the KL term (--kl-presets; every pair where none are named)."""
    return not cfg.kl_presets or preset in cfg.kl_presets


# Each term: its name, its weight, the presets and the roles it is attached to, and whether a pair carries it.
TERMS = (("NLL", "rpo_alpha", "rpo_presets", "rpo_roles", nll_on), ("KL", "kl_alpha", "kl_presets", "kl_roles", kl_on))


def check_presets_named(have: Iterable[str | None], where: str, setting: str, named: list[str], term: str,
                        on: Callable[[str | None], bool]) -> None:
    """A term limited to presets (`on`: the term's own test) that none of `have` is would silently
    be off: say so instead (`setting`: how the user named them)."""
    have = set(have)
    if named and not any(on(p) for p in have):
        raise DlmaError(f"{setting} {','.join(named)} names no preset of {where} (they are: "
                        f"{', '.join(sorted(map(str, have)))}), so the {term} term would be off; name one of theirs")
