"""The whole method in one command: convert the student -> teacher demonstrations -> SFT (stage 1) ->
self-refine samples -> preference pairs + DPO (stage 2) -> evaluation of base, SFT and SFT+self-refine
in-domain and out-of-domain.

    python -m selfrefine.pipeline [--config configs/demo.json] [--out runs/demo] [--seed S] [--force]

Each stage is one of the four scripts called as a function. A stage is skipped when it is up to date, redone
(with everything downstream) when its options, its inputs or the code changed, and resumed when it was
interrupted (see `selfrefine.provenance`); `--force` redoes everything. The table compares the models per task,
paired on the same questions (difference with its 95% interval, exact McNemar p).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from . import seeds
from .data import record_messages
from .errors import cli_main, fail
from .flags import Parser, seed_list
from .fingerprint import model_digest, path_digest
from .files import read_json, read_jsonl, write_json
from .paths import check_outputs
from .provenance import Stages
from .recipes import dpo, eval as eval_recipe, sample, sft
from .recipes.eval import compare_predictions, format_p
from .tokenizer import Tokenizer

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.json"
ROWS = ("base", "sft", "self_refine")
SPLITS = ("in_domain", "out_of_domain")
COMPARISONS = {"sft_vs_base": ("base", "sft"), "self_refine_vs_sft": ("sft", "self_refine")}  # name: (A, B)
NAMES = {"base": "base", "sft": "SFT", "self_refine": "SFT+self-refine"}
CELL_KEYS = ("n", "correct", "accuracy", "ci95", "no_answer_rate", "truncation_rate", "predictions")


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
        self.cfg, self.out, self.seed = cfg, out, seed
        inputs = [Path(p) for p in (cfg.get("model"), cfg.get("teacher", {}).get("model")) if p]
        self.stages = Stages(out, force, protected=tuple(inputs))

    def train_flags(self, stage_dir: Path, options: dict[str, Any]) -> list[str]:
        resume = (stage_dir / "run.json").exists()
        return flags({"seed": self.seed, **options, "out": str(stage_dir), "resume": resume})

    def run(self) -> dict[str, Any]:
        c, out, seed = self.cfg, self.out, self.seed
        if c.get("model"):
            base, base_fp = Path(c["model"]), model_digest(c["model"])
        else:
            from .convert_gguf import convert, default_gguf_path

            base, gguf = out / "base", Path(c.get("gguf") or default_gguf_path())
            base_fp = self.stages.run("convert", lambda: convert(gguf, base), outputs=[base],
                                      options={"gguf": str(gguf)}, inputs={"gguf": path_digest(gguf)})
        train = c["train"]
        data_fp = path_digest(train.get("data"))
        demos = out / "demos.jsonl"
        teacher = c.get("teacher", {"type": "rationales"})
        if teacher["type"] == "rationales":
            demos_fp = self.stages.run(
                "demos", lambda: sample.rationales_main(flags({**train, "demos_out": str(demos)})),
                outputs=[demos], options={"train": train, "teacher": teacher}, inputs={"data": data_fp})
        else:
            teacher_out = out / "teacher_samples.jsonl"
            demos_fp = self.stages.run("demos", lambda: sample.main(flags({
                **train, "seed": seed, **teacher.get("sampling", {}), "model": teacher["model"],
                "out": str(teacher_out), "keep_correct": True, "demos_out": str(demos),
                "resume": partial(teacher_out).exists()})),
                outputs=[demos, *with_partials(teacher_out)],
                options={"train": train, "teacher": teacher, "seed": seed},
                inputs={"data": data_fp, "teacher": model_digest(teacher["model"])})
        check_budgets(Tokenizer.from_dir(base), demos, c)
        sft_dir = out / "sft"
        sft_fp = self.stages.run("sft", lambda: sft.main(
            ["--model", str(base), "--data", str(demos), "--merge"] + self.train_flags(sft_dir, c["sft"])),
            outputs=[sft_dir], options={"seed": seed, **c["sft"]}, inputs={"base": base_fp, "demos": demos_fp})
        student = sft_dir / "merged"
        samples = out / "samples.jsonl"
        sample_options = {**train, "seed": seed, **c["sample"]}
        samples_fp = self.stages.run("self_refine_samples", lambda: sample.main(flags({
            **sample_options, "model": str(student), "prompt": "both", "out": str(samples),
            "resume": partial(samples).exists()})),
            outputs=with_partials(samples), options=sample_options, inputs={"sft": sft_fp})
        dpo_dir = out / "dpo"
        dpo_options = {"seed": seed, **c.get("pairs", {}), **c["dpo"], "task": train["task"]}
        dpo_fp = self.stages.run("dpo", lambda: dpo.main(
            ["--model", str(student), "--samples", str(samples), "--demos", str(demos), "--task", train["task"]]
            + flags(c.get("pairs", {})) + self.train_flags(dpo_dir, c["dpo"])),
            outputs=[dpo_dir], options=dpo_options,
            inputs={"sft": sft_fp, "samples": samples_fp, "demos": demos_fp})
        models = {"base": (base, None, {"model": base_fp}),
                  "sft": (student, None, {"model": sft_fp}),
                  "self_refine": (student, dpo_dir / "adapter", {"model": sft_fp, "adapter": dpo_fp})}
        results = {row: {split: self.evaluate(row, split, model, adapter, fps) for split in SPLITS}
                   for row, (model, adapter, fps) in models.items()}
        return self.report(results)

    def evaluate(self, row: str, split: str, model: Path, adapter: Path | None,
                 inputs: dict[str, str]) -> list[dict[str, Any]]:
        """One model on one split: the eval report of each of its tasks (never pooled)."""
        specs = eval_specs(self.cfg, split)
        path = self.out / "eval" / f"{row}.{split}.json"
        options = self.cfg.get("eval_options", {})
        tasks = [f"{s['task']}={s['data']}" if s.get("data") else s["task"] for s in specs]
        extra = {k: v for k, v in specs[0].items() if k not in ("task", "data")}
        self.stages.run(f"eval_{row}_{split}", lambda: eval_recipe.main(flags(
            {"model": str(model), "adapter": str(adapter) if adapter else None, **options, **extra,
             "task": tasks, "out": str(path)})),
            outputs=[path, *path.parent.glob(f"{path.stem}.*.predictions.jsonl")],
            options={"specs": specs, **options},
            inputs={**inputs, "data": [path_digest(s.get("data")) for s in specs]})
        report = read_json(path)
        return report.get("results", [report])

    def report(self, results: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
        rows = {row: {split: {t["task"]: {k: t[k] for k in CELL_KEYS} for t in results[row][split]}
                      for split in SPLITS} for row in ROWS}
        comparisons = {}
        for name, (a, b) in COMPARISONS.items():
            comparisons[name] = {}
            for split in SPLITS:
                pairs = zip(results[a][split], results[b][split])
                comparisons[name][split] = {task: asdict(cmp) for ta, tb in pairs
                                            for task, cmp in compare_predictions(ta["predictions"], tb["predictions"])}
        stages = self.stages
        report = {"rows": rows, "comparisons": comparisons, "stage_seconds": stages.seconds,
                  "total_seconds": round(sum(stages.seconds.values()), 1), "fingerprints": stages.fingerprints,
                  "seed": self.seed, "config": self.cfg}
        write_json(self.out / "report.json", report)
        print(markdown_table(rows, comparisons))
        print(f"total {report['total_seconds']:.0f} s of stage time; report -> {self.out / 'report.json'}")
        return report


def partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def with_partials(path: Path) -> list[Path]:
    """A sampling output and the partial files it resumes from (one per torchrun rank)."""
    return [path, *sorted(path.parent.glob(partial(path).name + "*"))]


def check_budgets(tok: Tokenizer, demos: Path, cfg: dict[str, Any]) -> None:
    """Print the demonstrations' length in tokens; warn where a sampling or eval budget is below its p99
    (samples cut at the budget are unfinished: never chosen in a pair, never a correct answer)."""
    lengths = [len(tok.encode_prompt_completion(record_messages(r["prompt"], demos, line, "prompt"), r["completion"])[1])
               for line, r in read_jsonl(demos)]
    p50, p99 = (float(np.percentile(lengths, q)) for q in (50, 99))
    print(f"demonstrations: {len(lengths)}, answer tokens p50 {p50:.0f}, p99 {p99:.0f}, max {max(lengths)}")
    budgets = {"sample.max_new_tokens": cfg["sample"].get("max_new_tokens", sample.parser().get_default("max_new_tokens"))}
    eval_default = cfg.get("eval_options", {}).get("max_new_tokens", eval_recipe.parser().get_default("max_new_tokens"))
    for split in SPLITS:
        budgets[f"eval.{split}.max_new_tokens"] = eval_specs(cfg, split)[0].get("max_new_tokens", eval_default)
    for name, budget in budgets.items():
        if budget < p99:
            print(f"warning: {name} = {budget} is below the demonstrations' p99 length ({p99:.0f} tokens): "
                  "many answers will be cut unfinished")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _cell(r: dict[str, Any]) -> str:
    lo, hi = r["ci95"]
    return f"{_pct(r['accuracy'])} [{100 * lo:.1f}, {100 * hi:.1f}]"


def _diff(c: dict[str, Any]) -> str:
    lo, hi = c["ci95"]
    return f"{100 * c['diff']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] p={format_p(c['p'])}"


def markdown_table(rows: dict[str, Any], comparisons: dict[str, Any]) -> str:
    """Per split and task: each model's accuracy [95% CI], the paired differences (points) with their 95% CI
    and exact McNemar p; then each model's no-answer and truncation rates."""
    lines = ["| split | task | n | " + " | ".join(NAMES[r] for r in ROWS) + " | SFT - base | SFT+self-refine - SFT |",
             "|---|---|---:|" + "---|" * (len(ROWS) + 2)]
    rates = ["| split | task | " + " | ".join(f"{NAMES[r]}: no answer / cut" for r in ROWS) + " |",
             "|---|---|" + "---|" * len(ROWS)]
    for split in SPLITS:
        for task, first in rows[ROWS[0]][split].items():
            cells = [_cell(rows[r][split][task]) for r in ROWS]
            diffs = [_diff(comparisons[name][split][task]) for name in COMPARISONS]
            lines.append(f"| {split} | {task} | {first['n']} | " + " | ".join(cells + diffs) + " |")
            rates.append(f"| {split} | {task} | " + " | ".join(
                f"{_pct(rows[r][split][task]['no_answer_rate'])} / {_pct(rows[r][split][task]['truncation_rate'])}"
                for r in ROWS) + " |")
    return "\n".join(lines + [""] + rates)


