"""Turn SFT records and preference pairs into token ids with loss masks, and batch them.

Records are read in our forms or in TRL's conversational ones (`record_turns`), and written in either (`exported`).

Labels carry -100 on the prompt and the padding, so the loss sees only the completion and its single
end-of-turn token. Padding is on the right and found from lengths, never from the pad id (SmolLM2's pad
is its EOS, which must be trained).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .errors import UserError, fail
from .files import read_jsonl
from .tokenizer import normalize_chat

IGNORE = -100
Conversation = list[dict[str, str]]


@dataclass
class TokenizedText:
    input_ids: list[int]
    labels: list[int]


@dataclass
class TokenizedPair:
    chosen: TokenizedText
    rejected: TokenizedText
    ref_logps: tuple[float, float] | None = None  # precomputed reference (chosen, rejected)


def record_messages(prompt: object, path: os.PathLike | str, line: int, field: str) -> Conversation:
    """The tokenizer's conversation check, plus a non-empty prompt, reported at the record's file and line."""
    if isinstance(prompt, str) and not prompt.strip():
        fail(f"field {field!r} must be a non-empty string or a list of {{role, content}} messages", path, line)
    try:
        return normalize_chat(prompt)
    except UserError as e:
        fail(f"field {field!r}: {e.message}", path, line)


def _described(value: object) -> str:
    if isinstance(value, list):
        roles = [m.get("role") if isinstance(m, dict) else type(m).__name__ for m in value]
        return f"a list of {len(value)} message(s) {roles}"
    return type(value).__name__


def answer_text(value: object, path: os.PathLike | str, line: int, field: str) -> str:
    """An answer's text: a string, or TRL's conversational form, a list of exactly one assistant message. More
    turns are refused: only one answer is trained or compared, and silently dropping turns would hide it."""
    if isinstance(value, str):
        return value
    if (isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict)
            and value[0].get("role") == "assistant" and isinstance(value[0].get("content"), str)):
        return value[0]["content"]
    fail(f"field {field!r} must be a string or a list of one assistant message "
         f"[{{\"role\": \"assistant\", \"content\": ...}}], got {_described(value)}", path, line)


def _prompt_before_answer(prompt: Conversation, path: os.PathLike | str, line: int) -> Conversation:
    if prompt[-1]["role"] == "assistant":
        fail("the prompt ends with an assistant message; it must end before one (the answer)", path, line)
    return prompt


def _shared_prompt(rec: dict, answers: tuple[str, ...], path: os.PathLike | str,
                   line: int) -> tuple[Conversation, list[str]]:
    """TRL's implicit prompt: each answer field a whole conversation ending in an assistant message; the messages
    before it, the same in every field, are the prompt."""
    chats: list[Conversation] = []
    for f in answers:
        if not isinstance(rec[f], list):
            fail(f"field {f!r} must be a list of messages (with no 'prompt' field, the messages before the last are "
                 "the prompt)", path, line)
        chat = record_messages(rec[f], path, line, f)
        if len(chat) < 2 or chat[-1]["role"] != "assistant":
            fail(f"{f!r} must end with an assistant turn after at least one other turn", path, line)
        if chats and chat[:-1] != chats[0][:-1]:
            fail(f"{f!r} and {answers[0]!r} must share every message but their last (the implicit prompt)", path, line)
        chats.append(chat)
    return _prompt_before_answer(chats[0][:-1], path, line), [chat[-1]["content"] for chat in chats]


def record_turns(rec: dict, answers: tuple[str, ...], path: os.PathLike | str, line: int,
                 implicit: bool) -> tuple[Conversation, list[str]]:
    """(prompt messages, one text per field of `answers`) of a record in any accepted form, ours or TRL's: the one
    place the forms are told apart, so that each reaches the tokenizer as the same messages.

    Explicit prompt: `prompt` is a string (templated as one user turn) or messages, each answer a string or one
    assistant message. `implicit`: no prompt field (TRL's implicit prompt, an SFT record's `messages`), see
    `_shared_prompt`.
    """
    if implicit:
        return _shared_prompt(rec, answers, path, line)
    prompt = _prompt_before_answer(record_messages(rec["prompt"], path, line, "prompt"), path, line)
    return prompt, [answer_text(rec[f], path, line, f) for f in answers]


def sft_turns(rec: dict, path: os.PathLike | str, line: int) -> tuple[Conversation, str]:
    """A demonstration's (prompt messages, completion) from `{"prompt", "completion"}` or `{"messages": [...]}`
    (which wins when both are there: chat data sets carry a `prompt` beside their `messages`)."""
    if "messages" in rec:
        prompt, (completion,) = record_turns(rec, ("messages",), path, line, implicit=True)
        return prompt, completion
    for key in ("prompt", "completion"):
        if key not in rec:
            fail(f"missing field {key!r} (records need prompt+completion, or messages)", path, line)
    prompt, (completion,) = record_turns(rec, ("completion",), path, line, implicit=False)
    return prompt, completion


def read_sft(path: str | os.PathLike) -> list[tuple[int, Conversation, str]]:
    """(line, prompt messages, completion) from records in any form `sft_turns` accepts."""
    rows = []
    for line, rec in read_jsonl(path):
        prompt, completion = sft_turns(rec, path, line)
        if not completion.strip():
            fail("empty completion", path, line)
        rows.append((line, prompt, completion))
    return rows


EXPORT_FORMATS = ("default", "trl")


def exported(records: list[dict], answers: tuple[str, ...], fmt: str) -> list[dict]:
    """Records as written: as built (`default`), or in TRL's conversational form (`trl`), the prompt as messages and
    each answer one assistant message. We template a string prompt as one user turn, TRL uses it raw and templates
    only messages: in this form both tools train on the same tokens."""
    if fmt == "default":
        return records
    as_message = lambda text: [{"role": "assistant", "content": text}]
    return [{**r, "prompt": normalize_chat(r["prompt"]), **{f: as_message(r[f]) for f in answers}} for r in records]


def encode_example(tok, prompt: Conversation, completion: str, max_len: int, path, line: int) -> tuple[TokenizedText, bool]:
    """Prompt + completion ids, prompt masked; (example, was the completion truncated to fit max_len)."""
    try:
        p, c = tok.encode_prompt_completion(prompt, completion)
    except UserError as e:  # the tokenizer knows what is wrong, not where: name the record
        fail(e.message, path, line)
    if len(p) >= max_len:
        fail(f"prompt is {len(p)} tokens, no room for the completion within --max-len {max_len}", path, line)
    truncated = len(p) + len(c) > max_len
    c = c[: max_len - len(p)]
    return TokenizedText(p + c, [IGNORE] * len(p) + c), truncated


def encode_sft(tok, rows: list[tuple[int, Conversation, str]], max_len: int, path) -> tuple[list[TokenizedText], int]:
    out, n_trunc = [], 0
    for line, prompt, completion in rows:
        ex, truncated = encode_example(tok, prompt, completion, max_len, path, line)
        out.append(ex)
        n_trunc += truncated
    return out, n_trunc


def fit_pair(prompt: list[int], chosen: list[int], rejected: list[int],
             max_len: int) -> tuple[list[int], list[int], list[int], bool, bool]:
    """Cut a preference pair so that each side (prompt + answer) fits in `max_len` tokens:
    (prompt, chosen, rejected, prompt was cut, an answer was cut).

    The prompt goes first, from its START (its last tokens, the question and the assistant header, stay), but
    never below min(len(prompt), max_len // 2) tokens; what still does not fit is cut from the answers' ENDS.
    Both sides keep the same prompt tokens, so the pair stays a contrast between two answers to one prompt.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest <= max_len:
        return prompt, chosen, rejected, False, False
    keep = min(len(prompt), max(max_len - longest, max_len // 2))
    room = max_len - keep
    return prompt[len(prompt) - keep:], chosen[:room], rejected[:room], keep < len(prompt), longest > room


def encode_pair(tok, prompt: Conversation, rec: dict, max_len: int, path, line: int | None) -> tuple[TokenizedPair, bool, bool]:
    """A pair record as (TokenizedPair, prompt was cut, an answer was cut), fitted by `fit_pair`.

    A side marked `"chosen_truncated"` / `"rejected_truncated"` (a sample that hit the token limit) is encoded
    without the end-of-turn token: the model never ended that answer, and training it to would be a lie.
    """
    try:
        p, (c, r) = tok.encode_answers(prompt, [rec["chosen"], rec["rejected"]])
    except UserError as e:  # the tokenizer knows what is wrong, not where: name the record
        fail(e.message, path, line)
    if rec.get("chosen_truncated") is True:
        c = c[:-1]
    if rec.get("rejected_truncated") is True:
        r = r[:-1]
    p, c, r, prompt_cut, answer_cut = fit_pair(p, c, r, max_len)
    side = lambda a: TokenizedText(p + a, [IGNORE] * len(p) + a)
    return TokenizedPair(side(c), side(r)), prompt_cut, answer_cut


def pad_batch(examples: list[TokenizedText], pad_id: int) -> dict:
    """Right-pad to the longest row: causal attention never lets a real token see the padding after it."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
    return {"input_ids": ids, "labels": labels, "n_tokens": sum(len(e.input_ids) for e in examples)}


def _reference(pairs: list[TokenizedPair]) -> torch.Tensor | None:
    refs = [p.ref_logps for p in pairs]
    return None if any(r is None for r in refs) else torch.tensor(refs, dtype=torch.float32)


def collate_pairs(pairs: list[TokenizedPair], pad_id: int) -> dict:
    """Chosen rows then rejected rows in one padded batch, so one forward pass scores both."""
    batch = pad_batch([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    batch["ref_logps"] = _reference(pairs)
    return batch


def prompt_length(pair: TokenizedPair) -> int:
    """The tokens before the answers (the masked labels), the same on both sides of a pair."""
    n = next((i for i, label in enumerate(pair.chosen.labels) if label != IGNORE), len(pair.chosen.labels))
    if n < 1 or pair.chosen.input_ids[:n] != pair.rejected.input_ids[:n] or \
            any(label != IGNORE for label in pair.rejected.labels[:n]):
        raise ValueError("a packed pair needs a non-empty prompt shared by both sides")
    return n


def pack_pairs(pairs: list[TokenizedPair], pad_id: int) -> dict:
    """Each pair as one row, its prompt once: prompt, chosen answer, rejected answer, right-padded.

    The prompt is most of a short answer's tokens (the demo: 84 of 136), so this scores a pair with ~30% fewer
    tokens than `collate_pairs`' two rows. Exactly the same numbers in exact arithmetic: the rejected answer's
    positions restart where the prompt ends, `attn_mask` (B, 1, W, W) lets a token see the prompt and earlier
    tokens of its own answer only, and each answer's first token is predicted from the prompt's last one.
    `score_at` (N,) indexes the B * W flattened positions that predict `targets` (N,); `owner` (N,) says whose
    they are: pair b's chosen answer is b, its rejected one B + b (the order of `collate_pairs`' rows).
    `n_tokens` counts both sides' full lengths, as there.
    """
    B = len(pairs)
    rows = [(prompt_length(p), p) for p in pairs]
    width = max(len(p.chosen.input_ids) + len(p.rejected.input_ids) - n for n, p in rows)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    positions = torch.zeros(B, width, dtype=torch.long)
    segment = torch.full((B, width), 3, dtype=torch.long)  # 0 prompt, 1 chosen, 2 rejected, 3 padding
    score_at, targets, owner = [], [], []
    for b, (n, p) in enumerate(rows):
        start = 0
        for side, text in ((0, p.chosen.input_ids[:n]), (1, p.chosen.input_ids[n:]), (2, p.rejected.input_ids[n:])):
            end = start + len(text)
            ids[b, start:end] = torch.tensor(text, dtype=torch.long)
            first = 0 if side == 0 else n  # both answers continue the prompt
            positions[b, start:end] = torch.arange(first, first + len(text))
            segment[b, start:end] = side
            if side and text:
                score_at += [b * width + n - 1] + list(range(b * width + start, b * width + end - 1))
                targets += text
                owner += [b if side == 1 else B + b] * len(text)
            start = end
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    visible = (segment[:, None, :] == 0) | (segment[:, None, :] == segment[:, :, None])
    return {"input_ids": ids, "positions": positions, "attn_mask": (causal & visible)[:, None],
            "score_at": torch.tensor(score_at, dtype=torch.long), "targets": torch.tensor(targets, dtype=torch.long),
            "owner": torch.tensor(owner, dtype=torch.long),
            "n_tokens": sum(len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in pairs),
            "ref_logps": _reference(pairs)}
