"""Text <-> token ids and chat prompts.

A model's chat template (`chat_template` in tokenizer_config.json, or chat_template.jinja) is rendered as
`transformers`' `apply_chat_template` renders it, with jinja2 (an optional dependency, imported when first
needed): same sandboxed environment, filters, globals and variables (`_ChatTemplate`), so the prompts are the ones
the model was tuned on, including what a hand-written format would miss (Llama-3.1's "Cutting Knowledge Date"
system header, Mistral-v0.3's spacing). `--chat-format` picks another: a .jinja file, or one of the built-in formats
below, which are also the fallback for a model without a template (plain) and, for a template they recognise,
for an install without jinja2. A template that is neither renderable nor recognised is an error, never a silent
plain format.

The built-in formats recognise the family from its markers and render it in Python, matching what
`apply_chat_template` produces for the standard templates of each family:

- chatml  (`<|im_start|>`; SmolLM2, Qwen2): `<|im_start|>{role}\\n{content}<|im_end|>\\n`, plus the
  template's default system prompt when it has one and the conversation brings none.
- llama3  (`<|start_header_id|>`): `<|begin_of_text|>` once, then headers; contents are trimmed (no system header).
- llama2  (`[INST]` and `<<SYS>>`): BOS before every user turn; the system prompt sits in `<<SYS>>`
  inside the first user turn.
- mistral (`[INST]`, no `<<SYS>>`): Mixtral-8x7B-Instruct-v0.1's template (Mistral-7B-Instruct-v0.1's
  differs only by a space after each `</s>`); that template refuses system messages, we prepend one to
  the first user turn, separated by a blank line, as later Mistral templates do.
- plain   (no template, base models): turns separated by blank lines, assistant turns end with EOS.

Only the chat template emits control tokens. Everything that comes from the user or a data set (message
contents and roles, completions, raw prompts) is plain text: a special-token string in it (`<|im_end|>`,
`<|start_header_id|>`, `</s>`, ...) is tokenized as the characters it is made of, as transformers does with
`split_special_tokens=True`, so a prompt cannot open a turn of its own. The rendered conversation is kept as
segments (template text, conversation text); `render_chat` joins them into the text transformers'
`apply_chat_template` writes, and encoding marks the template's own control tokens and encodes the whole
string in one call to a copy of the tokenizer that matches only those marks (see `_PlainTextEncoder`), so on
text without special-token strings the ids are exactly those of the plain `tokenizers` encoding (transformers'
`apply_chat_template(..., tokenize=True)`: the rendered string, no automatic specials added). Nothing adds
automatic specials, so BOS appears exactly where the format puts it. A Jinja template cannot be split into
segments by construction, so the conversation's control-token strings are wrapped in private-use marks before
rendering and come out as conversation segments (`_ChatTemplate`), what transformers does with
`sanitize_control_tokens=True`; by default transformers parses them as control tokens.
"""

from __future__ import annotations

import json
import os
import re
import sys
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Union

import tokenizers

from .errors import fail
from .files import read_json

CHAT_FORMATS = ("chatml", "llama2", "llama3", "mistral", "plain")
TEMPLATE = "template"  # the model's own chat template (or a .jinja file), rendered with jinja2
# The special tokens transformers passes to a template (`special_tokens_map`), by their variable names.
TEMPLATE_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
ChatInput = Union[str, list[dict[str, str]]]

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


def normalize_chat(messages: ChatInput) -> list[dict[str, str]]:
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


# (text, is_template): template text may hold control tokens; the conversation's own text is plain text.
Segment = tuple[str, bool]
# Supplementary Private Use Area-A: never in real text. It prefixes the template's control tokens while encoding.
_MARK = "\U000F0000"
# Wrapped around the conversation's control-token strings while a Jinja template renders it (see `_ChatTemplate`).
_OPEN, _CLOSE = "\U000F0001", "\U000F0002"
_PRIVATE = re.compile(f"[{_MARK}{_OPEN}{_CLOSE}]")


def _strip(segments: list[Segment]) -> list[Segment]:
    """`"".join(segments).strip()`, keeping the segments."""
    out = list(segments)
    for step in (1, -1):
        order = range(len(out)) if step == 1 else range(len(out) - 1, -1, -1)
        for i in order:
            text, kind = out[i]
            out[i] = (text.lstrip() if step == 1 else text.rstrip(), kind)
            if out[i][0]:
                break
    return [seg for seg in out if seg[0]]


