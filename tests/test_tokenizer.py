"""Chat rendering and encoding against transformers' `apply_chat_template` on the standard templates."""

from __future__ import annotations

import json

import pytest
import tokenizers
import torch

from helpers import CHATML_TEMPLATE, make_tiny_model_dir, tiny_tokenizer_json, write_tiny_tokenizer
from selfrefine.errors import UserError
from selfrefine.tokenizer import Tokenizer, default_system_prompt, detect_chat_format

transformers = pytest.importorskip("transformers")

SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
           "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
           "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Qwen2.5-style: the default system prompt sits in a Jinja string with escaped newlines.
QWEN = (r"{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
        r"{%- else %}{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
        r"<|im_end|>\n' }}{%- endif %}{%- for message in messages %}{%- if not (message.role == 'system' and loop.first)"
        r" %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
        r"{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")
LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
          "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
          "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
          "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
          "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
          "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
          "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
          "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
          "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
MIXTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] =="
           " 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles"
           " are supported!') }}{% endif %}{% endfor %}")

# name: (template, format, bos, eos, extra special tokens)
TEMPLATES = {
    "chatml": (CHATML_TEMPLATE, "chatml", None, "<|im_end|>", []),
    "smollm2": (SMOLLM2, "chatml", "<|im_start|>", "<|im_end|>", []),
    "qwen": (QWEN, "chatml", None, "<|im_end|>", []),
    "llama2": (LLAMA2, "llama2", "<s>", "</s>", ["<s>", "</s>"]),
    "llama3": (LLAMA3, "llama3", "<|begin_of_text|>", "<|eot_id|>",
               ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    "mistral": (MIXTRAL, "mistral", "<s>", "</s>", ["<s>", "</s>"]),
}
CONVERSATIONS = {
    "user": [{"role": "user", "content": "What is 12 plus 30?"}],
    "system": [{"role": "system", "content": "You are a helpful assistant."},
               {"role": "user", "content": " Solve: 7 times 6. "}],
    "multi": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2 plus 2?"},
              {"role": "assistant", "content": "  The answer is 4.  "}, {"role": "user", "content": "And 3 plus 3?\n"}],
}


def hf_ids(x) -> list[int]:
    return list(x["input_ids"] if hasattr(x, "keys") else x)


@pytest.fixture(scope="module", params=list(TEMPLATES))
def pair(request, tmp_path_factory):
    """(name, our Tokenizer, transformers tokenizer), both from the same saved directory."""
    template, fmt, bos, eos, extra = TEMPLATES[request.param]
    tok = tokenizers.Tokenizer.from_str(tiny_tokenizer_json())
    tok.add_special_tokens([t for t in extra if tok.token_to_id(t) is None])
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos,
                                              chat_template=template)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    ours = Tokenizer.from_dir(path)
    assert ours.chat_format == fmt
    return request.param, ours, hf


def as_hf_sees_it(name: str, conv: list[dict]) -> list[dict]:
    """Mixtral's template refuses system messages; ours prepends one to the first user turn."""
    if name != "mistral" or conv[0]["role"] != "system":
        return conv
    return [{"role": "user", "content": conv[0]["content"] + "\n\n" + conv[1]["content"]}, *conv[2:]]


@pytest.mark.parametrize("conv", list(CONVERSATIONS))
@pytest.mark.parametrize("gen", [True, False])
def test_render_and_encode_match_transformers(pair, conv, gen):
    name, ours, hf = pair
    messages = CONVERSATIONS[conv]
    expected = hf.apply_chat_template(as_hf_sees_it(name, messages), tokenize=False, add_generation_prompt=gen)
    assert ours.render_chat(messages, add_generation_prompt=gen) == expected
    assert ours.encode_chat(messages, add_generation_prompt=gen) == hf_ids(
        hf.apply_chat_template(as_hf_sees_it(name, messages), tokenize=True, add_generation_prompt=gen))


@pytest.mark.parametrize("conv", list(CONVERSATIONS))
def test_prompt_completion_is_the_templated_answer(pair, conv):
    name, ours, hf = pair
    messages = CONVERSATIONS[conv]
    answer = " Let's think step by step. 7 * 6 = 42. The answer is 42. "
    prompt, completion = ours.encode_prompt_completion(messages, answer)
    assert prompt == ours.encode_chat(messages, add_generation_prompt=True)
    assert completion[-1] == ours.eot_id and completion.count(ours.eot_id) == 1
    answered = as_hf_sees_it(name, [*messages, {"role": "assistant", "content": answer}])
    full = hf_ids(hf.apply_chat_template(answered, tokenize=True))
    assert full[: len(prompt) + len(completion)] == prompt + completion
    assert ours.eot_id not in full[len(prompt) + len(completion):]  # only separators (ChatML's "\n") follow


def test_bos_exactly_once(pair):
    name, ours, _ = pair
    conv = CONVERSATIONS["multi"]
    ids = ours.encode_chat(conv)
    if ours.chat_format in ("llama3", "mistral"):
        assert ids[0] == ours.bos_id and ids.count(ours.bos_id) == 1
    if ours.chat_format == "llama2":  # one BOS per user turn, never two in a row
        assert ids[0] == ours.bos_id and ids.count(ours.bos_id) == 2
    assert all(not (a == b == ours.bos_id) for a, b in zip(ids, ids[1:]))
    if ours.bos_id is not None:
        assert ours.encode(ours.render_chat(conv), add_bos=True).count(ours.bos_id) == ids.count(ours.bos_id)
        assert ours.encode("The answer is 4", add_bos=True)[0] == ours.bos_id
    assert ours.encode("The answer is 4") == ours.tok.encode("The answer is 4", add_special_tokens=False).ids


