"""Sample answers to a task's questions: teacher demonstrations (stage 1) and the student's own
reasoning paths for self-refine (stage 2). One JSON line per sample, graded against the gold answer."""

from __future__ import annotations

import glob
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

from .. import distributed
from ..answers import answer, encode_prompts
from ..config import setting
from ..data import EXPORT_FORMATS, exported
from ..decode_step import GRAPH_CHOICES, GRAPHS_HELP, use_static_step
from ..errors import fail
from ..files import append_jsonl, drop_torn_tail, read_jsonl, remove_stale_temps, write_jsonl
from ..fingerprint import path_digest
from ..flags import nonneg_float, nonneg_int, positive_int, unit_interval
from ..log import logger
from ..paths import check_outputs
from ..sampling import SamplingParams
from . import rationales
from .common import QUESTIONS, LogOptions, ModelOptions, QuestionOptions, load, parse_command_line

PROMPT_TYPES = {"cot": ("cot",), "direct": ("direct",), "both": ("cot", "direct")}
SAMPLING = "sampling"


def sampling(default: Any, help: str, parse: Callable[[str], Any] | None = None, **kw: Any) -> Any:
    """A setting of the sampling group (how the answers are drawn)."""
    return setting(default, help, parse=parse, group=SAMPLING, **kw)


@dataclass
class SampleConfig(QuestionOptions, ModelOptions):
    model: str | None = setting(None, "Hugging Face model directory (config.json, *.safetensors, tokenizer.json)",
                                group="model")  # required unless --from-rationales (`check`)
    from_rationales: bool = setting(False, "write the data's own rationales (or the embedded task's programmatic "
                                    "teacher) to --demos-out as demonstrations; no model, nothing sampled",
                                    group=QUESTIONS)
    prompt: str = sampling("cot", "both = cot and direct samples", choices=list(PROMPT_TYPES))
    n: int = sampling(1, "samples per question (cot prompt)", positive_int)
    n_direct: int = sampling(1, "samples per question for the direct prompt", positive_int)
    temperature: float = sampling(0.0, "0 = greedy", nonneg_float)
    top_p: float = sampling(1.0, "in (0, 1]; 1 = off", unit_interval)
    top_k: int = sampling(0, "0 = off", nonneg_int)
    max_new_tokens: int = sampling(256, "answer budget in tokens", positive_int)
    batch_size: int = sampling(16, "decoding slots", positive_int)
    cuda_graphs: str = setting("auto", GRAPHS_HELP, choices=list(GRAPH_CHOICES))
    seed: int = sampling(0, "sampling seed (a sample depends only on seed, question and sample index)", nonneg_int)
    no_chat: bool = sampling(False, "plain text prompts, no chat template")
    out: str | None = setting(None, "samples JSONL (written atomically at the end); required unless "
                              "--from-rationales")
    resume: bool = setting(False, "continue from OUT.partial, skipping finished batches")
    keep_correct: bool = setting(False, "also write the correct cot answers as SFT demos")
    demos_out: str | None = setting(None, "demonstrations JSONL {id, prompt, completion} (with --keep-correct "
                                    "or --from-rationales)")
    export_format: str = setting("default", "form of the demonstrations: ours (prompt and completion strings), or "
                                 "TRL's conversational one (chat messages)", choices=EXPORT_FORMATS)
    no_progress: bool = setting(False, "no progress bar")

    def check(self) -> None:
        if self.from_rationales:
            allowed = {*rationales.RationalesConfig.field_map(), *LogOptions.field_map(), "from_rationales"}
            extra = [f.name for f in fields(self) if f.name not in allowed and getattr(self, f.name) != f.default]
            if extra:
                fail(f"--from-rationales samples nothing; drop --{extra[0].replace('_', '-')}")
            if not self.demos_out:
                fail("--from-rationales writes --demos-out: give it")
            return
        for name in ("model", "out"):
            if getattr(self, name) is None:
                fail(f"--{name} is required (unless --from-rationales)")
        if self.demos_out and not self.keep_correct:
            fail("--demos-out goes with --keep-correct (or --from-rationales)")
        if self.export_format != "default" and not self.keep_correct:
            fail("--export-format is the form of the demonstrations: it goes with --keep-correct (or "
                 "--from-rationales)")

    def demos_path(self) -> str | None:
        """Where --keep-correct writes the demonstrations: --demos-out, else OUT-stem.demos.jsonl."""
        if not self.keep_correct:
            return None
        return self.demos_out or str(Path(self.out).with_name(Path(self.out).stem + ".demos.jsonl"))


def read_partial(path: Path, header: dict) -> dict[tuple[str, int, int], dict]:
    """Finished samples of an interrupted run, keyed by (prompt type, question index, sample index); a line torn
    by a kill or a full disk is dropped (and said), a changed input file or setting is refused by name."""
    if torn := drop_torn_tail(path):
        logger.info(f"{path}: dropped a torn last line ({torn} bytes) left by an interrupted write")
    rows = read_jsonl(path, allow_empty=True)
    old = rows[0][1].get("_header", {}) if rows else {}
    for flag, digest in header["inputs"].items():
        if old.get("inputs", {}).get(flag, digest) != digest:
            fail(f"--{flag} changed since the partial samples were made (its content hash differs); delete the "
                 "partial file or drop --resume", path, 1)
    if old != header:
        fail("partial samples were made with other settings; delete the file or drop --resume", path, 1)
    return {(r["prompt_type"], r["_q"], r["sample"]): r for _, r in rows[1:]}


