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
import glob
import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import seeds
from .answers import load_questions
from .data import read_sft
from .errors import cli_main, fail
from .files import read_json, write_json
from .fingerprint import model_digest, path_digest
from .flags import Parser, seed_list
from .log import logger, set_level
from .paths import check_outputs
from .pipeline_config import SPLITS, VALIDATION, apply_overrides, check_config, eval_specs, recipe_config
from .plots import figures_line
from .provenance import Stages
from .recipes import dpo, eval as eval_recipe, rationales, sample, sft
from .recipes.common import QuestionOptions
from .recipes.eval import compare_predictions, format_p
from .runs import describe
from .tokenizer import Tokenizer

CONFIGS = Path(__file__).resolve().parent / "configs"  # shipped with the package (and linked as ./configs)
DEFAULT_CONFIG = CONFIGS / "demo.json"
ROWS = ("base", "sft", "self_refine")  # one round; each further round r adds a row "self_refine_r<r>"
COMPARISONS = {"sft_vs_base": ("base", "sft"), "self_refine_vs_sft": ("sft", "self_refine")}  # name: (A, B)
NAMES = {"base": "base", "sft": "SFT", "self_refine": "SFT+self-refine"}
QUESTION_KEYS = tuple(f.name for f in fields(QuestionOptions))  # which questions: task, data, split, size...
RESULT_KEYS = ("n", "correct", "accuracy", "ci95", "no_answer_rate", "truncation_rate")  # a cell's numbers
CELL_KEYS = (*RESULT_KEYS, "predictions")
ROUND_SEED_STRIDE = 1_000_000  # round r samples with seed + (r - 1) * this: fresh draws, never another seed's


def round_tag(r: int) -> str:
    """What round r's stages, files and row are suffixed with: nothing for round 1 (the one-round names)."""
    return "" if r == 1 else f"_r{r}"


def round_row(r: int) -> str:
    return f"self_refine{round_tag(r)}"


def row_names(rounds: int) -> tuple[str, ...]:
    return (*ROWS, *(round_row(r) for r in range(2, rounds + 1)))


def comparisons_of(rounds: int) -> dict[str, tuple[str, str]]:
    """SFT - base and round 1 - SFT; for each further round, it against the round before and against SFT."""
    out = dict(COMPARISONS)
    for r in range(2, rounds + 1):
        out[f"{round_row(r)}_vs_{round_row(r - 1)}"] = (round_row(r - 1), round_row(r))
        out[f"{round_row(r)}_vs_sft"] = ("sft", round_row(r))
    return out


def row_name(row: str) -> str:
    return NAMES.get(row) or f"SFT+self-refine round {row.rpartition('_r')[2]}"


