"""Metrics -> metrics.json, report.md and a self-contained index.html with plots.

The HTML embeds its plots as base64 PNGs and its style inline: no script, font or image
is fetched, so it renders offline and can be mailed as one file. The Markdown report
links the same plots, written as PNG files under plots/. Several runs (methods compared
by the pipeline) are shown side by side when `runs` is given.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

from .data import write_json

COLORS = {"win": "#2e7d32", "tie": "#9e9e9e", "lose": "#c62828", "aligned": "#1565c0", "baseline": "#ef6c00"}
ROLES = ("aligned", "baseline")


# -- plots -----------------------------------------------------------------------------
def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display); imported on first use."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig) -> bytes:
    """A figure as PNG bytes (closed afterwards), for embedding in the HTML report."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    pyplot().close(fig)
    return buf.getvalue()


def plot_judges(rows: list[tuple[str, dict]]) -> bytes:
    """Stacked win / tie / lose bars, one per (run, judge); failed items are not in the bars."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 0.55 * len(rows) + 1.2))
    for y, (label, j) in enumerate(rows):
        left = 0.0
        for o in ("win", "tie", "lose"):
            share = (j.get(f"{o}_rate") or 0.0) * 100
            ax.barh(y, share, left=left, color=COLORS[o], label=o if y == 0 else None)
            if share >= 8:
                ax.text(left + share / 2, y, f"{share:.0f}%", ha="center", va="center", color="white", fontsize=9)
            left += share
    ax.set_yticks(range(len(rows)), [label for label, _ in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.axvline(50, color="black", lw=0.8, ls=":")
    ax.set_xlabel("% of judged items (aligned vs baseline)")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False)
    return png_bytes(fig)


def plot_hist(series: dict[str, list[float]], xlabel: str, *, log: bool = False, zero_line: bool = False) -> bytes:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    for name, values in series.items():
        vals = [v for v in values if v is not None and math.isfinite(v) and (v > 0 or not log)]
        if not vals:
            continue
        vals = [math.log10(v) for v in vals] if log else vals
        ax.hist(vals, bins=min(30, max(5, len(vals) // 2)), alpha=0.55, label=f"{name} (n={len(vals)})",
                color=COLORS.get(name))
    if zero_line:
        ax.axvline(0, color="black", lw=0.8, ls=":")
    ax.set_xlabel(f"log10 {xlabel}" if log else xlabel)
    ax.set_ylabel("answers")
    ax.legend(frameon=False)
    return png_bytes(fig)


def plot_training(curves: dict) -> bytes:
    plt = pyplot()
    panels = [f for f in ("loss", "reward_margin", "reward_accuracy", "lr") if any(v is not None for v in curves.get(f) or [])]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 2.8), squeeze=False)
    for ax, f in zip(axes[0], panels):
        pts = [(s, v) for s, v in zip(curves["step"], curves[f]) if v is not None]
        ax.plot([s for s, _ in pts], [v for _, v in pts], color=COLORS["aligned"])
        ax.set_title(f)
        ax.set_xlabel("step")
    fig.tight_layout()
    return png_bytes(fig)


def plot_compare(runs: dict[str, dict]) -> bytes:
    """Per run: adjusted win rate of each judge, refusal rate and over-refusal of the aligned model."""
    plt = pyplot()
    names = list(runs)
    series: dict[str, list[float]] = {}
    for run, m in runs.items():
        for spec, j in (m.get("judges") or {}).items():
            series.setdefault(f"win {spec}", [math.nan] * len(names))[names.index(run)] = 100 * (j.get("adjusted_win_rate") or math.nan)
        ref = (m.get("refusal") or {}).get("aligned") or {}
        for key, label in (("refusal_rate", "refusal (unsafe)"), ("over_refusal_rate", "over-refusal (safe)")):
            if ref.get(key) is not None:
                series.setdefault(label, [math.nan] * len(names))[names.index(run)] = 100 * ref[key]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(names) * max(1, len(series)) / 2), 3.4))
    width = 0.8 / max(len(series), 1)
    for k, (label, vals) in enumerate(series.items()):
        ax.bar([i + k * width for i in range(len(names))], vals, width, label=label)
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(names))], names)
    ax.set_ylabel("%")
    ax.axhline(50, color="black", lw=0.8, ls=":")
    ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return png_bytes(fig)


def plot_phrasings(ph: dict) -> bytes:
    """Refusal of harmful and of harmless requests per phrasing, before and after, with 95% Wilson intervals."""
    plt = pyplot()
    groups = list(ph["phrasings"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4), sharey=False)
    for ax, key, ci_key, title in ((axes[0], "refusal_rate", "refusal_ci", "harmful requests refused (higher is better)"),
                                   (axes[1], "over_refusal_rate", "over_refusal_ci", "harmless requests refused (lower is better)")):
        for k, role in enumerate(("baseline", "aligned")):
            vals, lo, hi = [], [], []
            for g in groups:
                r = ph["rates"][g][role]
                v, ci = r.get(key), r.get(ci_key)
                vals.append(100 * v if v is not None else math.nan)
                lo.append(100 * (v - ci[0]) if ci else 0.0)
                hi.append(100 * (ci[1] - v) if ci else 0.0)
            x = [i + (k - 0.5) * 0.38 for i in range(len(groups))]
            ax.bar(x, vals, 0.38, yerr=[lo, hi], capsize=3, color=COLORS[role], label=role)
            mean = (ph["summary"].get(role) or {}).get(key)
            if mean:
                ax.axhline(100 * mean["mean"], color=COLORS[role], lw=0.8, ls="--")
        ax.set_xticks(range(len(groups)), groups)
        ax.set_ylabel("%")
        ax.set_title(title, fontsize=10)
    axes[0].legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return png_bytes(fig)


def make_plots(metrics: dict, runs: dict[str, dict] | None = None) -> dict[str, tuple[str, bytes]]:
    """name -> (caption, PNG bytes) for every plot the metrics support."""
    plots: dict[str, tuple[str, bytes]] = {}
    rows = []
    for run, m in (runs or {"": metrics}).items():
        for spec, j in (m.get("judges") or {}).items():
            rows.append((f"{run}: {spec}" if run else spec, j))
    if rows:
        plots["judges"] = ("Win / tie / lose of the aligned model against the baseline, per judge "
                           "(failed items excluded; dotted line: 50%)", plot_judges(rows))
    if runs and len(runs) > 1:
        plots["compare"] = ("Methods side by side: adjusted win rate per judge, refusal and over-refusal rates of each "
                            "aligned model", plot_compare(runs))
    if metrics.get("phrasing"):
        plots["phrasing"] = ("The same requests in each phrasing: refusal of harmful and of harmless requests, before "
                             "(baseline) and after (aligned), 95% Wilson intervals; dashed: the mean over phrasings",
                             plot_phrasings(metrics["phrasing"]))
    d = metrics.get("distributions") or {}
    rvals = {k: v for k, v in (("aligned vs baseline", d.get("self_reward")), ("human-labelled pairs", d.get("pairs_self_reward"))) if v}
    if rvals:
        plots["self_reward"] = ("Self-rewarding score R under the base model (R > 0: the first answer is more typical of "
                                "p+; the signal that trains DLMA)", plot_hist(rvals, "R", zero_line=True))
    if all(r in d for r in ROLES):
        plots["lengths"] = ("Answer length in tokens", plot_hist({r: d[r]["tokens"] for r in ROLES}, "tokens"))
        plots["perplexity"] = (f"Perplexity of each answer under the reference model "
                               f"({(metrics.get('models') or {}).get('reference')})",
                               plot_hist({r: d[r]["perplexity"] for r in ROLES}, "perplexity", log=True))
    if metrics.get("training"):
        plots["training"] = ("Training curves from the model directory's metrics.jsonl", plot_training(metrics["training"]))
    return plots


# -- tables ------------------------------------------------------------------------------
def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int,)) and not pct:
        return str(v)
    if isinstance(v, float):
        if pct:
            return f"{100 * v:.1f}%"
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def judge_table(judges: dict) -> tuple[list[str], list[list[str]]]:
    head = ["judge", "win", "tie", "lose", "failed", "win rate", "tie rate", "lose rate", "adjusted win rate ± se", "note"]
    rows = []
    for spec, j in judges.items():
        adj = "–" if j.get("adjusted_win_rate") is None else f"{100 * j['adjusted_win_rate']:.1f}% ± {100 * j['adjusted_win_rate_se']:.1f}"
        rows.append([spec, _fmt(j["win"]), _fmt(j["tie"]), _fmt(j["lose"]), _fmt(j["failed"]), _fmt(j.get("win_rate"), True),
                     _fmt(j.get("tie_rate"), True), _fmt(j.get("lose_rate"), True), adj, j.get("note", "")])
    return head, rows


QUALITY_ROWS = [("perplexity", "perplexity (token-weighted)", False), ("perplexity_median", "median answer perplexity", False),
                ("mean_tokens", "mean length (tokens)", False), ("mean_words", "mean length (words)", False),
                ("words_median", "median length (words)", False), ("words_p10", "10th percentile length (words)", False),
                ("short_fraction", "answers under 5 words", True),
                ("distinct_1", "distinct-1", False), ("distinct_2", "distinct-2", False),
                ("empty_fraction", "empty answers", True), ("truncated_fraction", "truncated answers", True)]


def attribute_label(a: dict) -> str:
    """The attribute row's label: what is measured and by which detector."""
    return f"{a.get('attribute') or a.get('preset')}: {a.get('detector')} (higher is better)"