def partial_header(cfg: SampleConfig) -> dict:
    """What a partial file must have been made with to be resumed: the settings that change the samples, and
    the input files by content hash."""
    how = ("resume", "no_progress", "batch_size", "cuda_graphs", "quiet", "verbose")  # how to run, not what is sampled
    header = {k: v for k, v in asdict(cfg).items() if k not in how}
    return {**header, "inputs": {flag: path_digest(getattr(cfg, flag)) for flag in ("model", "adapter", "data")}}


def partial_files(out: Path) -> tuple[Path, list[Path]]:
    """(this rank's partial file, every partial file of OUT). Under torchrun each rank appends to its own
    (OUT.partial, OUT.partial.1, ...); a resume merges them all, whatever the number of ranks was."""
    first = out.with_name(out.name + ".partial")
    mine = first if distributed.rank() == 0 else first.with_name(f"{first.name}.{distributed.rank()}")
    return mine, sorted(p for p in out.parent.glob(glob.escape(first.name) + "*")
                        if p == first or p.suffix[1:].isdigit())


def open_partial(cfg: SampleConfig, out: Path) -> tuple[Path, dict[tuple[str, int, int], dict]]:
    """(this rank's partial file, the samples finished before): read with --resume, else cleared."""
    partial, partials = partial_files(out)
    header = partial_header(cfg)
    done = {key: r for p in partials for key, r in read_partial(p, header).items()} if cfg.resume else {}
    distributed.barrier()  # every rank has read the partial files before any rank rewrites one
    if not cfg.resume and distributed.is_main():
        for stale in partials:
            stale.unlink()
    distributed.barrier()
    if not (cfg.resume and partial.exists()):
        write_jsonl(partial, [{"_header": header}])
    return partial, done


def main(argv: list[str] | None = None) -> list[dict]:
    return run(parse_command_line(SampleConfig, argv, "sample.py", __doc__))


def run(cfg: SampleConfig) -> list[dict]:
    """Sample, grade and write OUT (and the demonstrations with --keep-correct); returns the samples."""
    if cfg.from_rationales:
        return rationales.run(rationales.RationalesConfig(**{k: getattr(cfg, k)
                                                             for k in rationales.RationalesConfig.field_map()}))
    check_outputs({"--model": cfg.model, "--adapter": cfg.adapter, "--data": cfg.data},  # before anything loads
                  {"--out": cfg.out, "--out's partial file": f"{cfg.out}.partial", "--demos-out": cfg.demos_path()})
    questions, kind = cfg.questions("test")
    model, tok, _ = load(cfg)
    ptypes = PROMPT_TYPES[cfg.prompt]
    ctx = model.config.max_position_embeddings
    encoded = {t: encode_prompts(tok, questions, t, ctx, not cfg.no_chat, cfg.data) for t in ptypes}
    out = Path(cfg.out)  # every check is done before any file is touched
    if distributed.is_main():
        remove_stale_temps(out.parent, [out.name] + ([Path(cfg.demos_path()).name] if cfg.keep_correct else []))
    partial, done = open_partial(cfg, out)
    records = []
    for ptype in ptypes:
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                                top_p=cfg.top_p, n=cfg.n if ptype == "cot" else cfg.n_direct)
        before = {(i, j): r for (t, i, j), r in done.items() if t == ptype}
        new = answer(model, tok, cfg.task, questions, kind, ptype, encoded[ptype], params,
                     batch_size=cfg.batch_size, seed=cfg.seed + (0 if ptype == "cot" else 1_000_003),
                     progress=not cfg.no_progress, done=set(before),
                     static=use_static_step(cfg.cuda_graphs, model.lm_head.weight.device),
                     on_record=lambda row, rec: append_jsonl(partial, {**rec, "_q": row[0]}))
        rows = {**before, **new}
        records += [{k: v for k, v in rows[(i, j)].items() if k != "_q"}
                    for i in range(len(questions)) for j in range(params.n)]
    if distributed.is_main():
        write_jsonl(out, records)
        for p in partial_files(out)[1]:
            os.unlink(p)
        print(summary(records, out, kind, ptypes))
        if cfg.keep_correct:
            write_demos(records, Path(cfg.demos_path()), cfg.export_format)
    return records


def summary(records: list[dict], out: Path, kind: str | None, ptypes: tuple[str, ...]) -> str:
    text = f"{len(records)} samples -> {out}"
    if kind is not None:
        for ptype in ptypes:
            sub = [r for r in records if r["prompt_type"] == ptype]
            text += (f"; {ptype}: {sum(r['correct'] for r in sub)}/{len(sub)} correct, "
                     f"{sum(r['finish_reason'] == 'length' for r in sub)} cut at the token limit, "
                     f"{sum(not r['answer_found'] for r in sub)} without an answer")
    return text


def write_demos(records: list[dict], dest: Path, export_format: str = "default") -> None:
    """The first correct cot answer of each question, as an SFT demonstration (in `data.exported`'s form)."""
    demos, seen = [], set()
    for r in records:
        if r["prompt_type"] == "cot" and r["correct"] and r["id"] not in seen:
            seen.add(r["id"])
            demos.append({"id": r["id"], "prompt": r["prompt"], "completion": r["completion"]})
    write_jsonl(dest, exported(demos, ("completion",), export_format))
    logger.info(f"{len(demos)} demonstrations (one correct cot answer per question) -> {dest}")
