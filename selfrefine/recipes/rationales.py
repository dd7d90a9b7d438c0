"""Demonstrations without a teacher model: the data set's own rationales (CommonsenseQA's CoS-E, GSM8K's worked
solutions) or the embedded arith task's programmatic teacher, written as SFT records {id, prompt, completion}.
On the command line: `sample.py --from-rationales --task T [--data F] --demos-out DEMOS.jsonl`."""

from __future__ import annotations

from dataclasses import dataclass

from ..answers import Question
from ..config import setting
from ..data import EXPORT_FORMATS, exported
from ..errors import fail
from ..files import write_jsonl
from ..log import logger
from ..paths import check_outputs
from ..tasks import demonstration
from .common import QuestionOptions


@dataclass
class RationalesConfig(QuestionOptions):
    demos_out: str | None = setting(None, "demonstrations JSONL {id, prompt, completion}", required=True)
    export_format: str = setting("default", "form of --demos-out: ours (prompt and completion strings), or TRL's "
                                 "conversational one (chat messages)", choices=EXPORT_FORMATS)


def rationale_demos(questions: list[Question], kind: str) -> list[dict]:
    """The questions that have a rationale, each as a demonstration on the cot prompt."""
    demos = []
    for q in questions:
        text = demonstration(q.example, kind)
        if text:
            demos.append({"id": q.id, "prompt": q.prompts["cot"], "completion": text})
    return demos


def run(cfg: RationalesConfig) -> list[dict]:
    check_outputs({"--data": cfg.data}, {"--demos-out": cfg.demos_out})
    questions, kind = cfg.questions("train")
    demos = rationale_demos(questions, kind) if kind is not None else []
    if not demos:
        fail(f"task {cfg.task} has no rationales to use as demonstrations", cfg.data)
    write_jsonl(cfg.demos_out, exported(demos, ("completion",), cfg.export_format))
    logger.info(f"{len(demos)} demonstrations from the data's rationales -> {cfg.demos_out}")
    return demos