def attribute_cell(r: dict | None) -> str:
    """An attribute rate with its count and 95% interval, as the tables show it."""
    if not r or r.get("rate") is None:
        return "–"
    lo, hi = r["ci"]
    return f"{100 * r['rate']:.1f}% ({r['count']}/{r['n']}) [95% CI {100 * lo:.1f}-{100 * hi:.1f}%]"


def quality_table(metrics: dict) -> tuple[list[str], list[list[str]]]:
    q, r = metrics.get("quality") or {}, metrics.get("refusal") or {}
    rows = []
    a = metrics.get("attribute")
    if a:
        rows.append([attribute_label(a)] + [attribute_cell(a.get(role)) for role in ROLES])
    for key, label, pct in (("refusal_rate", "refusal rate on unsafe prompts (higher is better)", True),
                            ("over_refusal_rate", "over-refusal on safe prompts (lower is better)", True)):
        if any((r.get(role) or {}).get(key) is not None for role in ROLES):
            rows.append([label] + [_fmt((r.get(role) or {}).get(key), pct) + _counts(r.get(role) or {}, key) for role in ROLES])
    sampled = metrics.get("sampled_refusal") or {}
    for key, label in (("refusal_rate", "refusal rate, sampled answers"), ("over_refusal_rate", "over-refusal, sampled answers")):
        if any((sampled.get(role) or {}).get(key) is not None for role in ROLES):
            rows.append([f"{label} (T={sampled.get('temperature')}, {sampled.get('samples')} per prompt)"]
                        + [_fmt((sampled.get(role) or {}).get(key), True) + _counts(sampled.get(role) or {}, key) for role in ROLES])
    for key, label, pct in QUALITY_ROWS:
        rows.append([label] + [_fmt((q.get(role) or {}).get(key), pct) for role in ROLES])
    return ["", "aligned", "baseline"], rows


