"""`dlma recipes`: the named whole-run configurations `dlma run --recipe NAME` starts from."""

from __future__ import annotations

from .common import formatter

HELP = """\
List the recipes shipped with dlma: whole `dlma run` configurations, each for a kind of run.
`dlma run --recipe NAME` starts from one (`--print-config` shows every setting it makes), and so
do the stage commands (`dlma train --recipe NAME ...`), which then run that stage as the recipe's
`dlma run` would. `dlma run` with no --recipe is the first one listed.
"""


def register(sub) -> None:
    p = sub.add_parser("recipes", help="list the named run configurations (dlma run --recipe NAME)", description=HELP,
                       formatter_class=formatter)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..recipes import DEFAULT, load_recipe, recipe_names

    for name in recipe_names():
        cfg = load_recipe(name)
        print(f"{name}{' (default)' if name == DEFAULT else ''}")
        print(f"    {cfg.description}")
        print(f"    model {cfg.model.model}; prompts {cfg.generate.prompts or '(yours: --prompts)'}; "
              f"preset {cfg.generate.preset or '(yours: --preset)'}; evaluated on {cfg.evaluate.prompts or '(yours: --eval-prompts)'}")
    return 0
