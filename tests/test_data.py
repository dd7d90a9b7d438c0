"""SFT records read with their line numbers (bad ones named by file and line), prompts masked out of the labels,
right padding found from lengths, and preference pairs batched chosen rows first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from selfrefine.data import (EXPORT_FORMATS, IGNORE, TokenizedPair, TokenizedText, collate_pairs, encode_example,
                             encode_pair, encode_sft, exported, pack_pairs, pad_batch, read_sft)
from selfrefine.errors import UserError
from selfrefine.tokenizer import Tokenizer
from tests.helpers import write_tiny_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """The tests' tiny ChatML tokenizer: end of turn <|im_end|>, which is also the pad token (as in SmolLM2)."""
    return Tokenizer.from_dir(write_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_read_sft_both_record_shapes(tmp_path: Path) -> None:
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    path = write_jsonl(tmp_path / "demos.jsonl", [
        {"prompt": "What is 1+1?", "completion": "2"},
        {"messages": chat + [{"role": "assistant", "content": "4"}]}])
    assert read_sft(path) == [(1, [{"role": "user", "content": "What is 1+1?"}], "2"), (2, chat, "4")]


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def test_read_sft_trl_conversational_forms(tmp_path: Path) -> None:
    """TRL's prompt-completion form (prompt and completion as messages) and `messages` read as our forms do; a
    `prompt` beside `messages` (chat data sets carry one) is not the prompt."""
    chat = [msg("system", "Be brief."), msg("user", "2+2?")]
    path = write_jsonl(tmp_path / "demos.jsonl", [
        {"prompt": [msg("user", "What is 1+1?")], "completion": [msg("assistant", "2")]},
        {"prompt": chat, "completion": "4"},
        {"prompt": "2+2?", "messages": chat + [msg("assistant", "4")]}])
    assert read_sft(path) == [(1, [msg("user", "What is 1+1?")], "2"), (2, chat, "4"), (3, chat, "4")]


@pytest.mark.parametrize("bad,says", [
    ({"prompt": "q"}, "missing field 'completion'"),
    ({"prompt": "q", "completion": "  "}, "empty completion"),
    ({"prompt": " ", "completion": "a"}, "field 'prompt' must be a non-empty string"),
    ({"prompt": [{"role": "user"}], "completion": "a"}, "field 'prompt': each message needs string 'role'"),
    ({"messages": [{"role": "user", "content": "q"}]}, "'messages' must end with an assistant turn"),
    ({"messages": "q"}, "field 'messages' must be a list of messages"),
    ({"prompt": "q", "completion": [msg("assistant", "a"), msg("assistant", "b")]},
     r"field 'completion' must be a string or a list of one assistant message .*, got a list of 2 message"),
    ({"prompt": "q", "completion": [msg("user", "a")]}, r"got a list of 1 message\(s\) \['user'\]"),
    ({"prompt": "q", "completion": 5}, "'completion' must be a string or a list of one assistant message .*, got int"),
    ({"prompt": [msg("user", "q"), msg("assistant", "a")], "completion": "b"}, "the prompt ends with an assistant"),
    ({"messages": [msg("user", "q"), msg("assistant", "a"), msg("assistant", "b")]}, "the prompt ends with an"),
])
def test_read_sft_names_the_bad_record(tmp_path: Path, bad: dict, says: str) -> None:
    path = write_jsonl(tmp_path / "demos.jsonl", [{"prompt": "q", "completion": "a"}, bad])
    with pytest.raises(UserError, match=says) as info:
        read_sft(path)
    assert (info.value.file, info.value.line) == (str(path), 2)


def test_trl_export_reads_back_to_the_same_examples(tok: Tokenizer, tmp_path: Path) -> None:
    """--export-format trl writes the prompt as one user message and the completion as one assistant message: read
    back, the same token ids and labels as our form (a string prompt is one user turn here)."""
    demos = [{"id": 1, "prompt": "What is 2 plus 3?", "completion": "It is 5."},
             {"id": 2, "prompt": [msg("system", "Be brief."), msg("user", "1+1?")], "completion": "2"}]
    ours, trl = (write_jsonl(tmp_path / f"{f}.jsonl", exported(demos, ("completion",), f)) for f in EXPORT_FORMATS)
    assert exported(demos, ("completion",), "default") == demos
    assert json.loads(trl.read_text().splitlines()[0]) == {
        "id": 1, "prompt": [msg("user", "What is 2 plus 3?")], "completion": [msg("assistant", "It is 5.")]}
    assert encode_sft(tok, read_sft(trl), 64, trl) == encode_sft(tok, read_sft(ours), 64, ours)


def test_encode_example_masks_the_prompt_and_truncates_the_completion(tok: Tokenizer) -> None:
    prompt = [{"role": "user", "content": "What is 2 plus 3?"}]
    p, c = tok.encode_prompt_completion(prompt, "The answer is 5.")
    assert c[-1] == tok.eot_id
    ex, truncated = encode_example(tok, prompt, "The answer is 5.", len(p) + len(c), "demos.jsonl", 3)
    assert not truncated and ex == TokenizedText(p + c, [IGNORE] * len(p) + c)
    ex, truncated = encode_example(tok, prompt, "The answer is 5.", len(p) + 2, "demos.jsonl", 3)
    assert truncated and ex == TokenizedText(p + c[:2], [IGNORE] * len(p) + c[:2])
    with pytest.raises(UserError, match=f"prompt is {len(p)} tokens") as info:
        encode_example(tok, prompt, "The answer is 5.", len(p), "demos.jsonl", 3)
    assert str(info.value).startswith("demos.jsonl:3: ")


def test_pad_batch_pads_on_the_right_and_masks_the_padding() -> None:
    eot = 2  # the pad id is the end-of-turn id, as in SmolLM2: only the lengths say what is padding
    short = TokenizedText([5, 6], [IGNORE, 6])
    long = TokenizedText([7, 8, 9, eot], [IGNORE, IGNORE, 9, eot])
    batch = pad_batch([short, long], pad_id=eot)
    assert batch["input_ids"].tolist() == [[5, 6, eot, eot], [7, 8, 9, eot]]
    assert batch["labels"].tolist() == [[IGNORE, 6, IGNORE, IGNORE], [IGNORE, IGNORE, 9, eot]]
    assert batch["n_tokens"] == 6


def test_pairs_batch_chosen_rows_then_rejected_rows(tok: Tokenizer) -> None:
    prompt, rec = [{"role": "user", "content": "What is 2 plus 3?"}], {"chosen": "It is 5.", "rejected": "It is 6."}
    pair, prompt_cut, answer_cut = encode_pair(tok, prompt, rec, 64, "pairs.jsonl", 1)
    assert not prompt_cut and not answer_cut and pair.chosen.input_ids[-1] == pair.rejected.input_ids[-1] == tok.eot_id
    cut, *_ = encode_pair(tok, prompt, {**rec, "rejected_truncated": True}, 64, "pairs.jsonl", 1)
    assert cut.chosen == pair.chosen and cut.rejected.input_ids == pair.rejected.input_ids[:-1]  # never ended
    other = TokenizedPair(TokenizedText([1, 3], [IGNORE, 3]), TokenizedText([1, 4, 4], [IGNORE, 4, 4]))
    batch = collate_pairs([pair, other], pad_id=0)
    rows = [pair.chosen, other.chosen, pair.rejected, other.rejected]
    assert torch.equal(batch["input_ids"], pad_batch(rows, 0)["input_ids"]) and batch["ref_logps"] is None
    pair.ref_logps, other.ref_logps = (-1.0, -2.0), (-3.0, -4.0)
    assert collate_pairs([pair, other], pad_id=0)["ref_logps"].tolist() == [[-1.0, -2.0], [-3.0, -4.0]]


def test_pack_pairs_holds_the_prompt_once_and_hides_each_answer_from_the_other() -> None:
    p, c, r = [1, 2, 3], [4, 5], [6, 7, 8]
    pair = TokenizedPair(TokenizedText(p + c, [IGNORE] * 3 + c), TokenizedText(p + r, [IGNORE] * 3 + r), (-1.0, -2.0))
    short = TokenizedPair(TokenizedText([9, 4], [IGNORE, 4]), TokenizedText([9, 5], [IGNORE, 5]), (-3.0, -4.0))
    batch = pack_pairs([pair, short], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8], [9, 4, 5, 0, 0, 0, 0, 0]]
    assert batch["positions"][0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5]  # the rejected answer restarts after the prompt
    mask = batch["attn_mask"][0, 0]
    assert mask[5].tolist() == [True, True, True, False, False, True, False, False]  # sees the prompt, not the chosen
    assert mask[4].tolist() == [True] * 5 + [False] * 3 and mask.tril().equal(mask)
    W = 8  # each answer's first token is predicted by the prompt's last one; owners: chosen 0, 1, rejected 2, 3
    assert batch["score_at"].tolist() == [2, 3, 2, 5, 6, W + 0, W + 0]
    assert batch["targets"].tolist() == [4, 5, 6, 7, 8, 4, 5]
    assert batch["owner"].tolist() == [0, 0, 2, 2, 2, 1, 3]
    assert batch["n_tokens"] == 5 + 6 + 2 + 2 and batch["ref_logps"].tolist() == [[-1.0, -2.0], [-3.0, -4.0]]
    with pytest.raises(ValueError, match="shared"):
        pack_pairs([TokenizedPair(TokenizedText([1, 4], [IGNORE, 4]), TokenizedText([2, 4], [IGNORE, 4]))], 0)