def _counts(r: dict, key: str) -> str:
    k = "unsafe" if key == "refusal_rate" else "safe"
    ci = r.get(key.replace("_rate", "_ci"))
    return ((f" ({r.get('refused_' + k)}/{r.get('n_' + k)})" if r.get("n_" + k) else "")
            + (f" [95% CI {100 * ci[0]:.1f}-{100 * ci[1]:.1f}%]" if ci else ""))


def rate_cell(r: dict, key: str) -> str:
    """A refusal rate with its count and 95% interval, as the tables show it."""
    return _fmt(r.get(key), True) + _counts(r, key)


def phrasing_table(ph: dict) -> tuple[list[str], list[list[str]]]:
    """Per phrasing (and the original wording): refusal of harmful and harmless requests, baseline and aligned,
    then the mean over phrasings and the worst phrasing."""
    head = ["phrasing", "harmful refused: baseline", "harmful refused: aligned", "harmless refused: baseline",
            "harmless refused: aligned"]
    rows = [[g] + [rate_cell(ph["rates"][g][role], key) for key in ("refusal_rate", "over_refusal_rate")
                   for role in ("baseline", "aligned")] for g in ph["rates"]]
    for what in ("mean", "worst"):
        row = [f"{what} over phrasings" if what == "mean" else "worst phrasing"]
        for key in ("refusal_rate", "over_refusal_rate"):
            for role in ("baseline", "aligned"):
                s = (ph["summary"].get(role) or {}).get(key)
                row.append("–" if not s else _fmt(s[what], True) + (f" ({s['worst_phrasing']})" if what == "worst" else ""))
        rows.append(row)
    return head, rows


