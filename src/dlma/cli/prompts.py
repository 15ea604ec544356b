"""`dlma prompts`: look at the contrastive prompt pairs before training on them."""

from __future__ import annotations

from ..config import SAMPLING_OF, CheckConfig, ModelConfig, SamplingConfig, add_config_args, config_from_args
from .common import formatter, print_summary

HELP = """\
Contrastive prompt pairs (presets): list them, and check how strongly one makes this model
answer differently under p+ and p- before you spend a training run on it.

  dlma prompts list                 bundled presets and what each is for
  dlma prompts check PRESET         sample one pair per prompt on a few prompts and report
                                    the contrast (see `dlma prompts check --help`)
  dlma prompts search PRESET        try variants of the preset, choose on some prompts, report
                                    on others, write the best as a preset YAML
"""

SEARCH_HELP = """\
Try variants of a preset (as it is; each demonstration set alone; one demonstration instead of
two; instructions only; demonstrations only), check each on the first --limit prompts (the
selection sample) like `dlma prompts check`, and check the best and the preset as it is again
on the next --limit prompts (the report sample). Choosing on one sample and reporting on
another keeps the winner's figure honest: the best of several candidates on one sample looks
better than it is. The metric is the contrast rate (o+ shows the attribute and o- does not, by
the preset's detector); for a preset without a detector, R's accuracy on --pairs (human-labelled
pairs, split in halves the same way).

Files: OUT/search.md (both tables), OUT/search.json, OUT/best.yaml (use it with --preset),
OUT/candidates/*.yaml, and each check's files under OUT/select/ and OUT/report/.

examples:
  dlma prompts search harmless --limit 32
  dlma prompts search helpful --pairs hh-harmless:train --pairs-limit 100
"""

CHECK_HELP = """\
Sample one pair (o+ under p+, o- under p-) for each of the first --limit prompts, score it
with the self-rewarding score R (the same code as `dlma run`), and print one table:

  shows the attribute   answers the preset's text detector counts (harmless: refusals,
                        no-overrefusal: answers that do not refuse), per side
  contrast              pairs whose o+ shows the attribute and o- does not; the pairs
                        training learns from. Low contrast: the model ignores the preset
  R > 0, R agrees       how often R prefers o+, and how often its sign agrees with the
                        detector where the detector tells the two answers apart
  topic leakage         answers repeating words of the demonstrations that their query
                        does not contain (the demonstrations' topics leak into answers)

Rates carry 95% Wilson intervals: with 32 prompts they are wide; raise --limit to narrow them.
--pairs FILE also scores human-labelled pairs and reports R's accuracy on them.
Files: OUT/check.md (the table), check.png (plot), check.json, and the pair files; a rerun
with the same --out reuses the pairs already sampled.

examples:
  dlma prompts check harmless
  dlma prompts check no-overrefusal --limit 64
  dlma prompts check my-preset.yaml --prompts my-prompts.jsonl --pairs hh-harmless:train
"""


def register(sub) -> None:
    p = sub.add_parser("prompts", help="list presets; check a preset's contrast on a few prompts", description=HELP,
                       formatter_class=formatter)
    inner = p.add_subparsers(dest="prompts_command", metavar="ACTION")
    ls = inner.add_parser("list", help="bundled presets", formatter_class=formatter)
    ls.set_defaults(func=run_list)
    for name, helptext, description, func in (
            ("check", "sample and score a few pairs, report the contrast", CHECK_HELP, run_check),
            ("search", "choose the preset variant with the strongest contrast, report it on other prompts", SEARCH_HELP,
             run_search)):
        c = inner.add_parser(name, help=helptext, description=description, formatter_class=formatter)
        c.add_argument("preset", metavar="PRESET", help="bundled preset name or a preset YAML file")
        c.add_argument("--out", help=f"output directory (default: runs/{name}-PRESET)")
        c.add_argument("--no-progress", action="store_true", help="no progress bar")
        add_config_args(c, ModelConfig)
        add_config_args(c, CheckConfig, title="check options" + (" (applied to every candidate)" if name == "search" else ""))
        add_config_args(c, SamplingConfig, only=SAMPLING_OF["check"], title="sampling options (as generation samples)")
        c.set_defaults(func=func)
    p.set_defaults(func=lambda args: p.print_help() or 2)


def run_list(args) -> int:
    from ..detectors import for_preset
    from ..prompts import list_presets, load_preset

    names = list_presets()
    width = max(map(len, names)) + 2  # the longest name keeps two spaces before its description
    for name in names:
        pr = load_preset(name)
        shows = for_preset(pr)
        print(f"{name:{width}s}{pr.description}")
        print(f"{'':{width}s}measured: {shows.description if shows else 'no detector'}; role: {pr.role}")
    return 0


def run_check(args) -> int:
    from pathlib import Path

    from ..contrast import check_preset

    out = args.out or f"runs/check-{Path(args.preset).stem}"
    summary = check_preset(config_from_args(ModelConfig, args), args.preset, config_from_args(CheckConfig, args), out,
                           progress=not args.no_progress, sampling=config_from_args(SamplingConfig, args))
    print((Path(out) / "check.md").read_text(encoding="utf-8").split("\n![")[0])
    print_summary({k: summary[k] for k in ("preset", "prompts", "pairs", "seconds", "files")})
    return 0


def run_search(args) -> int:
    from pathlib import Path

    from ..search import search_preset

    out = args.out or f"runs/search-{Path(args.preset).stem}"
    summary = search_preset(config_from_args(ModelConfig, args), args.preset, config_from_args(CheckConfig, args), out,
                            progress=not args.no_progress, sampling=config_from_args(SamplingConfig, args))
    print((Path(out) / "search.md").read_text(encoding="utf-8"))
    print_summary({k: summary[k] for k in ("preset", "prompts", "per_sample", "chosen", "best_yaml")})
    return 0