class _PlainTextEncoder:
    """Encodes rendered segments so that only the template's control tokens become control ids.

    A copy of the tokenizer with `encode_special_tokens` set (the `tokenizers` switch behind transformers'
    `split_special_tokens=True`) does not match special added tokens. In that copy every control token `t` gets
    a twin, `_MARK + t`, added as a plain added token with `t`'s matching flags (lstrip/rstrip/normalized) and
    mapped back to `t`'s id after encoding. Control tokens in template text are written as their twins; the
    conversation's text is left as it is, so the special-token strings in it are plain text. The whole string
    goes through `tokenizers` in one call: where the text has no special-token strings the split points, and so
    the ids, are those of the ordinary encoding (a pre-tokenizer like Metaspace(prepend_scheme="first") sees the
    same offsets, which encoding the pieces one by one would not give).

    Control tokens are the special added tokens, plus the chat format's own tokens (`control`) where the
    vocabulary has them as non-special added tokens. Other non-special added tokens stay recognised everywhere,
    as in transformers.
    """

    def __init__(self, tok: tokenizers.Tokenizer, control: set[str]) -> None:
        data = json.loads(tok.to_str())
        for added in data.get("added_tokens") or []:
            if added.get("content") in control:
                added["special"] = True
        self.tok = tokenizers.Tokenizer.from_str(json.dumps(data))
        self.tok.encode_special_tokens = True
        specials = {a.content: (i, a) for i, a in self.tok.get_added_tokens_decoder().items() if a.special}
        self.tok.add_tokens([tokenizers.AddedToken(_MARK + t, special=False, normalized=a.normalized, lstrip=a.lstrip,
                                                   rstrip=a.rstrip, single_word=a.single_word)
                             for t, (_, a) in specials.items()])
        self.unmark = {self.tok.token_to_id(_MARK + t): i for t, (i, _) in specials.items()}
        longest_first = sorted(specials, key=len, reverse=True)
        self.control_re = re.compile("|".join(map(re.escape, longest_first)) or "(?!)")
        self.twin_re = re.compile(_MARK + f"(?:{self.control_re.pattern})")

    def encode(self, segments: list[Segment]) -> list[int]:
        if any(self.twin_re.search(text) for text, template in segments if not template):
            fail("the text has U+F0000 before a special token, a private-use mark reserved for control tokens")
        text = "".join(self.control_re.sub(lambda m: _MARK + m.group(0), text) if template else text
                       for text, template in segments)
        return [self.unmark.get(i, i) for i in self.tok.encode(text, add_special_tokens=False).ids]


def _jinja() -> Any:
    """jinja2, or None where it is not installed: it is optional, needed only to render chat templates."""
    try:
        import jinja2
        import jinja2.ext
        import jinja2.sandbox
    except ImportError:
        return None
    return jinja2


@lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    """The template compiled as transformers' `_compile_jinja_template` does: a sandbox (templates are code from
    the Hub), trim_blocks and lstrip_blocks, loop controls, its `tojson`, `raise_exception` and `strftime_now`;
    `{% generation %}` (which marks assistant text for transformers' assistant mask) renders its body."""
    jinja2 = _jinja()

    class Generation(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        fail(f"the chat template is not valid Jinja: {e} (line {e.lineno})")


class _ChatTemplate:
    """A Jinja chat template, rendered into segments as `apply_chat_template` renders it.

    The template sees what transformers gives it: `messages`, `add_generation_prompt`, `tools` and `documents`
    (None) and the special tokens (`variables`, e.g. `bos_token`). Its text is not split into template and
    conversation parts by construction, so before rendering, every control-token string in the conversation
    (`control_re`: those the encoder turns into control ids) is wrapped in private-use marks; afterwards the marked
    strings are conversation segments, encoded as plain text, and the rest is template text. That is transformers'
    `sanitize_control_tokens=True`, not its default, which encodes such strings as control tokens. A template
    that cuts a marked string apart (slicing, `split`) leaves lone marks; they are dropped and the pieces are
    template text. Text with the private-use marks themselves is refused, since it could forge them.

    Templates that read the date (Llama-3.2's `strftime_now`) render differently from one day to the next, as in
    transformers.
    """

    def __init__(self, template: str, variables: dict[str, str], control_re: re.Pattern) -> None:
        self.compiled, self.variables, self.control_re = _compile(template), variables, control_re
        self.marked_re = re.compile(f"{_OPEN}({control_re.pattern}){_CLOSE}|[{_OPEN}{_CLOSE}]")

    def _mark(self, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        if _PRIVATE.search(value):
            fail("a message has U+F0000, U+F0001 or U+F0002, private-use marks reserved for control tokens")
        return self.control_re.sub(lambda t: _OPEN + t.group(0) + _CLOSE, value)

    def segments(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[Segment]:
        marked = [{k: self._mark(v) for k, v in m.items()} for m in messages]
        try:
            text = self.compiled.render(messages=marked, tools=None, documents=None,
                                        add_generation_prompt=add_generation_prompt, **self.variables)
        except _jinja().exceptions.TemplateError as e:
            fail(f"the chat template refused the conversation: {e}")
        # re.split keeps the group: [template text, marked string (None for a lone mark), template text, ...]
        return [(piece, i % 2 == 0) for i, piece in enumerate(self.marked_re.split(text)) if piece]


def _model_template(model_dir: Path, tok_config: dict[str, Any]) -> str | None:
    """The chat template from tokenizer_config.json or chat_template.jinja (where transformers >= 5 saves it)."""
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if template is not None and not isinstance(template, str):
        fail(f"chat_template must be a string (or a list of {{name, template}}), got {type(template).__name__}",
             model_dir / "tokenizer_config.json")
    if template is None and (model_dir / "chat_template.jinja").is_file():
        template = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    return template


def _pick_format(requested: str | None, template: str | None, where: Path) -> tuple[str, str | None]:
    """(chat format, template) for `--chat-format` `requested`: a built-in format, TEMPLATE or a .jinja file;
    None is the model's own template where it has one (plain where not). Without jinja2 a template falls back to
    the built-in format that recognises it, with a warning, since the two can differ; one that none recognises
    is an error rather than a silent plain format."""
    if requested is not None and requested not in (*CHAT_FORMATS, TEMPLATE):
        path = Path(requested)
        if not path.is_file():
            fail("chat template file not found" if requested.endswith(".jinja") else f"unknown chat format "
                 f"{requested!r}: choose from {', '.join(CHAT_FORMATS)}, {TEMPLATE} or give a .jinja file")
        template, requested, where = path.read_text(encoding="utf-8"), TEMPLATE, path
    if requested in CHAT_FORMATS:
        return requested, template
    if not template:
        if requested == TEMPLATE:
            fail("no chat template (tokenizer_config.json's chat_template or chat_template.jinja)", where)
        return "plain", None
    if _jinja() is not None:
        return TEMPLATE, template
    family = detect_chat_format(template)
    if requested == TEMPLATE or family == "plain":
        fail("rendering this chat template needs jinja2 (pip install 'jinja2>=3.1'), or choose a built-in "
             f"format with --chat-format ({', '.join(CHAT_FORMATS)})", where)
    print(f"warning: jinja2 is not installed: the chat template is rendered by the built-in {family} format, "
          "which can differ from it (pip install 'jinja2>=3.1')", file=sys.stderr)
    return family, template


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the model's special tokens and chat format."""

    def __init__(self, tok: tokenizers.Tokenizer, *, bos: str | None, eos: str, pad: str | None, chat_format: str,
                 system_prompt: str | None = None, adds_bos: bool = False, extra_stop_ids: tuple[int, ...] = (),
                 template: str | None = None, template_vars: dict[str, str] | None = None) -> None:
        """`chat_format` TEMPLATE renders `template` (with `template_vars`, the special tokens by their Jinja names);
        the end of an assistant turn and the control tokens come from the family its markers show."""
        if chat_format not in (*CHAT_FORMATS, TEMPLATE):
            fail(f"unknown chat format {chat_format!r} (choose from {', '.join(CHAT_FORMATS)}, {TEMPLATE})")
        if chat_format == TEMPLATE and not template:
            fail("the template chat format needs a chat template")
        family = detect_chat_format(template) if chat_format == TEMPLATE else chat_format
        self.tok, self.chat_format, self.system_prompt, self.adds_bos = tok, chat_format, system_prompt, adds_bos
        self.bos_token, self.eos_token = bos, eos
        self.eot_token = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}.get(family, eos)
        self.bos_id = None if bos is None else self._id(bos)
        self.eos_id, self.eot_id = self._id(eos), self._id(self.eot_token)
        # Padding is masked out everywhere, so any id works; EOS is the usual choice when none is declared.
        self.pad_id = self.eos_id if pad is None else self._id(pad)
        self.stop_ids = list(dict.fromkeys([self.eot_id, self.eos_id, *extra_stop_ids]))
        control = {t for t in (bos, eos, pad, self.eot_token) if t is not None}
        control |= {"chatml": {"<|im_start|>"}, "llama3": {"<|begin_of_text|>", "<|start_header_id|>",
                                                            "<|end_header_id|>"}}.get(family, set())
        if chat_format == TEMPLATE:  # the added tokens the template writes, as transformers' sanitizer takes them
            control |= {a.content for a in tok.get_added_tokens_decoder().values()
                        if a.content in template and not a.content.isspace()}
        self._plain = _PlainTextEncoder(tok, control)
        self._template = (_ChatTemplate(template, template_vars or {}, self._plain.control_re)
                          if chat_format == TEMPLATE else None)

    def _id(self, token: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            fail(f"special token {token!r} is not in the vocabulary (chat format {self.chat_format})")
        return i

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike, chat_format: str | None = None) -> "Tokenizer":
        """Read tokenizer.json; special tokens from tokenizer_config.json, then special_tokens_map.json,
        then generation_config.json; the chat format as `_pick_format` chooses it (`chat_format`: --chat-format)."""
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
        fmt, template = _pick_format(chat_format, _model_template(model_dir, tok_config), model_dir)
        # Base-model prompts ("plain") start with BOS iff the tokenizer adds one by default.
        adds_default = bos is not None and tok.encode("a", add_special_tokens=True).ids[:1] == [tok.token_to_id(bos)]
        named = {name: _token_text(c[name]) for c in (tok_map, tok_config) for name in TEMPLATE_TOKENS
                 if _token_text(c.get(name))}  # as transformers' special_tokens_map: tokenizer_config.json wins
        return cls(tok, bos=bos, eos=eos, pad=special("pad"), chat_format=fmt,
                   system_prompt=default_system_prompt(template) if fmt in ("chatml", TEMPLATE) else None,
                   adds_bos=bool(tok_config.get("add_bos_token", adds_default)),
                   extra_stop_ids=tuple(_ids(gen.get("eos_token_id"))), template=template, template_vars=named)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text` as plain text: special-token strings in it are not control tokens (as
        transformers' `split_special_tokens=True`). Nothing is added unless `add_bos`, which puts the BOS id
        first (the text's own BOS string, if any, stays text)."""
        ids = self._plain.encode([(text, False)])
        return [self.bos_id] + ids if add_bos and self.bos_id is not None else ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    def render_chat(self, messages: ChatInput, add_generation_prompt: bool = True) -> str:
        """The conversation as the model's chat template writes it (control tokens as text)."""
        return "".join(text for text, _ in self._segments(messages, add_generation_prompt))

    def encode_chat(self, messages: ChatInput, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered conversation: control ids where the template puts them, and the
        messages' own text (roles and contents) as plain text."""
        return self._plain.encode(self._segments(messages, add_generation_prompt))

    def _segments(self, messages: ChatInput, add_generation_prompt: bool) -> list[Segment]:
        """`render_chat` as (text, is_template) segments."""
        messages = normalize_chat(messages)
        if self._template is not None:
            return self._template.segments(messages, add_generation_prompt)
        return self._format_segments(messages, add_generation_prompt)

    def _format_segments(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[Segment]:
        """A built-in format's rendering, as segments."""
        bos = self.bos_token or ""
        fmt = self.chat_format
        out: list[Segment] = []

        def add(*segments: Segment) -> None:
            out.extend(seg for seg in segments if seg[0])

        def user(text: str) -> Segment:
            return text, False

        def template(text: str) -> Segment:
            return text, True

        if fmt == "chatml":
            if self.system_prompt is not None and messages[0]["role"] != "system":
                add(template(f"<|im_start|>system\n{self.system_prompt}<|im_end|>\n"))
            for m in messages:
                add(template("<|im_start|>"), user(m["role"]), template("\n"), user(m["content"]),
                    template("<|im_end|>\n"))
            if add_generation_prompt:
                add(template("<|im_start|>assistant\n"))
        elif fmt == "llama3":
            add(template(bos))
            for m in messages:
                add(template("<|start_header_id|>"), user(m["role"]), template("<|end_header_id|>\n\n"),
                    user(m["content"].strip()), template("<|eot_id|>"))
            if add_generation_prompt:
                add(template("<|start_header_id|>assistant<|end_header_id|>\n\n"))
        elif fmt == "llama2":  # the prompt already ends where the answer starts
            system, turns = _alternating(fmt, messages)
            for i, m in enumerate(turns):
                content = [user(m["content"])]
                if i == 0 and system is not None:
                    content = [template("<<SYS>>\n"), user(system), template("\n<</SYS>>\n\n"), *content]
                if m["role"] == "user":
                    add(template(f"{bos}[INST] "), *_strip(content), template(" [/INST]"))
                else:
                    add(template(" "), *_strip(content), template(f" {self.eos_token}"))
        elif fmt == "mistral":
            system, turns = _alternating(fmt, messages)
            add(template(bos))
            for i, m in enumerate(turns):
                content = [user(m["content"])]
                if i == 0 and system is not None:
                    content = [user(system), template("\n\n"), *content]
                if m["role"] == "user":
                    add(template("[INST] "), *content, template(" [/INST]"))
                else:
                    add(*content, template(self.eos_token))
        else:  # plain
            add(template(bos if self.adds_bos else ""))
            for m in messages:
                add(user(m["content"]), template(self.eos_token if m["role"] == "assistant" else "\n\n"))
        return out

    def encode_prompt_completion(self, messages: ChatInput, completion: str) -> tuple[list[int], list[int]]:
        """(prompt ids, completion ids) for training on an assistant answer.

        The prompt is `encode_chat(messages)`; the completion is the answer as the template writes it,
        then exactly one end-of-turn id. The answer is plain text like every message: special-token strings in
        it, the end-of-turn string included, are encoded as the characters they are made of, never as control
        ids, so the answer's only end-of-turn id is the template's. The answer is tokenized in context (after
        the prompt) so that leading-space handling (sentencepiece) matches what the model produces when it
        generates; if the boundary merges into one token, the answer is tokenized on its own.
        """
        prompt, (answer,) = self.encode_answers(messages, [completion])
        return prompt, answer

    def encode_answers(self, messages: ChatInput, completions: list[str]) -> tuple[list[int], list[list[int]]]:
        """`encode_prompt_completion` for several answers to one prompt (a preference pair): the prompt is
        rendered and tokenized once."""
        messages = normalize_chat(messages)
        prompt_segments = self._segments(messages, add_generation_prompt=True)
        prompt = self._plain.encode(prompt_segments)
        return prompt, [self._answer_ids(messages, prompt_segments, prompt, c) for c in completions]

    def _answer_ids(self, messages: list[dict[str, str]], prompt_segments: list[Segment], prompt: list[int],
                    completion: str) -> list[int]:
        full = self._segments([*messages, {"role": "assistant", "content": completion}], add_generation_prompt=False)
        prompt_text = "".join(text for text, _ in prompt_segments)
        if not "".join(text for text, _ in full).startswith(prompt_text):
            fail("the chat template writes the prompt differently once the answer follows it (Mistral-v0.3's moves "
                 "the system message), so no answer continues the prompt the model is given: drop the system "
                 f"message or choose a built-in format with --chat-format ({', '.join(CHAT_FORMATS)})")
        # The answer's segments: after the prompt's text, up to the template's (last) end-of-turn token.
        body: list[Segment] = []
        pos = 0
        for text, kind in full:
            cut = text[max(0, len(prompt_text) - pos):]
            pos += len(text)
            if cut:
                body.append((cut, kind))
        last = max((i for i, (text, kind) in enumerate(body) if kind and self.eot_token in text), default=None)
        if last is None:
            fail(f"the chat template does not end an assistant turn with {self.eot_token!r}, the end-of-turn token")
        text, kind = body[last]
        body = body[:last] + [(text[:text.rindex(self.eot_token)], kind)]
        in_context = self._plain.encode(prompt_segments + body)
        answer = in_context[len(prompt):] if in_context[:len(prompt)] == prompt else self._plain.encode(body)
        return answer + [self.eot_id]
