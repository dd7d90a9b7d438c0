"""Text <-> token ids and chat prompts, without jinja.

Chat templates are Jinja programs; instead of executing them we recognise the family from its markers
and render it in Python, matching what `transformers`' `apply_chat_template` produces for the
standard templates of each family:

- chatml  (`<|im_start|>`; SmolLM2, Qwen2): `<|im_start|>{role}\\n{content}<|im_end|>\\n`, plus the
  template's default system prompt when it has one and the conversation brings none.
- llama3  (`<|start_header_id|>`): `<|begin_of_text|>` once, then headers; contents are trimmed.
- llama2  (`[INST]` and `<<SYS>>`): BOS before every user turn; the system prompt sits in `<<SYS>>`
  inside the first user turn.
- mistral (`[INST]`, no `<<SYS>>`): Mixtral-8x7B-Instruct-v0.1's template (Mistral-7B-Instruct-v0.1's
  differs only by a space after each `</s>`); that template refuses system messages, we prepend one to
  the first user turn, separated by a blank line, as later Mistral templates do.
- plain   (no template, base models): turns separated by blank lines, assistant turns end with EOS.

Rendered text contains special tokens as text (as transformers does) and is encoded without
automatic specials, so BOS appears exactly where the format puts it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Union

import tokenizers

from .errors import fail
from .io import read_json

CHAT_FORMATS = ("chatml", "llama2", "llama3", "mistral", "plain")
Messages = Union[str, list[dict[str, str]]]

# A literal default system message in a ChatML template ("\n" may be a real newline or a Jinja escape).
_DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}+]*?)<\|im_end\|>")


def detect_chat_format(template: str | None) -> str:
    if not template:
        return "plain"
    if "<|im_start|>" in template:
        return "chatml"
    if "<|start_header_id|>" in template:
        return "llama3"
    if "[INST]" in template:
        return "llama2" if "<<SYS>>" in template else "mistral"
    return "plain"


def default_system_prompt(template: str | None) -> str | None:
    """The system message a ChatML template inserts when the conversation has none (SmolLM2, Qwen2)."""
    m = _DEFAULT_SYSTEM.search(template or "")
    return m.group(1).replace("\\n", "\n") if m else None


def as_messages(messages: Messages) -> list[dict[str, str]]:
    """Validate a conversation; a plain string is one user turn."""
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    if not isinstance(messages, list) or not messages:
        fail("a conversation must be a non-empty list of {'role', 'content'} messages (or a string)")
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            fail(f"each message needs string 'role' and 'content', got {m!r}")
    return messages


def _alternating(fmt: str, messages: list[dict[str, str]]) -> tuple[str | None, list[dict[str, str]]]:
    """Split off an optional leading system message; the rest must go user, assistant, user, ..."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    turns = messages[1:] if system is not None else messages
    for i, m in enumerate(turns):
        if m["role"] != ("user", "assistant")[i % 2]:
            fail(f"the {fmt} chat format needs user/assistant turns alternating, starting with user "
                 f"(after an optional system message); turn {i + 1} is {m['role']!r}")
    return system, turns


def _read_optional(path: Path) -> dict[str, Any]:
    data = read_json(path) if path.is_file() else {}
    if not isinstance(data, dict):
        fail("expected a JSON object", path)
    return data


def _ids(value: Any) -> list[int]:
    """generation_config.json token ids: an int, a list of ints, or absent."""
    if isinstance(value, int):
        return [value]
    return [i for i in value if isinstance(i, int)] if isinstance(value, list) else []


