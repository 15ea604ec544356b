"""`dlma run`: generate -> score -> train -> evaluate -> report in a run directory.

Each stage writes into RUN_DIR/round-K/STAGE/: `started.json` (the stage's key), its
outputs, and last `done.json` (key, summary, wall time, peak memory), renamed into
place atomically. A stage's key hashes its settings and the keys of the stages it reads
from, so a rerun skips stages whose key matches their `done.json`, resumes one that
started with the same key (stage outputs are resumable), and redoes a stage, and
everything after it, whose settings changed: beside the old one (STAGE.new), which it
replaces only once complete, so a rerun whose settings fail keeps the old result. A corrupt
marker counts as absent. RUN_DIR/final-model always points at the last round's trained model.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import platform
import resource
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from .card import command_line, write_card
from .config import EvalConfig, ModelConfig, RunConfig, TrainConfig, to_dict, typed_overrides
from .data import file_hashes, read_jsonl, release_lock, swap_sides, take_lock, write_json
from .errors import DlmaError, os_error_message
from .evaluate import evaluate_models
from .generate import generate_pairs
from .machine import cpu_kind, matmul_peak
from .models import resolve_device, resolve_dtype
from .objectives import Method, method, methods
from .report import attribute_label, phrasing_table, write_report
from .reward import score_file
from .stages import check_method, evaluate_config, generate_config, sampling_of, score_config, train_config
from .tracking import LOGGING_DIR, Where
from .train import KL_REFERENCE, train_model


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _settings(cfg: Any) -> dict:
    """A stage's settings as its key sees them: where it reports (report_to) does not change what it
    makes, and an unused column mapping is left out, so older run directories keep their keys."""
    return {k: v for k, v in to_dict(cfg).items() if k != "report_to" and not (k == "columns" and not v)}


# Preset keys only evaluation and `dlma prompts check` read: editing how the attribute is measured
# redoes the evaluation alone, not the generation, scoring and training before it.
MEASURE_ONLY = ("detector", "description", "check_prompts")


def _presets(spec: str | None) -> list:
    """Preset files (of a comma-separated setting) by their content less MEASURE_ONLY; bundled presets by name."""
    out = []
    for item in (spec or "").split(","):
        p = Path(item.strip())
        if item.strip() and p.is_file():
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
            kept = {k: v for k, v in data.items() if k not in MEASURE_ONLY} if isinstance(data, dict) else data
            out.append([item.strip(), hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()])
    return out


def _model_stamp(name: str | None) -> Any:
    """A local model directory by the size and mtime of its files (retrained in place: a new key)."""
    p = Path(name) if name else None
    if p is None or not p.is_dir():
        return name
    return [name, sorted([str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns] for f in p.rglob("*") if f.is_file())]


def _peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS; children cover accelerate subprocesses
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 1024**2
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(max(own, kids) * scale, 1)


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Refuse a second `dlma run` on the same directory while one is running."""
    f = take_lock(run_dir / ".lock", lambda holder: f"{run_dir} is in use by another dlma run ({holder}); "
                  "wait for it or choose another run_dir")
    try:
        yield
    finally:
        release_lock(f)


