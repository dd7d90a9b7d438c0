"""Bad inputs to the four scripts, the pipeline and the GGUF converter, each run as a real subprocess.

Every case must end the same way: exit code 2, exactly one line on stderr, `error: FILE:LINE: message`
(`error: FILE: message` where the mistake has no line; a flag or a name where no file is at fault), no
traceback anywhere, and nothing on disk changed: the whole fixture tree (models, data, and a folder of
earlier outputs that every case writes into) is hashed before and after, so an overwritten file, a new
run folder or a stray `.partial` counts as a failure.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
from safetensors.torch import load_file, save_file

from selfrefine.lora import LoRAConfig, inject_lora, save_adapter
from selfrefine.model import Transformer
from tests.helpers import make_tiny_model_dir, tiny_config

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def write_text(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


def write_bytes(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def tree_hash(root: Path) -> dict[str, str]:
    """Relative path -> content hash ("dir" for folders) of everything under root."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def model_variant(src: Path, dst: Path, edit: Callable[[Path], None]) -> str:
    shutil.copytree(src, dst)
    edit(dst)
    return str(dst)


def edit_config(**changes) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, **changes}))
    return edit


def reshape_one_tensor(d: Path) -> None:
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.weight"] = tensors["model.layers.0.mlp.down_proj.weight"][:, :-1].contiguous()
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


def truncate_weights(d: Path) -> None:
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])


def foreign_adapter(path: Path) -> str:
    """A valid LoRA adapter of a model with another hidden size."""
    model = Transformer(tiny_config(num_layers=1, hidden_size=32, intermediate_size=64))
    cfg = LoRAConfig(r=2, alpha=4.0, targets=("q_proj", "v_proj"))
    inject_lora(model, cfg)
    save_adapter(model, path, cfg)
    return str(path)


def sample_record(task: str, i: int, prompt_type: str = "cot", correct: bool = True) -> dict:
    answer = i + 1 if correct else i + 5
    completion = f"{i} + 1 = {answer}. The answer is {answer}." if prompt_type == "cot" else f"The answer is {answer}."
    return {"task": task, "id": f"q{i}", "sample": 0, "prompt_type": prompt_type, "prompt": f"What is {i} plus 1?",
            "completion": completion, "finish_reason": "stop", "pred": str(answer), "gold": str(i + 1),
            "correct": correct}


