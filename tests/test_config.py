"""Typed configs: one dataclass gives the flags, the JSON checks and the key=value overrides, with one rule each."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import pytest

from selfrefine.config import Settings, UsageError, checked_values, flag_name, from_mapping, parse, parser, setting
from selfrefine.errors import UserError
from selfrefine.flags import positive_float, positive_int
from selfrefine.recipes.dpo import DPOConfig
from selfrefine.recipes.eval import EvalConfig
from selfrefine.recipes.sample import SampleConfig
from selfrefine.recipes.sft import SFTConfig


@dataclass
class Toy(Settings):
    name: str | None = setting(None, "a required name", required=True)
    lr: float = setting(1e-3, "a rate", parse=positive_float)
    steps: int = setting(10, "steps", parse=positive_int)
    mode: str = setting("a", "a mode", choices=["a", "b"])
    fast: bool = setting(False, "a switch")
    tag: list[str] = setting(help="repeatable", repeat=True)
    pair: list[str] | None = setting(None, "two things", nargs=2)

    def check(self) -> None:
        if self.fast and self.mode == "b":
            raise UsageError("--fast goes with --mode a")
        if self.steps == 13:
            raise UserError("13 steps are unlucky")


def test_flags_are_generated_from_the_fields_with_help_and_defaults():
    text = parser(Toy, "toy", None).format_help()
    for flag in ("--name", "--lr", "--steps", "--mode", "--fast", "--tag", "--pair", "--config", "key=value"):
        assert flag in text
    assert "a rate (default: 0.001)" in text and "{a,b}" in text
    assert "a required name (required)" in text and "a switch\n" in text and "repeatable\n" in text


@pytest.mark.parametrize("cls", [SFTConfig, DPOConfig, SampleConfig, EvalConfig])
def test_every_recipe_flag_is_listed_with_help_and_its_default(cls):
    """No flag hidden or unexplained in --help, and every default a run gets (0 included) shown."""
    actions = parser(cls, "recipe.py", None)._actions
    assert all(a.help and a.help.strip() and a.help != argparse.SUPPRESS for a in actions)  # --config, key=value too
    helps = {a.dest: a.help for a in actions}
    for f in fields(cls):
        assert f.name in helps, f"{flag_name(f.name)} has no flag"
        if type(f.default) in (int, float) or (type(f.default) is str and f.default):
            assert "default: " in helps[f.name], f"{flag_name(f.name)} does not show its default"


def test_precedence_defaults_config_flags_overrides(tmp_path: Path):
    assert parse(Toy, ["--name", "x"], "toy") == Toy(name="x")
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"name": "file", "lr": 0.5, "steps": 3}))
    cfg = parse(Toy, ["--config", str(cfg_file), "--lr", "0.25", "steps=7", "--tag", "t1", "--tag", "t2"], "toy")
    assert (cfg.name, cfg.lr, cfg.steps, cfg.tag) == ("file", 0.25, 7, ["t1", "t2"])
    assert parse(Toy, ["--name", "x", "lr=0.5", "--lr", "0.1"], "toy").lr == 0.5  # key=value wins over a flag
    assert parse(Toy, ["--name", "x", "fast=true", "--pair", "p", "q"], "toy").fast is True


@pytest.mark.parametrize("argv, message", [
    (["--lr", "1"], "the following arguments are required: --name"),
    (["--name", "x", "--lr", "nan"], "--lr must be a finite number"),
    (["--name", "x", "lr=-1"], "lr=-1: lr must be a finite number > 0"),
    (["--name", "x", "lrr=1"], "lrr=1: unknown setting 'lrr'"),
    (["--name", "x", "lr"], "expected key=value"),
    (["--name", "x", "mode=c"], "mode must be one of a, b"),
    (["--name", "x", "fast=yes"], "fast must be true or false"),
    (["--name", "x", "--fast", "--mode", "b"], "--fast goes with --mode a"),
])
def test_bad_command_lines_are_one_line_usage_errors(argv, message, capsys):
    with pytest.raises((SystemExit, UserError)) as e:
        parse(Toy, argv, "toy")
    text = capsys.readouterr().err if e.type is SystemExit else str(e.value)
    assert message in text and text.count("\n") <= 1
    if e.type is SystemExit:
        assert e.value.code == 2


def test_a_rule_between_settings_stays_a_user_error():
    with pytest.raises(UserError, match="13 steps are unlucky"):
        parse(Toy, ["--name", "x", "--steps", "13"], "toy")


def test_config_file_keys_and_values_are_checked_naming_the_file(tmp_path: Path):
    bad_key = tmp_path / "k.json"
    bad_key.write_text(json.dumps({"name": "x", "lrr": 1}))
    with pytest.raises(UserError, match=r"k.json: --config: unknown key 'lrr'"):
        parse(Toy, ["--config", str(bad_key)], "toy")
    bad_value = tmp_path / "v.json"
    bad_value.write_text(json.dumps({"name": "x", "steps": 2.5}))
    with pytest.raises(UserError, match=r"v.json: --config: steps expected an integer"):
        parse(Toy, ["--config", str(bad_value)], "toy")


@pytest.mark.parametrize("section, message", [
    ({"lrr": 1}, "c.json: section s: unknown key 'lrr' (known: "),
    ({"name": "y"}, "c.json: section s: key 'name' is set by the pipeline itself"),
    ({"lr": "fast"}, "c.json: section s: lr expected a number"),
    ({"lr": True}, "c.json: section s: lr expected a number"),
    ({"steps": [1]}, "c.json: section s: steps expected a number"),
    ({"fast": 1}, "c.json: section s: fast must be true or false"),
    ({"mode": 3}, "c.json: section s: mode must be one of a, b"),
    ({"pair": ["one"]}, "c.json: section s: pair expected a list of 2 values"),
])
def test_sections_are_checked_like_flags(section, message):
    with pytest.raises(UserError) as e:
        from_mapping(Toy, section, "c.json", "s", {"name": "x"})
    assert message in str(e.value)


def test_json_values_are_normalised_and_library_callers_are_checked():
    cfg = from_mapping(Toy, {"lr": 1, "steps": 3, "tag": "one"}, "c.json", "s", {"name": Path("p")})
    assert (cfg.name, cfg.lr, type(cfg.lr), cfg.tag) == ("p", 1.0, float, ["one"])
    json.dumps(asdict(cfg))  # what run.json records
    assert checked_values(Toy, {"steps": "4"}, "f", "w") == {"steps": 4}
    with pytest.raises(UserError, match="setting lr: must be a finite number, got .inf."):
        Toy(name="x", lr=float("inf"))
    with pytest.raises(UserError, match="--name is required"):
        Toy()