def _marker(path: Path) -> dict:
    """A stage marker (started.json, done.json) or manifest.json. One that is corrupt (edited by
    hand, cut by a full disk) counts as absent: the stage resumes or is redone, no traceback."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _swap(work: Path, sdir: Path) -> None:
    """Put a finished stage directory in place of the old one: old aside, new in, old away."""
    if work == sdir:
        return
    old = sdir.with_name(sdir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if sdir.exists():
        os.replace(sdir, old)
    os.replace(work, sdir)
    shutil.rmtree(old, ignore_errors=True)


def _finish_swap(sdir: Path) -> None:
    """Complete a swap a kill cut between its renames: the finished new stage goes in, else the old comes back."""
    new, old = sdir.with_name(sdir.name + ".new"), sdir.with_name(sdir.name + ".old")
    if not sdir.exists():
        if (new / "done.json").is_file():
            os.replace(new, sdir)
        elif old.exists():
            os.replace(old, sdir)
    shutil.rmtree(old, ignore_errors=True)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("dlma", "torch", "transformers", "accelerate", "peft", "vllm"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


class Pipeline:
    """One method's run: rounds of generate -> score -> train, each evaluated, then a report."""

    def __init__(self, cfg: RunConfig, run_dir: str | Path | None = None, *, progress: bool = True,
                 siblings: list[Path] | None = None, log: Callable[[str], None] | None = None):
        check_method(cfg)
        self.cfg = cfg
        self.dir = Path(run_dir or cfg.run_dir)
        self.progress = progress
        self.siblings = siblings or []  # other methods' run dirs whose identical stages can be copied
        self.log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        self.manifest_path = self.dir / "manifest.json"
        self.manifest: dict[str, Any] = {}

    # -- stage bookkeeping ----------------------------------------------------
    def _stage(self, name: str, rnd: int, key: str, fn: Callable[[Path], dict]) -> dict:
        sdir = self.dir / f"round-{rnd}" / name
        label = f"round {rnd} {name}"
        _finish_swap(sdir)
        marker = _marker(sdir / "done.json")
        if marker.get("key") == key and "summary" in marker:
            self.log(f"[{label}] done already, skipping")
            self._record(f"round-{rnd}/{name}", {**marker, "skipped": True})
            return marker["summary"]
        work = self._workdir(sdir, key, label)
        if not work.exists() and self._copy_from_sibling(name, rnd, key, work):
            self.log(f"[{label}] identical stage found in a sibling run: copied")
            _swap(work, sdir)
            marker = _marker(sdir / "done.json")
            self._record(f"round-{rnd}/{name}", {**marker, "skipped": True})
            return marker["summary"]
        started = work / "started.json"
        resuming = started.is_file()
        work.mkdir(parents=True, exist_ok=True)
        write_json(started, {"key": key})
        self.log(f"[{label}] {'resuming' if resuming else 'starting'}")
        t0 = time.time()
        try:
            summary = fn(work)
        except DlmaError as exc:
            raise DlmaError(f"stage {label}: {exc}") from None
        except FileNotFoundError as exc:
            raise DlmaError(f"stage {label}: missing file {exc.filename}") from None
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
                raise DlmaError(f"stage {label}: {os_error_message(exc)}") from None
            raise
        marker = {"key": key, "summary": summary, "wall_s": round(time.time() - t0, 2), "peak_rss_mb": _peak_rss_mb(),
                  "matmul_peak_flops": (self.manifest.get("machine") or {}).get("matmul_peak_flops"),
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        write_json(work / "done.json", marker)
        _swap(work, sdir)
        self._record(f"round-{rnd}/{name}", {**marker, "skipped": False})
        return summary

    def _workdir(self, sdir: Path, key: str, label: str) -> Path:
        """Where a stage runs: its own directory when that is new or holds this key's unfinished work,
        else beside it (STAGE.new), so that the old result stays in place, final-model and the report
        with it, until the new one is complete: settings that fail late (train.min_reward above
        every pair's R) then lose nothing."""
        if not sdir.exists() or _marker(sdir / "started.json").get("key") == key:
            return sdir
        new = sdir.with_name(sdir.name + ".new")
        if _marker(new / "started.json").get("key") != key:
            shutil.rmtree(new, ignore_errors=True)  # an attempt with other settings
            self.log(f"[{label}] settings changed: redoing it beside the old result, which stays until the new one is done")
        return new

    def _copy_from_sibling(self, name: str, rnd: int, key: str, sdir: Path) -> bool:
        for sib in self.siblings:
            src = sib / f"round-{rnd}" / name
            if _marker(src / "done.json").get("key") == key:
                tmp = sdir.with_name(sdir.name + ".copy")
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(src, tmp)
                os.replace(tmp, sdir)
                return True
        return False

    def _reuse_kl_answers(self, rnd: int, out: Path) -> None:
        """Copy a sibling run's untouched answers for the KL term (train.kl_alpha) into `out`.

        They are the starting model's greedy answers, the same for every method of a comparison; the
        trainer uses a copied file only where its key (model, dtype, kl_tokens) and prompts match, and
        makes them anew otherwise, so a copy can save minutes and cannot change a result.
        """
        if (out / KL_REFERENCE).exists():
            return
        for sib in self.siblings:
            src = sib / f"round-{rnd}" / "train" / "model" / KL_REFERENCE
            if src.is_file():
                out.mkdir(parents=True, exist_ok=True)
                tmp = out / (KL_REFERENCE + ".copy")
                shutil.copy(src, tmp)
                os.replace(tmp, out / KL_REFERENCE)  # a kill mid-copy leaves no half file to trust
                self.log(f"[round {rnd} train] the KL term's untouched answers copied from {sib} (used where they match)")
                return

    def _reuse_baseline_answers(self, rnd: int, ecfg: EvalConfig, sdir: Path) -> None:
        """Copy the untouched model's answers from a sibling run evaluated with the same settings.

        The baseline is the starting model in every round of every sibling, so with equal evaluation
        and model settings its answers are the same: a comparison answers them once, not per method.
        (The copied records still carry their generation settings, which evaluate checks.)
        """
        key = _key("baseline-answers", _settings(ecfg), to_dict(self.cfg.model), sampling_of(self.cfg, "evaluate"))
        write_json(sdir / "baseline-key.json", {"key": key})
        for sib in self.siblings:
            src = sib / f"round-{rnd}" / "evaluate"
            marker = src / "baseline-key.json"
            if _marker(marker).get("key") == key:
                for f in src.glob("answers-baseline*.jsonl"):
                    if not (sdir / f.name).exists():
                        shutil.copy(f, sdir / f.name)
                return

    def _where(self, rnd: int, stage: str) -> Where:
        """A stage's tracker run: project = the run directory's name, RUN_DIR/tensorboard/round-K/STAGE."""
        return Where(self.dir.resolve().name, f"round-{rnd}/{stage}", self.dir / LOGGING_DIR)

    def _record(self, stage: str, info: dict) -> None:
        entry = {k: info.get(k) for k in ("key", "wall_s", "peak_rss_mb", "finished", "skipped")}
        entry.update(_throughput(stage.rsplit("/", 1)[-1], info.get("summary") or {}, info.get("wall_s")))
        # a stage done earlier (or copied from a sibling) is measured against the peak of the machine that ran it
        peak = info.get("matmul_peak_flops") if info.get("skipped") else (self.manifest.get("machine") or {}).get("matmul_peak_flops")
        if entry.get("model_flops") and entry.get("wall_s") and peak:
            entry["mfu"] = round(entry["model_flops"] / entry["wall_s"] / peak, 4)
        self.manifest.setdefault("stages", {})[stage] = entry
        write_json(self.manifest_path, self.manifest)

    # -- the run ----------------------------------------------------------------
    def run(self) -> dict:
        """Run (or resume) every stage; return the last round's evaluation metrics."""
        import torch

        cfg, spec = self.cfg, method(self.cfg.method)
        with run_lock(self.dir):
            old = _marker(self.manifest_path)
            self.manifest = {"config": to_dict(cfg), "method": cfg.method, "versions": _versions(),
                             "seeds": {"generate": cfg.generate.seed, "train": cfg.train.seed, "evaluate": cfg.evaluate.seed},
                             "device": str(resolve_device(cfg.model.device)), "threads": torch.get_num_threads(),
                             "platform": platform.platform(), "machine": _machine(cfg.model),
                             "stages": old.get("stages", {}), "command": command_line(),
                             "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
            write_json(self.manifest_path, self.manifest)
            policy, upstream = cfg.model.model, _key(_model_stamp(cfg.model.model))
            rounds: list[dict] = []
            for rnd in range(1, cfg.rounds + 1):
                policy, upstream, metrics = self._round(rnd, spec, policy, upstream)
                rounds.append(metrics)
            self._link_final(policy)
            self.manifest["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            self.manifest["final_model"] = str(self.dir / "final-model")
            write_json(self.manifest_path, self.manifest)
            if (self.dir / "final-model" / "train_summary.json").is_file():  # a model `dlma train` saved
                write_card(self.dir / "final-model", self.dir)  # its card again, now with the run's evaluation
            final = dict(rounds[-1])
            if len(rounds) > 1:
                final["rounds"] = [_headline(m) for m in rounds]
            return final

    def _round(self, rnd: int, spec: Method, policy: str, upstream: str) -> tuple[str, str, dict]:
        cfg = self.cfg
        mcfg = dataclasses.replace(cfg.model, model=policy)
        gcfg = generate_config(cfg, rnd)
        speed_only = ("prefix_cache",)  # same pairs either way: changing it must not redo the run
        gen_key = _key("generate", {k: v for k, v in _settings(gcfg).items() if k not in speed_only}, to_dict(cfg.model),
                       upstream, file_hashes(gcfg.prompts), _presets(gcfg.preset), sampling_of(cfg, "generate"))
        self._stage("generate", rnd, gen_key, lambda d: generate_pairs(mcfg, gcfg, str(d / "pairs.jsonl"), sampling=cfg.sampling,
                                                                       progress=self.progress,
                                                                       where=self._where(rnd, "generate")))
        pairs = self.dir / f"round-{rnd}" / "generate" / "pairs.jsonl"

        data, data_key = pairs, gen_key
        scfg = score_config(cfg)  # preset None: each pair's own
        if scfg is not None:
            score_key = _key("score", _settings(scfg), to_dict(cfg.model), gen_key, _presets(scfg.preset),
                             sampling_of(cfg, "score"))

            def score(d: Path) -> dict:
                summary = score_file(mcfg, scfg, str(pairs), str(d / "scored.jsonl"), sampling=cfg.sampling, progress=self.progress,
                                     where=self._where(rnd, "score"))
                if spec.orient:
                    summary["oriented"] = _orient(d / "scored.jsonl", d / "oriented.jsonl", spec.orient)
                return summary

            self._stage("score", rnd, score_key, score)
            sdir = self.dir / f"round-{rnd}" / "score"
            data = sdir / ("oriented.jsonl" if spec.orient else "scored.jsonl")
            data_key = score_key

        tcfg = train_config(cfg)
        train_key = _key("train", to_dict(dataclasses.replace(tcfg, report_to=[])), to_dict(cfg.model), data_key,
                         _presets(tcfg.preset), sampling_of(cfg, "train"))

        def train(d: Path) -> dict:
            if tcfg.kl_alpha:
                self._reuse_kl_answers(rnd, d / "model")
            return train_model(mcfg, tcfg, str(data), str(d / "model"), sampling=cfg.sampling, progress=self.progress,
                               where=self._where(rnd, "train"))

        self._stage("train", rnd, train_key, train)
        new_policy = str(self.dir / f"round-{rnd}" / "train" / "model")

        ecfg = evaluate_config(cfg)
        eval_key = _key("evaluate", _settings(ecfg), to_dict(cfg.model), train_key, file_hashes(ecfg.prompts), file_hashes(ecfg.preset),
                        file_hashes(ecfg.pairs), _model_stamp(ecfg.reference), sampling_of(cfg, "evaluate"))

        def evaluate(d: Path) -> dict:
            self._reuse_baseline_answers(rnd, ecfg, d)
            return evaluate_models(cfg.model, ecfg, str(d), model=new_policy, baseline=cfg.model.model, sampling=cfg.sampling,
                                   progress=self.progress,
                                   where=self._where(rnd, "evaluate"))

        self._stage("evaluate", rnd, eval_key, evaluate)
        metrics = json.loads((self.dir / f"round-{rnd}" / "evaluate" / "metrics.json").read_text())
        metrics["round"] = rnd
        return new_policy, train_key, metrics

    def _link_final(self, policy: str) -> None:
        link = self.dir / "final-model"
        tmp = self.dir / ".final-model.tmp"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(os.path.relpath(policy, self.dir), tmp)
        os.replace(tmp, link)


def _machine(model_cfg: ModelConfig) -> dict:
    """The CPU kind and the measured matmul peak in the model's dtype: what each stage's MFU divides by."""
    dev = resolve_device(model_cfg.device)
    dtype = resolve_dtype(model_cfg.dtype, dev)
    return {"cpu": cpu_kind(), "dtype": str(dtype).replace("torch.", ""),
            "matmul_peak_flops": round(matmul_peak(dtype, dev))}


def _throughput(stage: str, summary: dict, wall_s: float | None) -> dict:
    """Work counts and rates of a finished stage, from its summary and wall time (what `dlma run` prints)."""
    pairs = {"generate": "pairs_written", "score": "scored", "train": "pairs_used"}.get(stage)
    out: dict[str, Any] = {}
    if pairs and summary.get(pairs) is not None:
        out["pairs"] = summary[pairs]
    if stage == "evaluate" and isinstance(summary.get("prompts"), dict):
        made = summary["prompts"].get("answers_generated")  # {role: answers generated now}
        out["answers"] = sum(made.values()) if isinstance(made, dict) else made
    if stage == "generate" and summary.get("new_tokens") is not None:
        out["tokens"] = summary["new_tokens"]
    if wall_s:
        for k in ("pairs", "answers", "tokens"):
            if out.get(k):
                out[f"{k}_per_s"] = round(out[k] / wall_s, 2)
    if stage == "train" and summary.get("tokens_per_s") is not None:
        out["tokens_per_s"] = summary["tokens_per_s"]  # the training loop's own rate
    if summary.get("model_flops"):
        out["model_flops"] = summary["model_flops"]
    return out


def format_stages(manifest: dict) -> str:
    """Each stage's wall time, throughput and MFU (its model FLOPs over wall time, as a share of
    the matmul peak measured on this machine at the start of the run), as in manifest.json."""
    m = manifest.get("machine") or {}
    head = (f"machine: {m['cpu']}; {m['dtype']} matmul peak {m['matmul_peak_flops'] / 1e9:.0f} GFLOP/s "
            f"({manifest.get('threads')} threads)\n") if m.get("matmul_peak_flops") else ""
    rows = [["stage", "wall time", "pairs/s", "tokens/s", "MFU", "peak memory"]]
    for name, e in manifest.get("stages", {}).items():
        wall = "-" if e.get("wall_s") is None else f"{e['wall_s']:.0f} s" + (" (earlier run)" if e.get("skipped") else "")
        rate = e.get("pairs_per_s") or e.get("answers_per_s")
        rows.append([name, wall, "-" if rate is None else f"{rate:.2f}" + (" answers" if "pairs_per_s" not in e else ""),
                     "-" if e.get("tokens_per_s") is None else f"{e['tokens_per_s']:.0f}",
                     "-" if e.get("mfu") is None else f"{100 * e['mfu']:.0f}%",
                     "-" if e.get("peak_rss_mb") is None else f"{e['peak_rss_mb'] / 1024:.1f} GB"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return head + "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _orient(src: Path, dst: Path, field: str) -> dict:
    """RLAIF: make `chosen` the side the text judge preferred (judge score < 0 flips the pair)."""
    flipped = kept = 0
    tmp = dst.with_name(dst.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in read_jsonl(src):
            score = rec.get(field)
            if score is None:
                continue
            if score < 0:
                rec = swap_sides(rec)
                flipped += 1
            kept += 1
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(tmp, dst)
    return {"pairs": kept, "flipped_by_judge": flipped}


def _headline(m: dict) -> dict:
    """The few numbers the before/after table shows."""
    ref = m.get("refusal", {})
    out: dict[str, Any] = {"round": m.get("round")}
    sampled = m.get("sampled_refusal") or {}
    for role in ("baseline", "aligned"):
        r = ref.get(role, {})
        out[f"{role}_refusal_unsafe"] = r.get("refusal_rate")
        out[f"{role}_refusal_unsafe_ci"] = r.get("refusal_ci")
        out[f"{role}_refused_unsafe"] = (r.get("refused_unsafe"), r.get("n_unsafe"))
        out[f"{role}_over_refusal_safe"] = r.get("over_refusal_rate")
        out[f"{role}_over_refusal_safe_ci"] = r.get("over_refusal_ci")
        out[f"{role}_refused_safe"] = (r.get("refused_safe"), r.get("n_safe"))
        s = sampled.get(role) or {}
        out[f"{role}_sampled_refusal_unsafe"] = s.get("refusal_rate")
        out[f"{role}_sampled_over_refusal_safe"] = s.get("over_refusal_rate")
        if r.get("refusal_rate") is not None and r.get("over_refusal_rate") is not None:
            out[f"{role}_balanced"] = r["refusal_rate"] - r["over_refusal_rate"]
        q = m.get("quality", {}).get(role, {})
        out[f"{role}_perplexity"] = q.get("perplexity")
        out[f"{role}_mean_tokens"] = q.get("mean_tokens")
        out[f"{role}_distinct_2"] = q.get("distinct_2")
        qs = m.get("quality_safe", {}).get(role, {})
        out[f"{role}_perplexity_safe"] = qs.get("perplexity")
        out[f"{role}_distinct_2_safe"] = qs.get("distinct_2")
        out[f"{role}_words_median_safe"] = qs.get("words_median")
        out[f"{role}_short_safe"] = qs.get("short_fraction")
        ph = ((m.get("phrasing") or {}).get("summary") or {}).get(role) or {}
        for key, name in (("refusal_rate", "refusal_unsafe"), ("over_refusal_rate", "over_refusal_safe")):
            if ph.get(key):
                out[f"{role}_{name}_mean_phrasing"] = ph[key]["mean"]
                out[f"{role}_{name}_worst_phrasing"] = ph[key]["worst"]
    attr = m.get("attribute")
    if attr:
        out["attribute"] = attribute_label(attr)
        for role in ("baseline", "aligned"):
            r = attr.get(role) or {}
            out[f"{role}_attribute"], out[f"{role}_attribute_ci"] = r.get("rate"), r.get("ci")
            out[f"{role}_attribute_count"] = (r.get("count"), r.get("n"))
    for spec, j in m.get("judges", {}).items():
        out[f"win_rate[{spec}]"] = j.get("adjusted_win_rate")
    return out


def compare(cfg: RunConfig, names: list[str], *, progress: bool = True) -> dict[str, dict]:
    """Run several methods, each once per seed, into RUN_DIR/<method>[/seed-S]/, and one combined report.

    Every run shares the generated (and, where the judge matches, scored) pairs and the
    baseline's answers through sibling copies, so methods differ only in scoring and loss;
    `method_train` gives a method its own training settings (its own tuned learning rate).
    Returns {method: metrics}; with several seeds the metrics are the first seed's, with
    `seeds` holding every seed's headline numbers and their mean and standard deviation.
    """
    known = methods()
    if not names:
        raise DlmaError(f"--compare needs one or more methods, comma-separated, e.g. --compare dlma,rlcd "
                        f"(available: {', '.join(known)})")
    unknown = [m for m in names if m not in known] + [m for m in cfg.method_train if m not in known]
    if unknown:
        raise DlmaError(f"unknown method(s) {', '.join(unknown)}; available: {', '.join(known)}")
    method_train = {m: typed_overrides(TrainConfig, over, f"method_train.{m}") for m, over in cfg.method_train.items()}
    seeds = cfg.seeds or [cfg.train.seed]
    root = Path(cfg.run_dir)
    results: dict[str, dict] = {}
    done_dirs: list[Path] = []
    for m in names:
        per_seed = []
        for seed in seeds:
            train = dataclasses.replace(cfg.train, **{**method_train.get(m, {}), "seed": seed})
            sub_dir = root / m if len(seeds) == 1 else root / m / f"seed-{seed}"
            sub = dataclasses.replace(cfg, method=m, run_dir=str(sub_dir), train=train, seeds=[], method_train={})
            per_seed.append(Pipeline(sub, progress=progress, siblings=list(done_dirs)).run())
            done_dirs.append(sub_dir)
        results[m] = dict(per_seed[0], seeds=seed_spread(per_seed, seeds)) if len(seeds) > 1 else per_seed[0]
    write_report(results[names[0]], root / "report", title=f"dlma run: {', '.join(names)}", runs=results)
    write_json(root / "compare.json", {m: r.get("seeds") or {"values": [_headline(r)]} for m, r in results.items()})
    return results


def seed_spread(runs: list[dict], seeds: list[int]) -> dict:
    """Mean and standard deviation over seeds of the aligned model's headline rates."""
    import statistics

    heads = [_headline(m) for m in runs]
    out: dict[str, Any] = {"seeds": seeds, "values": heads}
    for key in ("aligned_attribute", "aligned_refusal_unsafe", "aligned_over_refusal_safe", "aligned_balanced", "aligned_perplexity",
                "aligned_perplexity_safe", "aligned_refusal_unsafe_mean_phrasing", "aligned_refusal_unsafe_worst_phrasing",
                "aligned_over_refusal_safe_mean_phrasing", "aligned_over_refusal_safe_worst_phrasing"):
        xs = [h[key] for h in heads if h.get(key) is not None]
        if xs:
            out[key] = {"mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0}
    return out


def format_compare(runs: dict[str, dict]) -> str:
    """One line per method: mean (sd over seeds) of the rates and the balanced score."""
    def ms(r: dict, key: str, scale: float = 100.0, unit: str = "%") -> str:
        s = r.get("seeds")
        if s and key in s:
            return f"{scale * s[key]['mean']:.1f}{unit} (sd {scale * s[key]['sd']:.1f})"
        v = _headline(r).get(key)
        return "-" if v is None else f"{scale * v:.1f}{unit}"

    first = next(iter(runs.values()))
    h = _headline(first)
    # (column, headline key without its role, scale, unit): the attribute where the preset measures one,
    # the refusal rates where the prompts are labelled
    cols = [(f"shows the attribute ({h['attribute']})", "attribute", 100.0, "%")] if h.get("attribute") else []
    if h["baseline_refusal_unsafe"] is not None or h["baseline_over_refusal_safe"] is not None or not cols:
        cols += [("harmful refused", "refusal_unsafe", 100.0, "%"), ("harmless refused", "over_refusal_safe", 100.0, "%"),
                 ("balanced (difference)", "balanced", 100.0, "")]
    cols.append(("perplexity", "perplexity", 1.0, ""))
    rows = [["method"] + [c[0] for c in cols]]
    rows.append(["untouched model"] + ["-" if h.get(f"baseline_{k}") is None else
                                       (f"{scale * h[f'baseline_{k}']:.2f}" if scale == 1.0 else f"{scale * h[f'baseline_{k}']:.1f}{unit}")
                                       for _, k, scale, unit in cols])
    for name, r in runs.items():
        rows.append([name] + [ms(r, f"aligned_{k}", scale, unit) for _, k, scale, unit in cols])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows)


def format_table(metrics: dict, runs: dict[str, dict] | None = None) -> str:
    """A short before/after table for the terminal."""
    def pct(x: Any) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    def num(x: Any) -> str:
        return "-" if x is None else f"{x:.1f}"

    def num2(x: Any) -> str:
        return "-" if x is None else f"{x:.2f}"

    def rate(h: dict, key: str, count: str) -> str:
        k, n = h[count] if h.get(count) else (None, None)
        ci = h.get(key + "_ci")
        return pct(h[key]) + (f" ({k}/{n})" if n else "") + (f" [{100 * ci[0]:.1f}-{100 * ci[1]:.1f}]" if ci else "")

    items = runs or {"": metrics}
    lines = []
    for name, m in items.items():
        h = _headline(m)
        samples = (m.get("sampled_refusal") or {}).get("samples")
        table = [[(f"{name} " if name else "") + "metric", "before (untouched)", "after (aligned)"]]
        if h.get("attribute"):
            table.append([h["attribute"], rate(h, "baseline_attribute", "baseline_attribute_count"),
                          rate(h, "aligned_attribute", "aligned_attribute_count")])
        for label, key, count in (("refusals on harmful prompts", "refusal_unsafe", "refused_unsafe"),
                                  ("refusals on harmless prompts", "over_refusal_safe", "refused_safe")):
            if h.get(f"baseline_{key}") is not None or not h.get("attribute"):
                table.append([label, rate(h, f"baseline_{key}", f"baseline_{count}"), rate(h, f"aligned_{key}", f"aligned_{count}")])
        if samples:
            t = (m.get("sampled_refusal") or {}).get("temperature")
            table += [[f"  sampled (T={t}, {samples}/prompt): harmful", pct(h["baseline_sampled_refusal_unsafe"]),
                       pct(h["aligned_sampled_refusal_unsafe"])],
                      [f"  sampled (T={t}, {samples}/prompt): harmless", pct(h["baseline_sampled_over_refusal_safe"]),
                       pct(h["aligned_sampled_over_refusal_safe"])]]
        table += [["answer perplexity", num2(h["baseline_perplexity"]), num2(h["aligned_perplexity"])],
                  ["distinct-2 of answers", num2(h["baseline_distinct_2"]), num2(h["aligned_distinct_2"])]]
        if h.get("aligned_perplexity_safe") is not None:
            table += [["  on harmless prompts: perplexity", num2(h["baseline_perplexity_safe"]), num2(h["aligned_perplexity_safe"])],
                      ["  on harmless prompts: distinct-2", num2(h["baseline_distinct_2_safe"]), num2(h["aligned_distinct_2_safe"])]]
        table.append(["mean answer tokens", num(h["baseline_mean_tokens"]), num(h["aligned_mean_tokens"])])
        if h.get("aligned_words_median_safe") is not None:
            table.append(["  on harmless prompts: median words (under 5 words)",
                          f"{h['baseline_words_median_safe']:.0f} ({pct(h['baseline_short_safe'])})",
                          f"{h['aligned_words_median_safe']:.0f} ({pct(h['aligned_short_safe'])})"])
        for k, v in h.items():
            if k.startswith("win_rate"):
                table.append([f"aligned win rate {k[8:]}", "", pct(v)])
        widths = [max(len(str(r[i])) for r in table) for i in range(3)]
        for r in table:
            lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
        if m.get("phrasing"):
            head, rows = phrasing_table(m["phrasing"])
            rows = [[r[0], f"{r[1]} -> {r[2]}", f"{r[3]} -> {r[4]}"] for r in rows]
            rows.insert(0, ["by phrasing (same requests)", "harmful refused: before -> after",
                            "harmless refused: before -> after"])
            widths = [max(len(str(r[i])) for r in rows) for i in range(3)]
            lines.append("")
            lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        sel = m.get("selection")
        if sel and sel.get("probes"):
            kept = next((p for p in sel["probes"] if p["step"] == sel.get("kept_step")), None)
            if kept:
                lines.append(f"(model = training step {kept['step']} of {max(p['step'] for p in sel['probes'])}, kept on "
                             f"{sel.get('prompts')}: {pct(kept['refusal'])} / {pct(kept['over_refusal'])} refused there)")
        lines.append("")
    return "\n".join(lines).rstrip()
