"""The whole method in one command: convert the student -> teacher demonstrations -> SFT (stage 1) ->
self-refine samples -> preference pairs + DPO (stage 2) -> evaluation of base, SFT and SFT+self-refine
in-domain and out-of-domain.

    python -m selfrefine.pipeline [--config configs/demo.json] [--out runs/demo] [--seed S] [--force]

Each stage is one of the four scripts called as a function; it is skipped when its output exists
(`--force` redoes everything), and an interrupted training stage resumes from its checkpoint.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from .errors import cli_main, fail
from .io import read_json, write_json
from .recipes import dpo, eval as eval_recipe, sample, sft
from .tasks import wilson_interval

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.json"
ROWS = ("base", "sft", "self_refine")
SPLITS = ("in_domain", "out_of_domain")


def flags(options: dict[str, Any]) -> list[str]:
    """{"lr": 1e-4, "merge": true} -> ["--lr", "0.0001", "--merge"] (false/None leave a flag out)."""
    out: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value not in (False, None):
            for v in value if isinstance(value, list) else [value]:
                out += [flag, str(v)]
    return out


def substitute(obj: Any, values: dict[str, str]) -> Any:
    """Fill `{data_dir}`-style placeholders in every string of the config."""
    if isinstance(obj, str):
        for k, v in values.items():
            obj = obj.replace("{" + k + "}", v)
        return obj
    if isinstance(obj, dict):
        return {k: substitute(v, values) for k, v in obj.items()}
    if isinstance(obj, list):
        return [substitute(v, values) for v in obj]
    return obj


class Pipeline:
    def __init__(self, cfg: dict[str, Any], out: Path, seed: int, force: bool) -> None:
        self.cfg, self.out, self.seed, self.force = cfg, out, seed, force
        self.times_path = out / "stage_seconds.json"
        self.times: dict[str, float] = read_json(self.times_path) if self.times_path.exists() and not force else {}

    def stage(self, name: str, output: Path, run: Callable[[], object], workdir: Path | None = None) -> None:
        """Run `run` unless `output` exists; log and record its wall time."""
        if output.exists() and not self.force:
            print(f"[{name}] done already ({output}), skipped")
            return
        if self.force and workdir is not None and workdir.exists():
            shutil.rmtree(workdir)
        print(f"[{name}] ...", flush=True)
        t0 = time.perf_counter()
        run()
        gc.collect()
        self.times[name] = round(time.perf_counter() - t0, 1)
        write_json(self.times_path, self.times)
        print(f"[{name}] {self.times[name]:.1f} s")

    def train_flags(self, stage_dir: Path, options: dict[str, Any]) -> list[str]:
        resume = (stage_dir / "run.json").exists()
        return flags({"seed": self.seed, **options, "out": str(stage_dir), "resume": resume})

    def run(self) -> dict[str, Any]:
        c, out = self.cfg, self.out
        base = Path(c["model"]) if c.get("model") else out / "base"
        if not c.get("model"):
            from .convert_gguf import convert, default_gguf_path

            self.stage("convert", base / "config.json", lambda: convert(c.get("gguf") or default_gguf_path(), base))
        train = c["train"]
        demos = out / "demos.jsonl"
        teacher = c.get("teacher", {"type": "rationales"})
        if teacher["type"] == "rationales":
            self.stage("demos", demos, lambda: sample.rationales_main(flags({**train, "demos_out": str(demos)})))
        else:
            self.stage("demos", demos, lambda: sample.main(flags({
                **train, "seed": self.seed, **teacher.get("sampling", {}), "model": teacher["model"],
                "out": str(out / "teacher_samples.jsonl"), "keep_correct": True, "demos_out": str(demos)})))
        sft_dir = out / "sft"
        self.stage("sft", sft_dir / "merged" / "config.json", lambda: sft.main(
            ["--model", str(base), "--data", str(demos), "--merge"] + self.train_flags(sft_dir, c["sft"])),
            workdir=sft_dir)
        student = sft_dir / "merged"
        samples = out / "samples.jsonl"
        self.stage("self_refine_samples", samples, lambda: sample.main(flags({
            **train, "model": str(student), "prompt": "both", "seed": self.seed, **c["sample"],
            "out": str(samples), "resume": (samples.with_name(samples.name + ".partial")).exists()})))
        dpo_dir = out / "dpo"
        self.stage("dpo", dpo_dir / "adapter" / "adapter_config.json", lambda: dpo.main(
            ["--model", str(student), "--samples", str(samples), "--demos", str(demos), "--task", train["task"]]
            + flags(c.get("pairs", {})) + self.train_flags(dpo_dir, c["dpo"])), workdir=dpo_dir)
        models = {"base": (base, None), "sft": (student, None), "self_refine": (student, dpo_dir / "adapter")}
        reports: dict[str, dict[str, Any]] = {}
        for row, (model, adapter) in models.items():
            reports[row] = {}
            for split in SPLITS:
                reports[row][split] = self.evaluate(row, split, model, adapter)
        return self.report(reports)

    def evaluate(self, row: str, split: str, model: Path, adapter: Path | None) -> dict[str, Any]:
        """One cell of the table; several tasks in a split are pooled (each kept in `tasks`)."""
        specs = self.cfg["eval"][split]
        specs = specs if isinstance(specs, list) else [specs]
        path = self.out / "eval" / f"{row}.{split}.json"
        opts = {"model": str(model), "adapter": str(adapter) if adapter else None, **self.cfg.get("eval_options", {})}
        tasks = [f"{s['task']}={s['data']}" if s.get("data") else s["task"] for s in specs]
        extra = {k: v for k, v in specs[0].items() if k not in ("task", "data")}
        self.stage(f"eval_{row}_{split}", path, lambda: eval_recipe.main(flags({**opts, **extra, "task": tasks,
                                                                            "out": str(path)})))
        report = read_json(path)
        parts = report.get("results", [report])
        k, n = sum(p["correct"] for p in parts), sum(p["n"] for p in parts)
        return {"accuracy": k / n, "n": n, "ci95": list(wilson_interval(k, n)),
                "tasks": {p["task"]: {"accuracy": p["accuracy"], "n": p["n"]} for p in parts}}

    def report(self, rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
        report = {"rows": rows, "stage_seconds": self.times, "total_seconds": round(sum(self.times.values()), 1),
                  "seed": self.seed, "config": self.cfg}
        write_json(self.out / "report.json", report)
        print(markdown_table(rows))
        print(f"total {report['total_seconds']:.0f} s; report -> {self.out / 'report.json'}")
        return report


def markdown_table(rows: dict[str, dict[str, Any]]) -> str:
    names = {"base": "base", "sft": "SFT", "self_refine": "SFT+self-refine"}
    lines = ["| model | in-domain | out-of-domain |", "|---|---|---|"]
    for row in ROWS:
        cells = []
        for split in SPLITS:
            r = rows[row][split]
            lo, hi = r["ci95"]
            cells.append(f"{100 * r['accuracy']:.1f}% (n={r['n']}, 95% CI {100 * lo:.1f}-{100 * hi:.1f})")
        lines.append(f"| {names[row]} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def check_config(cfg: Any, path: str) -> None:
    """Refuse, before the first stage, a config that a later stage would trip over an hour in."""
    sections = ("train", "sft", "sample", "dpo", "eval")
    if not isinstance(cfg, dict) or not all(isinstance(cfg.get(k), dict) for k in sections):
        fail(f"config needs the sections {', '.join(sections)} (JSON objects)", path)
    if "task" not in cfg["train"]:
        fail("section train needs a 'task'", path)
    teacher = cfg.get("teacher", {"type": "rationales"})
    if not isinstance(teacher, dict) or teacher.get("type") not in ("rationales", "model") or (
            teacher["type"] == "model" and "model" not in teacher):
        fail('teacher must be {"type": "rationales"} or {"type": "model", "model": DIR, "sampling": {...}}', path)
    for split in SPLITS:
        specs = cfg["eval"].get(split)
        specs = specs if isinstance(specs, list) else [specs]
        if not specs or not all(isinstance(s, dict) and "task" in s for s in specs):
            fail(f"eval.{split} must be a {{task, ...}} object or a non-empty list of them", path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m selfrefine.pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--seed", type=int, help="overrides the config's seed")
    p.add_argument("--force", action="store_true", help="redo every stage")
    p.add_argument("--model", help="student model directory (instead of converting the packaged SmolLM2)")
    p.add_argument("--data-dir", help="fills {data_dir} in the config's paths")
    p.add_argument("--teacher", help="fills {teacher}: the teacher model directory of configs that sample one")
    args = p.parse_args(argv)
    cfg = read_json(args.config)
    check_config(cfg, args.config)
    for key in ("data_dir", "teacher"):
        if "{" + key + "}" in json.dumps(cfg) and not getattr(args, key):
            fail(f"this config uses {{{key}}}: pass --{key.replace('_', '-')} ...", args.config)
    cfg = substitute(cfg, {"data_dir": args.data_dir or "", "teacher": args.teacher or ""})
    if args.model:
        cfg["model"] = args.model
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seed = args.seed if args.seed is not None else cfg.get("seed", 0)
    return Pipeline(cfg, out, seed, args.force).run()


if __name__ == "__main__":
    cli_main(main)
