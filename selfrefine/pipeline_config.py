"""The pipeline's JSON config. Each section becomes the typed config of the recipe it feeds (`SECTIONS`), so a
misspelt key or a bad value is one line naming file, section and key before the first stage runs, and keys the
pipeline sets itself (the stages' paths) are refused. `section.key=value` overrides on the command line
(`sft.lr=2e-4`, `eval.in_domain.size=100`, `seed=1`) are checked the same way and recorded in OUT/run.json.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from .config import Settings, checked_values, from_mapping, parse_override
from .errors import fail
from .flags import nonneg_int, positive_int
from .recipes.dpo import DPOConfig
from .recipes.eval import EvalConfig
from .recipes.rationales import RationalesConfig
from .recipes.sample import SampleConfig
from .recipes.sft import SFTConfig

SPLITS = ("in_domain", "out_of_domain")
VALIDATION = "validation"  # optional: held-out training questions, what `selfrefine.sweep` chooses settings on
REQUIRED = ("train", "sft", "sample", "dpo", "eval")
_LOG = frozenset({"quiet", "verbose"})  # the command line's --quiet/--verbose: how a run talks, not what it computes
_SAMPLING = _LOG | {"model", "adapter", "out", "resume", "keep_correct", "demos_out", "from_rationales"}
_DPO = _LOG | {"model", "adapter", "pairs", "samples", "demos", "task", "out", "resume", "merge", "ref_model"}
# section -> (the recipe config it becomes, the keys the pipeline sets itself)
SECTIONS: dict[str, tuple[type[Settings], frozenset[str]]] = {
    "train": (RationalesConfig, _LOG | {"demos_out"}),
    "teacher.sampling": (SampleConfig, _SAMPLING),
    "sft": (SFTConfig, _LOG | {"model", "adapter", "data", "out", "resume", "merge"}),
    "sample": (SampleConfig, _SAMPLING | {"prompt"}),
    "pairs": (DPOConfig, _DPO),
    "dpo": (DPOConfig, _DPO),
    "eval_options": (EvalConfig, _LOG | {"model", "adapter", "task", "data", "out", "compare"}),
    **{f"eval.{split}": (EvalConfig, _LOG | {"model", "adapter", "out", "compare"})
       for split in (*SPLITS, VALIDATION)},
}
ROUND_REFERENCES = ("previous", "sft")  # round r's DPO reference: the model of round r-1, or the SFT model


def round_reference(text: str) -> str:
    if text not in ROUND_REFERENCES:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(ROUND_REFERENCES)}, got {text!r}")
    return text


TOP_KEYS = {"description": str, "seed": nonneg_int, "model": str, "gguf": str, "rounds": positive_int,
            "round_reference": round_reference}
SUB_SECTIONS = ("train", "teacher", "sft", "sample", "pairs", "dpo", "eval", "eval_options")


def recipe_config(section: str, mapping: dict[str, Any], source: str, **given: Any) -> Settings:
    """Section `section` as the config of its recipe (`SECTIONS`), with the values the pipeline sets (`given`)."""
    cls, reserved = SECTIONS[section]
    return from_mapping(cls, mapping, source, section, given, reserved)


def eval_specs(cfg: dict[str, Any], split: str) -> list[Any]:
    """A split's eval section: one {task, ...} object or a list of them, as a list (empty if missing)."""
    specs = cfg["eval"].get(split)
    return specs if isinstance(specs, list) else [] if specs is None else [specs]


def sections(cfg: dict[str, Any]) -> list[tuple[str, Any]]:
    """(section name, its JSON object) for each section present, eval split specs included."""
    found = [(name, cfg[name]) for name in ("train", "sft", "sample", "pairs", "dpo", "eval_options") if name in cfg]
    if "sampling" in cfg.get("teacher", {}):
        found.append(("teacher.sampling", cfg["teacher"]["sampling"]))
    return found + [(f"eval.{split}", spec) for split in (*SPLITS, VALIDATION) for spec in eval_specs(cfg, split)]