@pytest.fixture(scope="module")
def w(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("faults")
    model = make_tiny_model_dir(root / "model", num_layers=1)
    d = root / "data"
    d.mkdir()
    out = root / "outputs"  # earlier results that a failing command must leave alone
    run = out / "sft_run"
    write_text(run / "run.json", json.dumps({"config": {"lr": 1.0}, "seed": 0}))
    write_text(run / "metrics.jsonl", '{"step": 1, "loss": 2.0}\n')
    write_text(out / "not_a_run" / "notes.txt", "mine\n")
    write_text(out / "samples.jsonl", '{"old": true}\n')
    write_text(out / "report.json", '{"old": true}\n')
    write_text(out / "report.arith.predictions.jsonl", '{"old": true}\n')
    write_text(out / "resume.jsonl.partial", json.dumps({"_header": {"other": "settings"}}) + "\n")
    write_text(out / "pipe" / "report.json", '{"old": true}\n')
    write_text(out / "converted" / "config.json", '{"old": true}\n')
    good = {"prompt": "What is 2 plus 3?", "completion": "2 + 3 = 5. The answer is 5."}
    sections = {"train": {"task": "arith", "size": 4}, "sft": {}, "sample": {}, "dpo": {},
                "eval": {"in_domain": {"task": "arith"}, "out_of_domain": {"task": "arith_ood"}}}
    adapter = foreign_adapter(root / "foreign_adapter")
    corrupt_adapter = root / "corrupt_adapter"
    shutil.copytree(adapter, corrupt_adapter)
    write_text(corrupt_adapter / "adapter_config.json", '{"peft_type": "LORA",\n  "r": 2,,\n  "lora_alpha": 4}\n')
    (d / "latin").mkdir(parents=True)
    (d / "latin" / "valid-labels.lst").write_bytes(b"1\xe9\n")  # Latin-1, not UTF-8
    return SimpleNamespace(
        root=root, model=str(model), out=out, run=str(run),
        no_model=str(root / "missing_model"),
        no_config=model_variant(model, root / "no_config", lambda p: (p / "config.json").unlink()),
        bad_arch=model_variant(model, root / "bad_arch", edit_config(architectures=["GPT2LMHeadModel"])),
        truncated=model_variant(model, root / "truncated", truncate_weights),
        wrong_shape=model_variant(model, root / "wrong_shape", reshape_one_tensor),
        small_ctx=model_variant(model, root / "small_ctx", edit_config(max_position_embeddings=24)),
        template_not_text=model_variant(model, root / "template_not_text", lambda d: (d / "tokenizer_config.json")
                                        .write_text(json.dumps({"eos_token": "<|im_end|>", "chat_template": 12}))),
        adapter=adapter, corrupt_adapter=str(corrupt_adapter),
        sft_good=write_jsonl(d / "sft_good.jsonl", [good] * 4),
        sft_no_completion=write_jsonl(d / "sft_no_completion.jsonl", [good, {"prompt": "What is 1 plus 1?"}, good]),
        sft_bad_json=write_text(d / "sft_bad_json.jsonl", json.dumps(good) + "\n\n" + '{"prompt": "x", "completion": \n'),
        sft_empty=write_text(d / "sft_empty.jsonl", "\n  \n"),
        sft_long_prompt=write_jsonl(d / "sft_long.jsonl", [good, good, {"prompt": "apples " * 60, "completion": "5"}]),
        sft_bad_content=write_jsonl(d / "sft_bad_content.jsonl", [good, good, {"messages": [
            {"role": "user", "content": 7}, {"role": "assistant", "content": "7"}]}]),
        pairs_empty=write_jsonl(d / "pairs_empty.jsonl", [
            {"prompt": "What is 1 plus 1?", "chosen": " ", "rejected": "3"},
            {"prompt": "What is 2 plus 2?", "chosen": "", "rejected": "5"}]),
        pairs_no_rejected=write_jsonl(d / "pairs_no_rejected.jsonl", [
            {"prompt": "What is 1 plus 1?", "chosen": "2", "rejected": "3"},
            {"prompt": "What is 2 plus 2?", "chosen": "4"}]),
        pairs_long=write_jsonl(d / "pairs_long.jsonl", [
            {"prompt": "What is 1 plus 1?", "chosen": "2", "rejected": "3"},
            {"prompt": "apples " * 60, "chosen": "4", "rejected": "5"}]),
        samples_arith=write_jsonl(d / "samples_arith.jsonl", [sample_record("arith", 1),
                                                              sample_record("arith", 1, "direct", False)]),
        raw_no_prompt=write_jsonl(d / "raw_no_prompt.jsonl", [{"id": 1, "prompt": "Hi"}, {"id": 2, "text": "Hi"}]),
        raw_long=write_jsonl(d / "raw_long.jsonl", [{"id": 1, "prompt": "Hi"}, {"id": 2, "prompt": "apples " * 30}]),
        raw_not_text=write_jsonl(d / "raw_not_text.jsonl", [{"id": 1, "prompt": "Hi"}, {"id": 2, "prompt": 12}]),
        raw_dup_id=write_jsonl(d / "raw_dup_id.jsonl", [{"id": 1, "prompt": "Hi"}, {"id": 2, "prompt": "Yo"},
                                                         {"id": 1, "prompt": "Hello"}]),
        gsm_no_hashes=write_jsonl(d / "gsm_no_hashes.jsonl", [
            {"question": "What is 2 plus 3?", "answer": "2 + 3 = 5.\n#### 5"},
            {"question": "What is 1 plus 1?", "answer": "1 + 1 = 2. The answer is 2."}]),
        piqa=write_jsonl(d / "valid.jsonl", [{"goal": f"goal {i}", "sol1": "a", "sol2": "b"} for i in range(3)]),
        piqa_labels=write_text(d / "valid-labels.lst", "0\n1\n"),
        piqa_latin1=write_jsonl(d / "latin" / "valid.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b"}]),
        multiarith_nan=write_text(d / "MultiArith.json", '[{"iIndex": 1, "sQuestion": "1 + 1?", "lSolutions": [2]},\n'
                                                         ' {"iIndex": 2, "sQuestion": "x?", "lSolutions": [NaN]}]\n'),
        deep_json=write_text(d / "deep.jsonl", json.dumps(good) + "\n" + "[" * 200_000 + "\n"),
        surrogate=write_text(d / "surrogate.jsonl", json.dumps(good) + '\n{"prompt": "\\ud800", "completion": "5"}\n'),
        cfg_sections=write_text(d / "cfg_sections.json", json.dumps({"train": {}, "sft": {}})),
        cfg_data_dir=write_text(d / "cfg_data_dir.json", json.dumps(
            {**sections, "eval": {"in_domain": {"task": "gsm8k", "data": "{data_dir}/gsm8k/test.jsonl"},
                                  "out_of_domain": {"task": "arith_ood"}}})),
        cfg_bad_json=write_text(d / "cfg_bad_json.json", '{\n  "train": {"task": "arith"},\n  "sft": {lr: 1}\n}\n'),
        cfg_no_ood=write_text(d / "cfg_no_ood.json", json.dumps({**sections, "eval": {"in_domain": {"task": "arith"}}})),
        cfg_no_task=write_text(d / "cfg_no_task.json", json.dumps({**sections, "train": {"size": 4}})),
        cfg_typo=write_text(d / "cfg_typo.json", json.dumps({**sections, "dpo": {"lr": 1e-4, "max_step": 3}})),
        cfg_top_typo=write_text(d / "cfg_top_typo.json", json.dumps({**sections, "eval_option": {}})),
        not_gguf=write_text(d / "model.gguf", "this is not a GGUF file\n"),
        short_gguf=write_bytes(d / "short.gguf", b"GGUF\x03\x00\x00\x00"),
    )


