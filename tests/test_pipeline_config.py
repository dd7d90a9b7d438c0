"""The pipeline's config: sections checked as the recipe configs they become, section.key=value overrides."""

from __future__ import annotations

import copy

import pytest

from selfrefine.errors import UserError
from selfrefine.pipeline_config import SECTIONS, apply_overrides, check_config
from tests.test_pipeline import TINY


def test_tiny_config_passes_and_every_section_has_its_recipe():
    check_config(TINY, "tiny.json")
    assert {"train", "sft", "sample", "pairs", "dpo", "eval_options", "eval.in_domain"} <= set(SECTIONS)


@pytest.mark.parametrize("change, message", [
    (lambda c: c["sft"].update(lrr=1), "tiny.json: section sft: unknown key 'lrr'"),
    (lambda c: c["dpo"].update(beta=-1), "tiny.json: section dpo: beta must be a finite number > 0"),
    (lambda c: c["sample"].update(out="x"), "tiny.json: section sample: key 'out' is set by the pipeline itself"),
    (lambda c: c["eval"]["out_of_domain"][0].update(sizes=3), "tiny.json: section eval.out_of_domain: unknown key"),
    (lambda c: c["train"].update(n=3), "tiny.json: section train: unknown key 'n'"),
    (lambda c: c.update(teacher={"type": "model", "model": "t", "sampling": {"temprature": 1}}),
     "tiny.json: section teacher.sampling: unknown key 'temprature'"),
    (lambda c: c.update(sfft={}), "tiny.json: the config: unknown key 'sfft'"),
    (lambda c: c.update(rounds=0), "tiny.json: the config: rounds must be an integer >= 1, got 0"),
    (lambda c: c.update(rounds="2"), "tiny.json: the config: rounds must be an integer >= 1, got '2'"),
    (lambda c: c.update(round_reference="base"), "round_reference must be one of previous, sft, got 'base'"),
    (lambda c: c["dpo"].update(ref_model="m"), "tiny.json: section dpo: key 'ref_model' is set by the pipeline"),
    (lambda c: c["sft"].update(quiet=True), "tiny.json: section sft: key 'quiet' is set by the pipeline"),
    (lambda c: c["eval_options"].update(verbose=True), "section eval_options: key 'verbose' is set by the pipeline"),
])
def test_a_bad_key_or_value_names_file_section_and_key(change, message):
    cfg = copy.deepcopy(TINY)
    change(cfg)
    with pytest.raises(UserError) as e:
        check_config(cfg, "tiny.json")
    assert message in str(e.value)


def test_overrides_set_typed_values_in_their_sections():
    cfg = apply_overrides(TINY, ["sft.lr=2e-4", "dpo.beta=0.2", "pairs.keep_truncated=false", "seed=3",
                                 "eval.in_domain.size=7", "sample.top_p=0.5"], "tiny.json")
    assert (cfg["sft"]["lr"], cfg["dpo"]["beta"], cfg["pairs"]["keep_truncated"], cfg["seed"]) == (2e-4, 0.2, False, 3)
    assert cfg["eval"]["in_domain"]["size"] == 7 and cfg["sample"]["top_p"] == 0.5
    assert TINY["sft"]["lr"] != 2e-4, "the original is left as it was"
    check_config(cfg, "tiny.json")


@pytest.mark.parametrize("item, message", [
    ("sft.lrr=1", "section sft: unknown key 'lrr'"),
    ("sft.lr=fast", "section sft: lr expected a number"),
    ("sft.out=x", "key 'out' is set by the pipeline itself"),
    ("sfft.lr=1", "unknown section 'sfft'"),
    ("seed=-1", "seed must be >= 0"),
    ("lr=1", "unknown setting 'lr'"),
    ("sft.lr", "expected key=value"),
    ("eval.out_of_domain.size=3", "eval.out_of_domain is a list in the config; set it in the file"),
])
def test_bad_overrides_are_one_line_errors(item, message):
    with pytest.raises(UserError) as e:
        apply_overrides(TINY, [item], "tiny.json")
    assert message in str(e.value)