def compare_table(runs: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    specs = sorted({s for m in runs.values() for s in (m.get("judges") or {})})
    attr = any(m.get("attribute") for m in runs.values())
    head = (["run"] + [f"adjusted win rate: {s}" for s in specs] + (["attribute"] if attr else [])
            + ["refusal (unsafe)", "over-refusal (safe)", "perplexity", "mean tokens"])
    rows = []
    for name, m in runs.items():
        j, ra, qa = m.get("judges") or {}, (m.get("refusal") or {}).get("aligned") or {}, (m.get("quality") or {}).get("aligned") or {}
        spread = m.get("seeds") or {}

        def over_seeds(key: str, fallback: Any) -> str:
            s = spread.get(key)
            return f"{100 * s['mean']:.1f}% (sd {100 * s['sd']:.1f}, {len(spread['seeds'])} seeds)" if s else _fmt(fallback, True)

        aa = ((m.get("attribute") or {}).get("aligned") or {}).get("rate")
        rows.append([name] + [_fmt((j.get(s) or {}).get("adjusted_win_rate"), True) for s in specs]
                    + ([over_seeds("aligned_attribute", aa)] if attr else [])
                    + [over_seeds("aligned_refusal_unsafe", ra.get("refusal_rate")),
                       over_seeds("aligned_over_refusal_safe", ra.get("over_refusal_rate")),
                       _fmt(qa.get("perplexity")), _fmt(qa.get("mean_tokens"))])
    return head, rows


def reliability_rows(rel: dict) -> list[list[str]]:
    return [["pairs", f"{rel['pairs']} ({rel['n']} pairs, {rel.get('human_labelled', 0)} human-labelled)"],
            ["judge model", str(rel.get("judge_model"))],
            ["self-reward accuracy (R > 0 on the human-preferred answer)", _fmt(rel.get("self_reward_accuracy"), True)],
            ["text-judge accuracy (the same model asked A or B in both orders: the judge of RLAIF's labels)", _fmt(rel.get("text_judge_accuracy"), True)]]


def selection_table(sel: dict) -> tuple[list[str], list[list[str]]]:
    """The training steps probed on validation prompts (train.select_prompts) and the one kept."""
    rows = [[str(p["step"]) + (" (kept)" if p["step"] == sel.get("kept_step") else ""), _fmt(p["refusal"], True),
             _fmt(p["over_refusal"], True), _fmt(p["refusal"] - p["over_refusal"], True)] for p in sel.get("probes", [])]
    return ["step", f"refused (unsafe, {sel.get('prompts')})", "refused (safe)", "balanced"], rows


def _selection_note(sel: dict) -> str:
    return (f"Greedy {sel.get('max_new_tokens')}-token answers to the validation prompts; kept: the "
            f"{sel.get('rule')} ({sel.get('max_over_refusal'):.0%}). The table above is measured on other prompts.")


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


PHRASING_NOTE = ("Every request is asked in each phrasing (data/phrasings/SPEC.md): a short question, an imperative "
                 "task, a polite indirect ask, a first-person story ending in the request, and a casual chat-log line. "
                 "A model that follows a request's meaning refuses it alike in every phrasing; the worst phrasing is "
                 "what a user meets when asking the way the model handles worst.")


# -- Markdown ---------------------------------------------------------------------------------
def md_table(head: list[str], rows: list[list[str]]) -> str:
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", "<br>")
    return "\n".join(["| " + " | ".join(map(esc, head)) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(map(esc, r)) + " |" for r in rows])


def render_markdown(metrics: dict, title: str, plots: dict, runs: dict | None) -> str:
    m = metrics.get("models") or {}
    out = [f"# {title}", "", f"Aligned model: `{m.get('aligned')}`; baseline: `{m.get('baseline')}`; "
           f"{(metrics.get('prompts') or {}).get('n')} prompts.", ""]
    if runs:
        out += ["## Methods side by side", "", md_table(*compare_table(runs)), ""]
    out += ["## Judges", "", md_table(*judge_table(metrics.get("judges") or {})), "",
            "Rates are over judged items; failed items are counted and excluded. Adjusted win rate counts a tie as half "
            "a win (50% = no difference).", ""]
    out += ["## Harmlessness and text quality", "", md_table(*quality_table(metrics)), ""]
    if metrics.get("phrasing"):
        out += ["## By phrasing", "", md_table(*phrasing_table(metrics["phrasing"])), "", PHRASING_NOTE, ""]
    if metrics.get("selection"):
        out += ["## Training step kept", "", md_table(*selection_table(metrics["selection"])), "",
                _selection_note(metrics["selection"]), ""]
    if metrics.get("reliability"):
        out += ["## Self-reward reliability", "", md_table(["", ""], reliability_rows(metrics["reliability"])), ""]
    out += ["## Plots", ""] + [f"![{name}](plots/{name}.png)\n\n{cap}\n" for name, (cap, _) in plots.items()]
    ex = metrics.get("examples") or []
    if ex:
        out += ["## Examples", "", md_table(["prompt", "aligned", "baseline", "verdicts"],
                                           [[_prompt_text(e["prompt"])[-400:], e["aligned"], e["baseline"],
                                             ", ".join(f"{k}: {v}" for k, v in e.get("verdicts", {}).items())] for e in ex]), ""]
    return "\n".join(out)


# -- HTML -------------------------------------------------------------------------------------------
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;max-width:1200px;color:#222;padding:0 1rem}
h1{font-size:1.6rem}h2{margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem}th,td{border:1px solid #ddd;padding:.3rem .5rem;vertical-align:top;text-align:left}
th{background:#f3f3f3}td.num{text-align:right}figure{margin:1rem 0}figcaption{font-size:.85rem;color:#555}
.examples td{white-space:pre-wrap;max-width:380px;font-size:.85rem}.win{color:#2e7d32}.lose{color:#c62828}.tie{color:#777}
.failed{color:#b8860b}.note{font-size:.85rem;color:#555}.tag{font-size:.75rem;background:#eee;border-radius:3px;padding:0 .3rem}
"""


def _html_table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    e = html.escape
    th = "".join(f"<th>{e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def render_html(metrics: dict, title: str, plots: dict, runs: dict | None) -> str:
    e = html.escape
    m = metrics.get("models") or {}
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}</title><style>{CSS}</style></head><body>",
             f"<h1>{e(title)}</h1>",
             f"<p>Aligned model: <code>{e(str(m.get('aligned')))}</code>; baseline: <code>{e(str(m.get('baseline')))}</code>; "
             f"{e(str((metrics.get('prompts') or {}).get('n')))} prompts; perplexity reference: <code>{e(str(m.get('reference')))}</code>.</p>"]
    if runs:
        parts += ["<h2>Methods side by side</h2>", _html_table(*compare_table(runs))]
    parts += ["<h2>Judges</h2>", _html_table(*judge_table(metrics.get("judges") or {})),
              "<p class='note'>Rates are over judged items; failed items (timeouts, malformed replies) are counted and excluded, "
              "never turned into ties or wins. Pairwise judges see both answer orders; a win needs the votes to lean to the "
              "aligned answer. Adjusted win rate counts a tie as half a win, so 50% means no difference. The self-reward "
              "judge is the signal DLMA trains on: it shows the objective was optimised, not independent evidence.</p>"]
    fails = {s: j["failures"] for s, j in (metrics.get("judges") or {}).items() if j.get("failures")}
    for spec, errs in fails.items():
        parts.append(f"<details><summary>{e(spec)}: {len(errs)} failure(s) shown</summary><ul>"
                     + "".join(f"<li>{e(x)}</li>" for x in errs) + "</ul></details>")
    parts += ["<h2>Harmlessness and text quality</h2>", _html_table(*quality_table(metrics)),
              f"<p class='note'>Refusals: {e(str((metrics.get('refusal') or {}).get('detector', '')))}.</p>"]
    if metrics.get("phrasing"):
        parts += ["<h2>By phrasing</h2>", _html_table(*phrasing_table(metrics["phrasing"])),
                  f"<p class='note'>{e(PHRASING_NOTE)}</p>"]
    if metrics.get("selection"):
        parts += ["<h2>Training step kept</h2>", _html_table(*selection_table(metrics["selection"])),
                  f"<p class='note'>{e(_selection_note(metrics['selection']))}</p>"]
    if metrics.get("reliability"):
        parts += ["<h2>Self-reward reliability</h2>", _html_table(["", ""], reliability_rows(metrics["reliability"]))]
    if plots:
        parts.append("<h2>Plots</h2>")
        for name, (cap, png) in plots.items():
            parts.append(f"<figure id='plot-{e(name)}'><img alt='{e(name)}' src='data:image/png;base64,"
                         f"{base64.b64encode(png).decode()}'><figcaption>{e(cap)}</figcaption></figure>")
    ex = metrics.get("examples") or []
    if ex:
        rows = []
        for x in ex:
            tag = f"<span class='tag'>{e(str(x.get('label')))}</span> " if x.get("label") else ""
            verdicts = "<br>".join(f"{e(k)}: <span class='{e(v)}'>{e(v)}</span>" for k, v in (x.get("verdicts") or {}).items())
            cells = [tag + e(_prompt_text(x["prompt"])[-600:])] + [
                e(x[r]) + (" <span class='tag'>refusal</span>" if (x.get("refused") or {}).get(r) else "") for r in ROLES]
            rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + f"<td>{verdicts}</td></tr>")
        parts += ["<h2>Examples</h2>", "<table class='examples'><thead><tr><th>prompt</th><th>aligned</th><th>baseline</th>"
                  "<th>verdicts</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(metrics: dict, out_dir: str | Path, *, title: str = "dlma evaluation", runs: dict[str, dict] | None = None) -> dict:
    """Write metrics.json, report.md, plots/*.png and a self-contained index.html to out_dir.

    runs: {method: metrics} to show several methods side by side (e.g. dlma, rlcd); `metrics`
    is the run whose details (examples, distributions) are shown, or empty to use the first run.
    Returns the paths written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not metrics and runs:
        metrics = next(iter(runs.values()))
    plots = make_plots(metrics, runs)
    (out / "plots").mkdir(exist_ok=True)
    for name, (_, png) in plots.items():
        (out / "plots" / f"{name}.png").write_bytes(png)
    saved = dict(metrics)
    if runs:
        saved["runs"] = {k: {kk: vv for kk, vv in v.items() if kk not in ("examples", "distributions", "runs")} for k, v in runs.items()}
    write_json(out / "metrics.json", saved)
    (out / "report.md").write_text(render_markdown(metrics, title, plots, runs), encoding="utf-8")
    (out / "index.html").write_text(render_html(metrics, title, plots, runs), encoding="utf-8")
    return {"metrics": str(out / "metrics.json"), "markdown": str(out / "report.md"), "html": str(out / "index.html"),
            "plots": [str(out / "plots" / f"{n}.png") for n in plots]}