@dataclass(frozen=True)
class Round:
    """Self-refine round r: sample with `model` (SFT's for round 1, else round r-1's merged), build pairs, DPO
    from `model` (reference: `model` itself, or the SFT model with round_reference "sft")."""

    number: int
    model: Path
    sample_options: dict[str, Any]
    sample: sample.SampleConfig
    dpo: dpo.DPOConfig


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
    """One seed's run into OUT. Every stage's recipe config is built (and so checked) here, before the first
    stage runs; a stage then only says whether it resumes. `base_evals`: the run whose evaluation of the base
    model this one reads instead of redoing it (under --seeds, the first seed's: greedy decoding of the same
    base model on the same questions does not depend on the seed)."""

    def __init__(self, cfg: dict[str, Any], source: str, out: Path, seed: int, force: bool,
                 base_evals: Pipeline | None = None) -> None:
        self.cfg, self.out, self.seed, self.base_evals = cfg, out, seed, base_evals
        inputs = [Path(p) for p in (cfg.get("model"), cfg.get("teacher", {}).get("model")) if p]
        self.stages = Stages(out, force, protected=tuple(inputs))
        self.base = Path(cfg["model"]) if cfg.get("model") else out / "base"
        self.student = out / "sft" / "merged"
        # The training questions: the train split unless the config names another (the sampler's own default is
        # "test", which would self-refine on the in-domain evaluation questions).
        demos, train = out / "demos.jsonl", {"split": "train", **cfg["train"]}
        rounds = cfg.get("rounds", 1)
        self.rows, self.comparisons = row_names(rounds), comparisons_of(rounds)
        # What each stage is run with (its config below; the provenance record of its options in `run`).
        self.options = {"sft": {"seed": seed, **cfg["sft"]}, "dpo": {"seed": seed, **cfg.get("pairs", {}), **cfg["dpo"]}}
        self.demos = self.teacher_config(train, demos, out / "teacher_samples.jsonl", source)
        self.sft = recipe_config("sft", self.options["sft"], source, model=str(self.base), data=str(demos),
                                 out=str(out / "sft"), merge=True)
        # Cross-task self-refine: the sample section may name its own questions (task, data, split...); the teacher
        # then gives demonstrations for those too, to stand in where the student got none right.
        refine = {k: v for k, v in {**train, **cfg["sample"]}.items() if k in QUESTION_KEYS}
        self.tasks = {"instruction": train["task"], "self_refine": refine["task"]}
        same = all(refine.get(k) == train.get(k) for k in ("task", "data", "split", "data_seed"))  # size/limit: a prefix
        self.refine_demos = None if same else self.teacher_config(
            refine, out / "self_refine_demos.jsonl", out / "self_refine_teacher_samples.jsonl", source)
        pair_demos = demos if self.refine_demos is None else out / "self_refine_demos.jsonl"
        self.rounds: list[Round] = []
        model = self.student
        for r in range(1, rounds + 1):
            tag = round_tag(r)
            options = {"seed": seed, **train, **cfg["sample"]}
            options["seed"] += (r - 1) * ROUND_SEED_STRIDE  # after the merge: a sample.seed keeps rounds apart too
            samples, dpo_dir = out / f"samples{tag}.jsonl", out / f"dpo{tag}"
            ref = str(self.student) if r > 1 and cfg.get("round_reference") == "sft" else None
            self.rounds.append(Round(r, model, options, recipe_config(
                "sample", options, source, model=str(model), prompt="both", out=str(samples)), recipe_config(
                "dpo", self.options["dpo"], source, model=str(model), samples=str(samples), demos=str(pair_demos),
                task=refine["task"], out=str(dpo_dir), merge=r < rounds, ref_model=ref)))
            model = dpo_dir / "merged"  # what the next round starts from
        self.evals = {split: self.eval_config(split, source) for split in (*SPLITS, VALIDATION)
                      if eval_specs(cfg, split)}

    def teacher_config(self, questions: dict[str, Any], demos: Path, samples: Path,
                       source: str) -> rationales.RationalesConfig | sample.SampleConfig:
        """How the teacher writes demonstrations of `questions` into `demos`: the data set's rationales, or a
        teacher model's correct chain-of-thought answers (its samples in `samples`)."""
        teacher = self.cfg.get("teacher", {"type": "rationales"})
        if teacher["type"] == "rationales":
            return recipe_config("train", questions, source, demos_out=str(demos))
        return recipe_config("teacher.sampling", {"seed": self.seed, **questions, **teacher.get("sampling", {})},
                             source, model=teacher["model"], out=str(samples), keep_correct=True, demos_out=str(demos))

    def eval_config(self, split: str, source: str) -> eval_recipe.EvalConfig:
        """A split's evaluation (the model and report path are set per row): each task with its data file."""
        specs = eval_specs(self.cfg, split)
        extra = {k: v for k, v in specs[0].items() if k not in ("task", "data")}
        return recipe_config(f"eval.{split}", {**self.cfg.get("eval_options", {}), **extra}, source,
                             model=str(self.base), task=[s["task"] for s in specs],
                             data=[s["data"] for s in specs if s.get("data")], out=str(self.out / "eval" / "x.json"))

    def question_prompts(self, split: str) -> set[str]:
        """The chain-of-thought prompts of a split's questions ("train": those instruction-tuned and self-refined
        on, both sets)."""
        if split == "train":
            return {q.prompts["cot"] for c in (self.demos, self.rounds[0].sample) for q in c.questions("train")[0]}
        cfg = self.evals[split]
        return {q.prompts["cot"] for name, path in cfg.task_data()
                for q in load_questions(name, path, cfg.split, cfg.size, cfg.data_seed, cfg.limit, cfg.skip)[0]}

    def check_unseen(self, source: str) -> None:
        """No question trained on (instruction-tuning or self-refine: DPO learns from its gold label) is one the
        models are tested on: a cross-task `sample.data` naming an evaluation file, say."""
        train = self.question_prompts("train")
        for split in SPLITS:
            if shared := len(train & self.question_prompts(split)):
                fail(f"the training or self-refine questions share {shared} question(s) with eval.{split}: a model "
                     "is never tested on what it was trained on", source)

    def run(self) -> dict[str, Any]:
        models = self.train()
        results = {row: {split: self.evaluate(row, split, *models[row]) for split in SPLITS} for row in self.rows}
        return self.report(results)

    def train(self) -> dict[str, tuple[Path, Path | None, dict[str, str]]]:
        """Every training stage brought up to date; each row's (model, adapter, fingerprints) to evaluate."""
        base_fp = self.convert()
        demos_fp = self.demonstrations("demos", self.demos)
        pair_demos_fp = demos_fp if self.refine_demos is None else \
            self.demonstrations("self_refine_demos", self.refine_demos)
        check_budgets(Tokenizer.from_dir(self.base, self.sft.chat_format), Path(self.sft.data), self.sft_budgets())
        sft_fp = self.stages.run("sft", lambda: sft.run(resumed(self.sft)), outputs=[Path(self.sft.out)],
                                 options=self.options["sft"], inputs={"base": base_fp, "demos": demos_fp})
        models = {"base": (self.base, None, {"model": base_fp}), "sft": (self.student, None, {"model": sft_fp})}
        start_fp = sft_fp  # the fingerprint of the model the round starts from
        for rd in self.rounds:
            tag = round_tag(rd.number)
            samples_fp = self.stages.run(f"self_refine_samples{tag}",
                                         lambda rd=rd: sample.run(resumed_sampling(rd.sample)),
                                         outputs=with_partials(Path(rd.sample.out)), options=rd.sample_options,
                                         inputs={"model": start_fp, "data": path_digest(rd.sample.data)})
            dpo_fp = self.stages.run(f"dpo{tag}", lambda rd=rd: dpo.run(resumed(rd.dpo)), outputs=[Path(rd.dpo.out)],
                                     options={**self.options["dpo"], "task": rd.dpo.task, "merge": rd.dpo.merge,
                                              "reference": "sft" if rd.dpo.ref_model else "previous"},
                                     inputs={"model": start_fp, "samples": samples_fp, "demos": pair_demos_fp,
                                             "sft": sft_fp})
            models[round_row(rd.number)] = (rd.model, Path(rd.dpo.out) / "adapter",
                                            {"model": start_fp, "adapter": dpo_fp})
            start_fp = dpo_fp
        return models

    def convert(self) -> str:
        """The base model's fingerprint; the packaged GGUF is converted into OUT/base unless the config names one."""
        if self.cfg.get("model"):
            return model_digest(self.base)
        from .convert_gguf import convert, default_gguf_path

        gguf = Path(self.cfg.get("gguf") or default_gguf_path())
        return self.stages.run("convert", lambda: convert(gguf, self.base), outputs=[self.base],
                               options={"gguf": str(gguf)}, inputs={"gguf": path_digest(gguf)})

    def demonstrations(self, stage: str, cfg: rationales.RationalesConfig | sample.SampleConfig) -> str:
        """Demonstrations (stage 1's data; a cross-task self-refine's stand-ins) from `teacher_config`'s config."""
        questions = {k: getattr(cfg, k) for k in QUESTION_KEYS}
        options = {"train": questions, "teacher": self.cfg.get("teacher", {"type": "rationales"}),
                   "export_format": cfg.export_format}  # the file's form: SFT reads either, but it is an output
        data_fp = path_digest(cfg.data)
        if isinstance(cfg, rationales.RationalesConfig):
            return self.stages.run(stage, lambda: rationales.run(cfg), outputs=[Path(cfg.demos_out)],
                                   options=options, inputs={"data": data_fp})
        return self.stages.run(stage, lambda: sample.run(resumed_sampling(cfg)),
                               outputs=[Path(cfg.demos_out), *with_partials(Path(cfg.out))],
                               options={**options, "seed": self.seed},
                               inputs={"data": data_fp, "teacher": model_digest(cfg.model)})

    def sft_budgets(self) -> dict[str, int]:
        """The answer budgets that the demonstrations' lengths should fit in."""
        return {"sample.max_new_tokens": self.rounds[0].sample.max_new_tokens,
                **{f"eval.{split}.max_new_tokens": e.max_new_tokens for split, e in self.evals.items()}}

    def evaluate(self, row: str, split: str, model: Path, adapter: Path | None,
                 inputs: dict[str, str]) -> list[dict[str, Any]]:
        """One model on one split: the eval report of each of its tasks (never pooled). The base model's is
        `base_evals`' when there is one."""
        if row == "base" and self.base_evals is not None:
            return self.base_evals.evaluate(row, split, self.base_evals.base, adapter, inputs)
        specs = eval_specs(self.cfg, split)
        path = self.out / "eval" / f"{row}.{split}.json"
        cfg = replace(self.evals[split], model=str(model), adapter=str(adapter) if adapter else None, out=str(path))
        self.stages.run(f"eval_{row}_{split}", lambda: eval_recipe.run(cfg),
                        outputs=[path, *path.parent.glob(f"{glob.escape(path.stem)}.*.predictions.jsonl")],
                        options={"specs": specs, **self.cfg.get("eval_options", {})},
                        inputs={**inputs, "data": [path_digest(s.get("data")) for s in specs]})
        report = read_json(path)
        return report.get("results", [report])

    def report(self, results: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
        rows = {row: {split: {t["task"]: {k: t[k] for k in CELL_KEYS} for t in results[row][split]}
                      for split in SPLITS} for row in self.rows}
        comparisons = {}
        for name, (a, b) in self.comparisons.items():
            comparisons[name] = {}
            for split in SPLITS:
                pairs = zip(results[a][split], results[b][split])
                comparisons[name][split] = {task: asdict(cmp) for ta, tb in pairs
                                            for task, cmp in compare_predictions(ta["predictions"], tb["predictions"])}
        stages = self.stages
        report = {"tasks": self.tasks, "rows": rows, "comparisons": comparisons, "stage_seconds": stages.seconds,
                  "total_seconds": round(sum(stages.seconds.values()), 1), "fingerprints": stages.fingerprints,
                  "seed": self.seed, "config": self.cfg}
        write_json(self.out / "report.json", report)
        print(f"instruction-tuned on {self.tasks['instruction']}, self-refined on {self.tasks['self_refine']}")
        print(markdown_table(rows, comparisons, self.comparisons))
        print(f"total {report['total_seconds']:.0f} s of stage time; report -> {self.out / 'report.json'}")
        print(figures_line(self.out))
        return report


def partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def with_partials(path: Path) -> list[Path]:
    """A sampling output and the partial files it resumes from (one per torchrun rank)."""
    return [path, *sorted(path.parent.glob(glob.escape(partial(path).name) + "*"))]


def resumed(cfg: Any) -> Any:
    """A training stage resumes when its folder already holds a run."""
    return replace(cfg, resume=(Path(cfg.out) / "run.json").exists())


def resumed_sampling(cfg: sample.SampleConfig) -> sample.SampleConfig:
    """A sampling stage resumes when its partial file is there."""
    return replace(cfg, resume=partial(Path(cfg.out)).exists())


def check_budgets(tok: Tokenizer, demos: Path, budgets: dict[str, int]) -> None:
    """Print the demonstrations' length in tokens; warn where a sampling or eval budget is below its p99
    (samples cut at the budget are unfinished: never chosen in a pair, never a correct answer)."""
    lengths = [len(tok.encode_prompt_completion(prompt, completion)[1]) for _, prompt, completion in read_sft(demos)]
    p50, p99 = (float(np.percentile(lengths, q)) for q in (50, 99))
    logger.info(f"demonstrations: {len(lengths)}, answer tokens p50 {p50:.0f}, p99 {p99:.0f}, max {max(lengths)}")
    for name, budget in budgets.items():
        if budget < p99:
            logger.warning(f"warning: {name} = {budget} is below the demonstrations' p99 length ({p99:.0f} "
                           "tokens): many answers will be cut unfinished")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def format_cell(r: dict[str, Any]) -> str:
    lo, hi = r["ci95"]
    return f"{_pct(r['accuracy'])} [{100 * lo:.1f}, {100 * hi:.1f}]"


def format_diff(c: dict[str, Any]) -> str:
    lo, hi = c["ci95"]
    return f"{100 * c['diff']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] p={format_p(c['p'])}"


def comparison_label(a: str, b: str) -> str:
    return f"{row_name(b)} - {row_name(a)}"


def markdown_table(rows: dict[str, Any], comparisons: dict[str, Any], pairs: dict[str, tuple[str, str]]) -> str:
    """Per split and task: each model's accuracy [95% CI], the paired differences `pairs` (points) with their
    95% CI and exact McNemar p; then each model's no-answer and truncation rates."""
    names = list(rows)
    lines = ["| split | task | n | " + " | ".join(map(row_name, names)) + " | " +
             " | ".join(comparison_label(a, b) for a, b in pairs.values()) + " |",
             "|---|---|---:|" + "---|" * (len(names) + len(pairs))]
    rates = ["| split | task | " + " | ".join(f"{row_name(r)}: no answer / cut" for r in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for split in SPLITS:
        for task, first in rows[names[0]][split].items():
            cells = [format_cell(rows[r][split][task]) for r in names]
            diffs = [format_diff(comparisons[name][split][task]) for name in pairs]
            lines.append(f"| {split} | {task} | {first['n']} | " + " | ".join(cells + diffs) + " |")
            rates.append(f"| {split} | {task} | " + " | ".join(
                f"{_pct(rows[r][split][task]['no_answer_rate'])} / {_pct(rows[r][split][task]['truncation_rate'])}"
                for r in names) + " |")
    return "\n".join(lines + [""] + rates)


def config_parser(prog: str, doc: str | None, out: str, what: str) -> Parser:
    """The flags that say which config runs where (shared with `selfrefine.sweep`)."""
    p = Parser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    shipped = ", ".join(sorted(c.stem for c in CONFIGS.glob("*.json")))
    p.add_argument("--config", default=str(DEFAULT_CONFIG), type=config_path,
                   help=f"a config file, or the name of a shipped one: {shipped} (default: demo)")
    p.add_argument("--out", default=out, help=f"run folder: every stage's outputs and {what} (default: {out})")
    p.add_argument("--seed", type=int, help="overrides the config's seed")
    p.add_argument("--force", action="store_true", help="redo every stage")
    p.add_argument("--model", help="student model directory (instead of converting the packaged SmolLM2)")
    p.add_argument("--data-dir", help="fills {data_dir} in the config's paths")
    p.add_argument("--teacher", help="fills {teacher}: the teacher model directory of configs that sample one")
    p.add_argument("--quiet", action="store_true", help="warnings and results only: no progress lines or bars")
    p.add_argument("--verbose", action="store_true", help="also debugging detail: what loads where, each metrics "
                   "record")
    return p


def parse_args(p: Parser, argv: list[str] | None) -> argparse.Namespace:
    """The command line, with the logging level it asks for set."""
    args = p.parse_intermixed_args(argv)
    if args.quiet and args.verbose:
        p.error("--quiet and --verbose contradict each other: give one")
    set_level(args.quiet, args.verbose)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = config_parser("python -m selfrefine.pipeline", __doc__, "runs/demo", "report.json")
    p.add_argument("--seeds", type=seed_list, help="comma-separated seeds (e.g. 0,1,2): each runs into OUT/seedS, "
                   "then OUT/report.json gives every cell's mean and spread and the paired tests pooled over seeds")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="set a config value, e.g. sft.lr=2e-4 dpo.beta=0.2 eval.in_domain.size=100 seed=1 "
                        "(checked like the file's keys, recorded in OUT/run.json)")
    args = parse_args(p, argv)
    if args.seed is not None and args.seeds is not None:
        fail("give --seed or --seeds, not both")
    cfg = load_config(args)
    out = Path(args.out)
    check_paths(cfg, args.out)
    seed_of = {s: s for s in args.seeds} if args.seeds else {None: run_seed(args, cfg)}
    dirs = seeds.seed_dirs(out, args.seeds) if args.seeds else {None: out}
    pipelines: dict[int | None, Pipeline] = {}
    for s in dirs:  # all checked before the first stage runs; the first seed's base evaluation serves them all
        pipelines[s] = Pipeline(cfg, args.config, dirs[s], seed_of[s], args.force, next(iter(pipelines.values()), None))
    next(iter(pipelines.values())).check_unseen(args.config)  # the seeds share their questions
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "run.json", describe(cfg, overrides=args.overrides, config_file=args.config))
    if args.seeds is None:
        return pipelines[None].run()
    reports = {s: pl.run() for s, pl in pipelines.items()}
    pairs = pipelines[args.seeds[0]].comparisons
    summary = seeds.across_seeds(reports, pairs)
    write_json(out / "report.json", {**summary, "per_seed": {s: str(d / "report.json") for s, d in dirs.items()},
                                     "total_seconds": round(sum(r["total_seconds"] for r in reports.values()), 1)})
    print(seeds.markdown(summary, row_name, pairs))
    print(f"report across seeds -> {out / 'report.json'}")
    print(figures_line(out))
    return summary


def run_seed(args: argparse.Namespace, cfg: dict[str, Any]) -> int:
    """--seed, else the config's seed, else 0."""
    return args.seed if args.seed is not None else cfg.get("seed", 0)


def config_inputs(cfg: dict[str, Any]) -> list[tuple[str, str | None]]:
    """Every file or folder the config reads, with the flag or key that names it (None where it names none)."""
    evals = [s for split in (*SPLITS, VALIDATION) for s in eval_specs(cfg, split)]
    return [("--model", cfg.get("model")), ("--teacher", cfg.get("teacher", {}).get("model")),
            ("train.data", cfg["train"].get("data")), ("sample.data", cfg["sample"].get("data")),
            *((f"eval data of {s['task']}", s.get("data")) for s in evals)]


def check_paths(cfg: dict[str, Any], out: str) -> None:
    """Every input the config names is there and OUT can be written: before the first stage runs."""
    check_outputs(config_inputs(cfg), {"--out": out}, folders=["--out"], may_hold_inputs=True)


def config_path(name: str) -> str:
    """A path as given, or a shipped config by name ("gsm8k_cpu", "gsm8k_cpu.json") when no such file is here."""
    shipped = CONFIGS / (name if name.endswith(".json") else f"{name}.json")
    return str(shipped) if not Path(name).exists() and "/" not in name and shipped.is_file() else name


def load_config(args: argparse.Namespace) -> dict[str, Any]:
    """The config file with its placeholders filled, --model and the section.key=value overrides applied, checked."""
    cfg = read_json(args.config)
    check_config(cfg, args.config)
    for key in ("data_dir", "teacher"):
        if "{" + key + "}" in json.dumps(cfg) and not getattr(args, key):
            fail(f"this config uses {{{key}}}: pass --{key.replace('_', '-')} ...", args.config)
    cfg = substitute(cfg, {"data_dir": args.data_dir or "", "teacher": args.teacher or ""})
    if args.model:
        cfg["model"] = args.model
    cfg = apply_overrides(cfg, args.overrides, args.config)
    check_config(cfg, args.config)
    return cfg


if __name__ == "__main__":
    cli_main(main)
