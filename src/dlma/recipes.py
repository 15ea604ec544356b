"""Named recipes: whole `dlma run` configurations shipped with dlma.

A recipe is a YAML file in `dlma/configs/` (`safety` is `default.yaml`, the run `dlma run` makes
with no options); `dlma recipes` lists them, `dlma run --recipe NAME` starts from one, and so do
the stage commands (`dlma train --recipe NAME ...`), which then train as the run would. A user's
`--config FILE` is laid over the recipe: keys it leaves out keep the recipe's values.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .config import RunConfig, load_yaml
from .errors import DlmaError

DEFAULT = "safety"
_FILES = {DEFAULT: "default.yaml"}  # the default recipe keeps the file name it has always had


def _path(name: str) -> Path:
    return Path(str(resources.files("dlma.configs").joinpath(_FILES.get(name, f"{name}.yaml"))))


def recipe_names() -> list[str]:
    """The default recipe first, then the others by name."""
    others = sorted(p.name[:-5] for p in resources.files("dlma.configs").iterdir()
                    if p.name.endswith(".yaml") and p.name not in _FILES.values())
    return [DEFAULT, *others]


def load_recipe(name: str = DEFAULT) -> RunConfig:
    if name not in recipe_names():
        raise DlmaError(f"unknown recipe {name!r}; available: {', '.join(recipe_names())} (`dlma recipes` describes them)")
    return load_yaml(RunConfig, str(_path(name)), base=RunConfig())


def base_config(recipe: str | None = None, config: str | None = None) -> RunConfig:
    """A recipe (default: safety), with a user's YAML file laid over it."""
    cfg = load_recipe(recipe or DEFAULT)
    return load_yaml(RunConfig, config, base=cfg) if config else cfg