@dataclass
class Case:
    argv: list[str]
    file: str | None  # the file the message must name (None: no file is at fault)
    line: int | None
    says: str  # a fragment of the message


SFT = ["train_sft.py", "--max-steps", "1", "--batch-size", "2", "--lora-r", "2", "--device", "cpu"]
DPO = ["train_dpo.py", "--max-steps", "1", "--batch-size", "2", "--lora-r", "2", "--device", "cpu"]
SAMPLE = ["sample.py", "--max-new-tokens", "2", "--no-progress", "--device", "cpu"]
EVAL = ["eval.py", "--max-new-tokens", "2", "--no-progress", "--device", "cpu"]
PIPELINE = ["-m", "selfrefine.pipeline"]


def pipeline_config_case(w: SimpleNamespace, config: str, says: str, line: int | None = None) -> Case:
    """The pipeline run on a bad config file: the error names that file (and line)."""
    return Case(PIPELINE + ["--config", config, "--model", w.model, "--out", f"{w.out}/pipe"], config, line, says)
CONVERT = ["-m", "selfrefine.convert_gguf"]

CASES: dict[str, Callable[[SimpleNamespace], Case]] = {
    # train_sft.py: the model directory
    "sft_missing_model_dir": lambda w: Case(
        SFT + ["--model", w.no_model, "--data", w.sft_good, "--out", f"{w.out}/new"], w.no_model, None, "not found"),
    "sft_model_without_config": lambda w: Case(
        SFT + ["--model", w.no_config, "--data", w.sft_good, "--out", f"{w.out}/new"],
        f"{w.no_config}/config.json", None, "file not found"),
    "sft_unsupported_architecture": lambda w: Case(
        SFT + ["--model", w.bad_arch, "--data", w.sft_good, "--out", f"{w.out}/new"],
        f"{w.bad_arch}/config.json", None, "GPT2LMHeadModel"),
    "sft_truncated_weights": lambda w: Case(
        SFT + ["--model", w.truncated, "--data", w.sft_good, "--out", f"{w.out}/new"],
        f"{w.truncated}/model.safetensors", None, "truncated or corrupt"),
    "sft_tensor_of_wrong_shape": lambda w: Case(
        SFT + ["--model", w.wrong_shape, "--data", w.sft_good, "--out", f"{w.out}/new"],
        f"{w.wrong_shape}/model.safetensors", None, "down_proj.weight' has shape"),
    # train_sft.py: the data
    "sft_record_without_completion": lambda w: Case(
        SFT + ["--model", w.model, "--data", w.sft_no_completion, "--out", f"{w.out}/new"],
        w.sft_no_completion, 2, "missing field 'completion'"),
    "sft_bad_json_line": lambda w: Case(
        SFT + ["--model", w.model, "--data", w.sft_bad_json, "--out", f"{w.out}/new"], w.sft_bad_json, 3, "invalid JSON"),
    "sft_empty_data_file": lambda w: Case(
        SFT + ["--model", w.model, "--data", w.sft_empty, "--out", f"{w.out}/new"], w.sft_empty, None, "no records"),
    "sft_prompt_longer_than_max_len": lambda w: Case(
        SFT + ["--model", w.model, "--data", w.sft_long_prompt, "--max-len", "32", "--out", f"{w.out}/new"],
        w.sft_long_prompt, 3, "--max-len 32"),
    "sft_message_content_not_text": lambda w: Case(
        SFT + ["--model", w.model, "--data", w.sft_bad_content, "--out", f"{w.out}/new"], w.sft_bad_content, 3,
        "'content'"),
    # train_sft.py: the output folder and flags
    "sft_out_holds_another_run": lambda w: Case(
        SFT + ["--model", w.model, "--data", w.sft_good, "--out", w.run], w.run, None, "holds another run"),
    "sft_out_not_empty_without_run": lambda w: Case(
        SFT + ["--model", w.model, "--data", w.sft_good, "--out", f"{w.out}/not_a_run"],
        f"{w.out}/not_a_run", None, "not empty"),
    "sft_resume_with_other_config": lambda w: Case(
        SFT + ["--model", w.model, "--data", w.sft_good, "--out", w.run, "--resume"],
        f"{w.run}/run.json", None, "--resume with a different config"),
    "sft_batch_size_zero": lambda w: Case(
        SFT + ["--model", w.model, "--data", w.sft_good, "--out", f"{w.out}/new", "--batch-size", "0"],
        None, None, "--batch-size must be >= 1"),
    "sft_lora_targets_match_nothing": lambda w: Case(
        SFT + ["--model", w.model, "--data", w.sft_good, "--out", f"{w.out}/new", "--lora-targets", "qkv"],
        None, None, "'qkv'"),
    "sft_adapter_of_another_model": lambda w: Case(
        SFT + ["--model", w.model, "--adapter", w.adapter, "--data", w.sft_good, "--out", f"{w.out}/new"],
        f"{w.adapter}/adapter_model.safetensors", None, "the model needs"),
    "sft_corrupt_adapter_config": lambda w: Case(
        SFT + ["--model", w.model, "--adapter", w.corrupt_adapter, "--data", w.sft_good, "--out", f"{w.out}/new"],
        f"{w.corrupt_adapter}/adapter_config.json", 2, "invalid JSON"),
    # train_dpo.py
    "dpo_all_pairs_empty": lambda w: Case(
        DPO + ["--model", w.model, "--pairs", w.pairs_empty, "--out", f"{w.out}/new"], w.pairs_empty, None,
        "no usable preference pairs"),
    "dpo_pair_without_rejected": lambda w: Case(
        DPO + ["--model", w.model, "--pairs", w.pairs_no_rejected, "--out", f"{w.out}/new"], w.pairs_no_rejected, 2,
        "missing field 'rejected'"),
    "dpo_samples_of_another_task": lambda w: Case(
        DPO + ["--model", w.model, "--samples", w.samples_arith, "--task", "gsm8k", "--out", f"{w.out}/new"],
        w.samples_arith, 1, "expected task 'gsm8k'"),
    "dpo_lora_dropout": lambda w: Case(
        DPO + ["--model", w.model, "--pairs", w.pairs_long, "--lora-dropout", "0.1", "--out", f"{w.out}/new"],
        None, None, "--lora-dropout must be 0"),
    # sample.py
    "sample_raw_record_without_prompt": lambda w: Case(
        SAMPLE + ["--model", w.model, "--task", "raw", "--data", w.raw_no_prompt, "--out", f"{w.out}/samples.jsonl"],
        w.raw_no_prompt, 2, "missing field 'prompt'"),
    "sample_raw_prompt_not_text": lambda w: Case(
        SAMPLE + ["--model", w.model, "--task", "raw", "--data", w.raw_not_text, "--out", f"{w.out}/samples.jsonl"],
        w.raw_not_text, 2, "'prompt'"),
    "sample_duplicate_question_id": lambda w: Case(
        SAMPLE + ["--model", w.model, "--task", "raw", "--data", w.raw_dup_id, "--out", f"{w.out}/samples.jsonl"],
        w.raw_dup_id, 3, "question id '1' appears twice (first at line 1)"),
    "sample_prompt_longer_than_context": lambda w: Case(
        SAMPLE + ["--model", w.small_ctx, "--task", "raw", "--data", w.raw_long, "--out", f"{w.out}/samples.jsonl"],
        w.raw_long, 2, "24-token context"),
    "sample_unknown_task": lambda w: Case(
        SAMPLE + ["--model", w.model, "--task", "gsm9k", "--out", f"{w.out}/samples.jsonl"], None, None,
        "unknown task 'gsm9k'"),
    "sample_resume_other_settings": lambda w: Case(
        SAMPLE + ["--model", w.model, "--task", "arith", "--limit", "2", "--out", f"{w.out}/resume.jsonl", "--resume"],
        f"{w.out}/resume.jsonl.partial", 1, "other settings"),
    # eval.py
    "eval_chat_template_not_text": lambda w: Case(
        EVAL + ["--model", w.template_not_text, "--task", "arith", "--limit", "1", "--out", f"{w.out}/r.json"],
        f"{w.template_not_text}/tokenizer_config.json", None, "chat_template must be a string"),
    "eval_gsm8k_without_final_answer": lambda w: Case(
        EVAL + ["--model", w.model, "--task", f"gsm8k={w.gsm_no_hashes}", "--out", f"{w.out}/report.json"],
        w.gsm_no_hashes, 2, "'#### N'"),
    "eval_second_task_bad_keeps_first_outputs": lambda w: Case(
        EVAL + ["--model", w.model, "--task", "arith", "--limit", "2", "--task", "gsm8k", "--data", w.gsm_no_hashes,
                "--out", f"{w.out}/report.json"], w.gsm_no_hashes, 2, "'#### N'"),
    "eval_piqa_labels_shorter_than_questions": lambda w: Case(
        EVAL + ["--model", w.model, "--task", f"piqa={w.piqa}", "--out", f"{w.out}/report.json"],
        w.piqa_labels, 3, "2 labels for 3 questions"),
    "eval_multiarith_nan_answer": lambda w: Case(
        EVAL + ["--model", w.model, "--task", f"multiarith={w.multiarith_nan}", "--out", f"{w.out}/report.json"],
        w.multiarith_nan, 2, "finite numbers"),
    "eval_labels_not_utf8": lambda w: Case(
        EVAL + ["--model", w.model, "--task", f"piqa={w.piqa_latin1}", "--out", f"{w.out}/report.json"],
        str(Path(w.piqa_latin1).with_name("valid-labels.lst")), None, "not a UTF-8 text file"),
    "sft_json_nested_too_deep": lambda w: Case(
        SFT + ["--model", w.model, "--data", w.deep_json, "--out", f"{w.out}/sft_deep"], w.deep_json, 2,
        "nested too deeply"),
    "sft_lone_surrogate": lambda w: Case(
        SFT + ["--model", w.model, "--data", w.surrogate, "--out", f"{w.out}/sft_surrogate"], w.surrogate, 2,
        "lone surrogate"),
    # python -m selfrefine.pipeline
    "pipeline_config_missing_sections": lambda w: pipeline_config_case(w, w.cfg_sections, "needs the sections"),
    "pipeline_data_dir_placeholder_without_flag": lambda w: pipeline_config_case(w, w.cfg_data_dir, "--data-dir"),
    "pipeline_config_bad_json": lambda w: pipeline_config_case(w, w.cfg_bad_json, "invalid JSON", line=3),
    "pipeline_eval_without_out_of_domain": lambda w: pipeline_config_case(w, w.cfg_no_ood, "out_of_domain"),
    "pipeline_train_without_task": lambda w: pipeline_config_case(w, w.cfg_no_task, "'task'"),
    "pipeline_config_key_typo": lambda w: pipeline_config_case(
        w, w.cfg_typo, "section dpo: unknown key 'max_step' (known: "),
    "pipeline_config_section_typo": lambda w: pipeline_config_case(
        w, w.cfg_top_typo, "the config: unknown key 'eval_option'"),
    # python -m selfrefine.convert_gguf
    "convert_non_gguf_file": lambda w: Case(
        CONVERT + ["--gguf", w.not_gguf, "--out", f"{w.out}/converted"], w.not_gguf, None, "not a GGUF file"),
    "convert_truncated_gguf": lambda w: Case(
        CONVERT + ["--gguf", w.short_gguf, "--out", f"{w.out}/converted"], w.short_gguf, None, "cannot parse GGUF"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_error_and_changes_nothing(name: str, w: SimpleNamespace):
    case = CASES[name](w)
    before = tree_hash(w.root)
    r = subprocess.run([sys.executable, *case.argv], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in r.stdout + r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert r.returncode == 2 and len(lines) == 1, (r.returncode, r.stderr)
    if case.file is None:
        assert lines[0].startswith("error: ") and not lines[0].startswith(f"error: {w.root}"), lines[0]
    else:
        where = f"{case.file}:{case.line}: " if case.line is not None else f"{case.file}: "
        assert lines[0].startswith(f"error: {where}"), lines[0]
    assert case.says in lines[0], lines[0]
    after = tree_hash(w.root)
    assert after == before, {k: (before.get(k), after.get(k)) for k in set(before) | set(after)
                             if before.get(k) != after.get(k)}


class AnyPath(SimpleNamespace):
    def __getattr__(self, name: str) -> str:
        return f"/{name}"


def test_at_least_twenty_distinct_cases_over_every_entry_point():
    argvs = [CASES[name](AnyPath()).argv for name in CASES]
    entry_points = {argv[1] if argv[0] == "-m" else argv[0] for argv in argvs}
    assert len(CASES) >= 20 and len({tuple(a) for a in argvs}) == len(CASES)
    assert entry_points == {"train_sft.py", "train_dpo.py", "sample.py", "eval.py", "selfrefine.pipeline",
                            "selfrefine.convert_gguf"}