def check_config(cfg: Any, path: str) -> None:
    """Refuse, before the first stage, a config that a later stage would trip over an hour in."""
    if not isinstance(cfg, dict) or not all(isinstance(cfg.get(k), dict) for k in REQUIRED):
        fail(f"config needs the sections {', '.join(REQUIRED)} (JSON objects)", path)
    for key in cfg:
        if key not in TOP_KEYS and key not in SUB_SECTIONS:
            fail(f"the config: unknown key {key!r} (known: {', '.join(sorted([*TOP_KEYS, *SUB_SECTIONS]))})", path)
    for key, ok in (("seed", lambda v: v >= 0), ("rounds", lambda v: v >= 1)):
        if key in cfg and not (type(cfg[key]) is int and ok(cfg[key])):
            fail(f"the config: {key} must be an integer {'>= 1' if key == 'rounds' else '>= 0'}, got {cfg[key]!r}",
                 path)
    if cfg.get("round_reference", "previous") not in ROUND_REFERENCES:
        fail(f"the config: round_reference must be one of {', '.join(ROUND_REFERENCES)}, got "
             f"{cfg['round_reference']!r}", path)
    if "task" not in cfg["train"]:
        fail("section train needs a 'task'", path)
    teacher = cfg.get("teacher", {"type": "rationales"})
    if not isinstance(teacher, dict) or teacher.get("type") not in ("rationales", "model") or (
            teacher["type"] == "model" and "model" not in teacher) or set(teacher) - {"type", "model", "sampling"}:
        fail('teacher must be {"type": "rationales"} or {"type": "model", "model": DIR, "sampling": {...}}', path)
    for split in SPLITS:
        specs = eval_specs(cfg, split)
        if not specs or not all(isinstance(s, dict) and "task" in s for s in specs):
            fail(f"eval.{split} must be a {{task, ...}} object or a non-empty list of them", path)
    validation = cfg["eval"].get(VALIDATION)
    if validation is not None and not all(isinstance(s, dict) and "task" in s for s in eval_specs(cfg, VALIDATION)):
        fail(f"eval.{VALIDATION} must be a {{task, ...}} object or a list of them", path)
    if any(s.get("split", "test") == "test" and not s.get("data") for s in eval_specs(cfg, VALIDATION)):
        fail(f"eval.{VALIDATION} is held-out training data: give it a split other than test (e.g. train with skip)",
             path)
    for name, options in sections(cfg):
        cls, reserved = SECTIONS[name]
        checked_values(cls, options, path, f"section {name}", reserved)


def apply_overrides(cfg: dict[str, Any], overrides: list[str], path: str) -> dict[str, Any]:
    """`sft.lr=2e-4`-style settings on top of the config, each checked as its section's key (`seed=1` and the other
    top-level keys too); a list-valued eval split is set in the file, not here."""
    cfg = json.loads(json.dumps(cfg))
    for item in overrides:
        key, text = parse_override(item)
        section, _, name = key.rpartition(".")
        if not section:
            if key not in TOP_KEYS:
                fail(f"{item}: unknown setting {key!r} (top-level: {', '.join(TOP_KEYS)}; or SECTION.KEY=VALUE)")
            try:
                cfg[key] = TOP_KEYS[key](text)
            except argparse.ArgumentTypeError as e:
                fail(f"{item}: {key} {e}")
            continue
        if section not in SECTIONS:
            fail(f"{item}: unknown section {section!r} (known: {', '.join(SECTIONS)})")
        target = cfg
        for part in section.split("."):
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                fail(f"{item}: {section} is a list in the config; set it in the file", path)
        cls, reserved = SECTIONS[section]
        target.update(checked_values(cls, {name: text}, f"override {item}", f"section {section}", reserved))
    return cfg