def eval_specs(cfg: dict[str, Any], split: str) -> list[Any]:
    """A split's eval section: one {task, ...} object or a list of them, as a list (empty if missing)."""
    specs = cfg["eval"].get(split)
    return specs if isinstance(specs, list) else [] if specs is None else [specs]


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
        specs = eval_specs(cfg, split)
        if not specs or not all(isinstance(s, dict) and "task" in s for s in specs):
            fail(f"eval.{split} must be a {{task, ...}} object or a non-empty list of them", path)
    check_keys(cfg, path)


TOP_KEYS = ("description", "seed", "model", "gguf", "train", "teacher", "sft", "sample", "pairs", "dpo", "eval",
            "eval_options")


def check_keys(cfg: dict[str, Any], path: str) -> None:
    """Every key must be a flag of the script its section goes to: a typo is an error naming the section and key
    before the first stage, not an argparse usage message three stages in, or a setting silently ignored."""
    def known(parser: argparse.ArgumentParser) -> set[str]:
        return {o[2:].replace("-", "_") for a in parser._actions for o in a.option_strings if o.startswith("--")}

    def check(where: str, options: Any, allowed: set[str]) -> None:
        if not isinstance(options, dict):
            fail(f"{where} must be a JSON object", path)
        for key in options:
            if key not in allowed:
                fail(f"{where}: unknown key {key!r} (known: {', '.join(sorted(allowed))})", path)

    check("the config", cfg, set(TOP_KEYS))
    sampling, training, eval_flags = known(sample.parser()), known(dpo.parser()), known(eval_recipe.parser())
    sections = {"train": sampling, "sft": known(sft.parser()), "sample": sampling, "pairs": training,
                "dpo": training, "eval_options": eval_flags}
    for section, allowed in sections.items():
        check(f"section {section}", cfg.get(section, {}), allowed)
    check("section teacher", cfg.get("teacher", {}), {"type", "model", "sampling"})
    check("section teacher.sampling", cfg.get("teacher", {}).get("sampling", {}), sampling)
    for split in SPLITS:
        for spec in eval_specs(cfg, split):
            check(f"section eval.{split}", spec, eval_flags | {"data"})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = Parser(prog="python -m selfrefine.pipeline", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--seed", type=int, help="overrides the config's seed")
    p.add_argument("--seeds", type=seed_list, help="comma-separated seeds (e.g. 0,1,2): each runs into OUT/seedS, "
                   "then OUT/report.json gives every cell's mean and spread and the paired tests pooled over seeds")
    p.add_argument("--force", action="store_true", help="redo every stage")
    p.add_argument("--model", help="student model directory (instead of converting the packaged SmolLM2)")
    p.add_argument("--data-dir", help="fills {data_dir} in the config's paths")
    p.add_argument("--teacher", help="fills {teacher}: the teacher model directory of configs that sample one")
    args = p.parse_args(argv)
    if args.seed is not None and args.seeds is not None:
        fail("give --seed or --seeds, not both")
    cfg = read_json(args.config)
    check_config(cfg, args.config)
    for key in ("data_dir", "teacher"):
        if "{" + key + "}" in json.dumps(cfg) and not getattr(args, key):
            fail(f"this config uses {{{key}}}: pass --{key.replace('_', '-')} ...", args.config)
    cfg = substitute(cfg, {"data_dir": args.data_dir or "", "teacher": args.teacher or ""})
    if args.model:
        cfg["model"] = args.model
    evals = [s for split in SPLITS for s in eval_specs(cfg, split)]
    check_outputs([("--model", cfg.get("model")), ("--teacher", cfg.get("teacher", {}).get("model")),
                   ("train.data", cfg["train"].get("data")),
                   *((f"eval data of {s['task']}", s.get("data")) for s in evals)],
                  {"--out": args.out}, folders=["--out"], may_hold_inputs=True)  # before the first stage runs
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.seeds is None:
        seed = args.seed if args.seed is not None else cfg.get("seed", 0)
        return Pipeline(cfg, out, seed, args.force).run()
    dirs = seeds.seed_dirs(out, args.seeds)
    reports = {s: Pipeline(cfg, path, s, args.force).run() for s, path in dirs.items()}
    summary = seeds.across_seeds(reports, COMPARISONS)
    write_json(out / "report.json", {**summary, "per_seed": {s: str(d / "report.json") for s, d in dirs.items()},
                                     "total_seconds": round(sum(r["total_seconds"] for r in reports.values()), 1)})
    print(seeds.markdown(summary, NAMES, COMPARISONS))
    print(f"report across seeds -> {out / 'report.json'}")
    return summary


if __name__ == "__main__":
    cli_main(main)