def _token_text(value: Any) -> str | None:
    """Special tokens are stored as strings or as serialised AddedTokens ({"content": ...})."""
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the model's special tokens and chat format."""

    def __init__(self, tok: tokenizers.Tokenizer, *, bos: str | None, eos: str, pad: str | None, chat_format: str,
                 system_prompt: str | None = None, adds_bos: bool = False,
                 extra_stop_ids: tuple[int, ...] = ()) -> None:
        if chat_format not in CHAT_FORMATS:
            fail(f"unknown chat format {chat_format!r} (choose from {', '.join(CHAT_FORMATS)})")
        self.tok, self.chat_format, self.system_prompt, self.adds_bos = tok, chat_format, system_prompt, adds_bos
        self.bos_token, self.eos_token = bos, eos
        self.eot_token = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}.get(chat_format, eos)
        self.bos_id = None if bos is None else self._id(bos)
        self.eos_id, self.eot_id = self._id(eos), self._id(self.eot_token)
        # Padding is masked out everywhere, so any id works; EOS is the usual choice when none is declared.
        self.pad_id = self.eos_id if pad is None else self._id(pad)
        self.stop_ids = list(dict.fromkeys([self.eot_id, self.eos_id, *extra_stop_ids]))

    def _id(self, token: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            fail(f"special token {token!r} is not in the vocabulary (chat format {self.chat_format})")
        return i

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike, chat_format: str | None = None) -> "Tokenizer":
        """Read tokenizer.json; special tokens from tokenizer_config.json, then special_tokens_map.json,
        then generation_config.json; the chat template from tokenizer_config.json or chat_template.jinja
        (where transformers >= 5 saves it)."""
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            fail("file not found", path)
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises plain Exception for malformed files
            fail(f"unreadable tokenizer file: {e}", path)
        tok_config, tok_map, gen = (_read_optional(model_dir / name) for name in
                                    ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json"))

        def special(name: str) -> str | None:
            for c in (tok_config, tok_map):
                if _token_text(c.get(f"{name}_token")):
                    return _token_text(c[f"{name}_token"])
            ids = _ids(gen.get(f"{name}_token_id"))
            return tok.id_to_token(ids[0]) if ids else None

        bos, eos = special("bos"), special("eos")
        if eos is None:
            fail("no eos_token in tokenizer_config.json, special_tokens_map.json or generation_config.json", model_dir)
        template = tok_config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if template is None and (model_dir / "chat_template.jinja").is_file():
            template = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
        # Base-model prompts ("plain") start with BOS iff the tokenizer adds one by default.
        adds_default = bos is not None and tok.encode("a", add_special_tokens=True).ids[:1] == [tok.token_to_id(bos)]
        fmt = chat_format or detect_chat_format(template)
        return cls(tok, bos=bos, eos=eos, pad=special("pad"), chat_format=fmt,
                   system_prompt=default_system_prompt(template) if fmt == "chatml" else None,
                   adds_bos=bool(tok_config.get("add_bos_token", adds_default)),
                   extra_stop_ids=tuple(_ids(gen.get("eos_token_id"))))

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text`; special tokens written in the text are recognised, none are added
        unless `add_bos` (and then only if the text does not already start with BOS)."""
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    def render_chat(self, messages: Messages, add_generation_prompt: bool = True) -> str:
        """The conversation as the model's chat template writes it (special tokens as text)."""
        messages = as_messages(messages)
        bos = self.bos_token or ""
        fmt = self.chat_format
        if fmt == "chatml":
            if self.system_prompt is not None and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": self.system_prompt}, *messages]
            text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
            return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")
        if fmt == "llama3":
            text = bos + "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}"
                                 "<|eot_id|>" for m in messages)
            return text + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if add_generation_prompt else "")
        if fmt == "llama2":
            system, turns = _alternating(fmt, messages)
            text = ""
            for i, m in enumerate(turns):
                content = m["content"]
                if i == 0 and system is not None:
                    content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
                text += (f"{bos}[INST] {content.strip()} [/INST]" if m["role"] == "user"
                         else f" {content.strip()} {self.eos_token}")
            return text  # the prompt already ends where the answer starts
        if fmt == "mistral":
            system, turns = _alternating(fmt, messages)
            if system is not None and turns:
                turns = [{"role": "user", "content": f"{system}\n\n{turns[0]['content']}"}, *turns[1:]]
            return bos + "".join(f"[INST] {m['content']} [/INST]" if m["role"] == "user"
                                 else m["content"] + self.eos_token for m in turns)
        text = bos if self.adds_bos else ""  # plain
        return text + "".join(m["content"] + (self.eos_token if m["role"] == "assistant" else "\n\n") for m in messages)

    def encode_chat(self, messages: Messages, add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt))

    def encode_prompt_completion(self, messages: Messages, completion: str) -> tuple[list[int], list[int]]:
        """(prompt ids, completion ids) for training on an assistant answer.

        The prompt is `encode_chat(messages)`; the completion is the answer as the template writes it,
        then exactly one end-of-turn id. The answer is tokenized in context (after the prompt) so that
        leading-space handling (sentencepiece) matches what the model produces when it generates; if the
        boundary merges into one token, the answer is tokenized on its own.
        """
        messages = as_messages(messages)
        if self.eot_token in completion:
            fail(f"the completion contains the end-of-turn token {self.eot_token!r}")
        prompt_text = self.render_chat(messages, add_generation_prompt=True)
        answered = [*messages, {"role": "assistant", "content": completion}]
        full = self.render_chat(answered, add_generation_prompt=False)
        assert full.startswith(prompt_text), "chat rendering is not prefix-stable"
        tail = full[len(prompt_text):]
        body = tail[:tail.rindex(self.eot_token)]
        prompt = self.encode(prompt_text)
        in_context = self.encode(prompt_text + body)
        answer = in_context[len(prompt):] if in_context[:len(prompt)] == prompt else self.encode(body)
        return prompt, answer + [self.eot_id]