def test_detect_chat_format():
    assert detect_chat_format(None) == detect_chat_format("") == detect_chat_format("{{ messages }}") == "plain"
    assert [detect_chat_format(t) for t in (CHATML_TEMPLATE, SMOLLM2, LLAMA2, LLAMA3, MIXTRAL)] == [
        "chatml", "chatml", "llama2", "llama3", "mistral"]
    assert default_system_prompt(SMOLLM2) == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert default_system_prompt(QWEN) == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    assert default_system_prompt(CHATML_TEMPLATE) is None


def test_tiny_model_dir_tokenizer(tmp_path):
    """The helper's directory reads like SmolLM2-Instruct: ChatML, eos = pad = <|im_end|>."""
    path = make_tiny_model_dir(tmp_path)
    tok = Tokenizer.from_dir(path)
    assert (tok.chat_format, tok.bos_id, tok.eos_id, tok.pad_id, tok.eot_id) == ("chatml", 1, 2, 2, 2)
    assert tok.stop_ids == [2] and tok.vocab_size == 512
    text = "Question: What is 12 plus 30?\nAnswer: Let's think step by step. 12 + 30 = 42. The answer is 42."
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(text)) < len(text) / 2  # a trained BPE, not bytes
    ids = tok.encode_chat(text)  # a string is one user turn
    assert tok.decode(ids) == "user\n" + text + "\nassistant\n"
    assert tok.decode(ids, skip_special=False) == tok.render_chat([{"role": "user", "content": text}])
    hf = transformers.AutoTokenizer.from_pretrained(path)
    assert hf_ids(hf.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                         add_generation_prompt=True)) == ids
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    from selfrefine.checkpoint import load_model

    with torch.no_grad():
        torch.testing.assert_close(load_model(path)(torch.tensor([ids])), hf_model(torch.tensor([ids])).logits,
                                   atol=1e-5, rtol=0)


def test_plain_format_and_override(tmp_path):
    write_tiny_tokenizer(tmp_path, chat_template=None)
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.chat_format == "plain" and tok.eot_id == tok.eos_id == 2
    prompt, completion = tok.encode_prompt_completion("What is 2 plus 2?", "The answer is 4.")
    assert tok.decode(prompt + completion, skip_special=False) == "What is 2 plus 2?\n\nThe answer is 4.<|im_end|>"
    assert completion.count(2) == 1 and completion[-1] == 2
    forced = Tokenizer.from_dir(tmp_path, chat_format="chatml")
    assert forced.render_chat("hi") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(UserError, match="llama3"):
        Tokenizer.from_dir(tmp_path, chat_format="llama3")  # its markers are not in this vocabulary
    with pytest.raises(UserError, match="unknown chat format"):
        Tokenizer.from_dir(tmp_path, chat_format="vicuna")


def test_special_tokens_from_generation_config(tmp_path):
    """Llama-3-Instruct style: several EOS ids in generation_config.json, no pad token."""
    tok = tokenizers.Tokenizer.from_str(tiny_tokenizer_json())
    extra = TEMPLATES["llama3"][4]
    tok.add_special_tokens(extra)
    tok.save(str(tmp_path / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in extra}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<|begin_of_text|>", "special": True}, "chat_template": LLAMA3}))
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": ids["<|begin_of_text|>"], "eos_token_id": [ids["<|end_of_text|>"], ids["<|eot_id|>"]]}))
    ours = Tokenizer.from_dir(tmp_path)
    assert ours.bos_id == ids["<|begin_of_text|>"] and ours.eos_id == ids["<|end_of_text|>"]
    assert ours.pad_id == ours.eos_id and ours.eot_id == ids["<|eot_id|>"]
    assert sorted(ours.stop_ids) == sorted([ids["<|end_of_text|>"], ids["<|eot_id|>"]])


def test_user_errors(tmp_path, pair):
    name, ours, _ = pair
    with pytest.raises(UserError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(UserError, match="end-of-turn"):
        ours.encode_prompt_completion("hi", f"4{ours.eot_token} more")
    with pytest.raises(UserError):
        ours.render_chat([])
    with pytest.raises(UserError):
        ours.render_chat([{"role": "user"}])
    if ours.chat_format in ("llama2", "mistral"):
        with pytest.raises(UserError, match="alternating"):
            ours.render_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_sentencepiece_style_answer_is_tokenized_in_context(tmp_path):
    """Llama-2/Mistral tokenizers put a word-start marker on the first piece: the answer's leading space
    must come out as the model sees it after `[/INST]`, not as a second marker."""
    from helpers import _corpus

    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))  # laid out like Llama-2's tokenizer.json
    tok.normalizer = tokenizers.normalizers.Sequence([tokenizers.normalizers.Prepend("▁"),
                                                      tokenizers.normalizers.Replace(" ", "▁")])
    tok.decoder = tokenizers.decoders.Sequence([tokenizers.decoders.Replace("▁", " "), tokenizers.decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator(_corpus(), tokenizers.trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                              chat_template=LLAMA2)
    hf.save_pretrained(tmp_path)
    ours = Tokenizer.from_dir(tmp_path)
    messages = CONVERSATIONS["multi"]
    answer = "Let's think step by step. The answer is 6."
    prompt, completion = ours.encode_prompt_completion(messages, answer)
    full = hf_ids(hf.apply_chat_template([*messages, {"role": "assistant", "content": answer}], tokenize=True))
    assert prompt + completion == full
    assert completion != ours.encode(" " + answer + " ") + [ours.eot_id]  # alone it would gain a marker
