"""Chat messages made into prompts (``alpaca_ray.chat``): Alpaca's rule, chat templates, the prompt format.

The tiny model's real tokenizer, given a ChatML-like template (its BOS first, its EOS ``</s>`` ending each
turn) in a copy of the model directory; no model is loaded.
"""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from alpaca_ray.chat import (
    ChatFormatError,
    alpaca_prompt,
    check_prompt_format,
    demo_user_message,
    normalize_messages,
    recorded_prompt_format,
    render_chat,
    render_prompt,
    resolve_prompt_format,
)
from alpaca_ray.config import UserError
from alpaca_ray.prompts import PROMPT_NO_INPUT, format_prompt
from tests.support.serve_app import make_chat_model

CONVERSATION = [
    {"role": "developer", "content": "Answer in one word."},
    {"role": "user", "content": "Name a fruit."},
    {"role": "assistant", "content": "Apple."},
    {"role": "user", "content": [{"type": "text", "text": "Name a "}, {"type": "text", "text": "color."}]},
]


@pytest.fixture(scope="module")
def chat_model_dir(tiny_model_dir, tmp_path_factory):
    return make_chat_model(tiny_model_dir, tmp_path_factory.mktemp("chat-model") / "model")


@pytest.fixture(scope="module")
def chat_tokenizer(chat_model_dir):
    return AutoTokenizer.from_pretrained(str(chat_model_dir))


@pytest.fixture(scope="module")
def plain_tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def test_messages_are_normalized_to_text_with_developer_as_system():
    messages = normalize_messages(CONVERSATION + [{"role": "tool", "content": None}])
    assert messages == [{"role": "system", "content": "Answer in one word."},
                        {"role": "user", "content": "Name a fruit."},
                        {"role": "assistant", "content": "Apple."},
                        {"role": "user", "content": "Name a color."},
                        {"role": "tool", "content": ""}]
    with pytest.raises(ChatFormatError, match=r"messages\[0\]\.role"):
        normalize_messages([{"role": "narrator", "content": "x"}])
    with pytest.raises(ChatFormatError, match="empty"):
        normalize_messages([])


def test_a_single_user_message_is_exactly_alpacas_no_input_prompt():
    prompt = alpaca_prompt(normalize_messages([{"role": "user", "content": "Name a color."}]))
    assert prompt == PROMPT_NO_INPUT.format(instruction="Name a color.") == format_prompt("Name a color.")


def test_alpaca_rule_keeps_system_and_history_as_the_input():
    """Golden: the last user message is the instruction; everything before it, one line per message in
    order, is the input."""
    prompt = alpaca_prompt(normalize_messages(CONVERSATION))
    assert prompt == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nName a color.\n\n"
        "### Input:\nSystem: Answer in one word.\nUser: Name a fruit.\nAssistant: Apple.\n\n"
        "### Response:")
    # a system message alone with the instruction still reaches the model
    assert alpaca_prompt([{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]) == \
        format_prompt("Hi", "System: Be kind.")


def test_alpaca_rule_continues_a_final_assistant_message_and_needs_a_user_message():
    messages = normalize_messages(CONVERSATION + [{"role": "assistant", "content": "The color is"}])
    assert alpaca_prompt(messages) == alpaca_prompt(normalize_messages(CONVERSATION)) + "The color is"
    # an assistant message that is not the last one after the instruction is context, never dropped
    later = normalize_messages([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "A"},
                                {"role": "system", "content": "S"}])
    assert alpaca_prompt(later) == format_prompt("Hi", "Assistant: A\nSystem: S")
    with pytest.raises(ChatFormatError, match="user message"):
        alpaca_prompt(normalize_messages([{"role": "system", "content": "x"}]))


def test_chat_rendering_is_the_templates_own_tokenization_with_one_bos(chat_tokenizer):
    messages = normalize_messages(CONVERSATION)
    rendered = render_chat(messages, chat_tokenizer)
    expected = chat_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert rendered.ids == list(expected)
    assert rendered.text == chat_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered.text.startswith("<s><|system|>\nAnswer in one word.</s>\n") and rendered.text.endswith(
        "<|user|>\nName a color.</s>\n<|assistant|>\n")
    bos = chat_tokenizer.bos_token_id
    assert rendered.ids[0] == bos and rendered.ids.count(bos) == 1
    # what tokenizing the text again with special tokens would have given: a second BOS
    assert chat_tokenizer(rendered.text)["input_ids"][:2] == [bos, bos]


def test_a_final_assistant_message_is_continued_not_closed(chat_tokenizer):
    messages = normalize_messages(CONVERSATION + [{"role": "assistant", "content": "The color is"}])
    rendered = render_chat(messages, chat_tokenizer)
    assert rendered.text.endswith("<|assistant|>\nThe color is")  # no EOS, no new generation prompt
    expected = chat_tokenizer.apply_chat_template(messages, continue_final_message=True, tokenize=True)
    assert rendered.ids == list(expected["input_ids"])


def test_a_template_that_refuses_the_messages_is_a_chat_format_error(tiny_model_dir, tmp_path):
    strict = make_chat_model(tiny_model_dir, tmp_path / "strict", chat_template=(
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"))
    tokenizer = AutoTokenizer.from_pretrained(str(strict))
    with pytest.raises(ChatFormatError, match="no system role"):
        render_chat(normalize_messages(CONVERSATION), tokenizer)


def test_alpaca_format_ids_are_the_prompt_tokenized_as_training_did(plain_tokenizer):
    messages = normalize_messages(CONVERSATION)
    rendered = render_prompt(messages, plain_tokenizer, "alpaca")
    assert rendered.text == alpaca_prompt(messages)
    assert rendered.ids == plain_tokenizer(rendered.text)["input_ids"] and rendered.ids[0] == plain_tokenizer.bos_token_id
    with pytest.raises(ChatFormatError, match="no chat template"):
        render_prompt(messages, plain_tokenizer, "chat")


def test_prompt_format_from_metadata_then_tokenizer_then_override(tiny_model_dir, tmp_path, chat_tokenizer,
                                                                  plain_tokenizer):
    chat_dir = make_chat_model(tiny_model_dir, tmp_path / "chat")
    assert recorded_prompt_format(str(chat_dir)) is None
    assert resolve_prompt_format(str(chat_dir), chat_tokenizer) == "chat"  # it has a template
    assert resolve_prompt_format(str(tiny_model_dir), plain_tokenizer) == "alpaca"  # it has none
    assert resolve_prompt_format("org/hub-model", chat_tokenizer) == "chat"  # not a directory: no metadata
    trained = make_chat_model(tiny_model_dir, tmp_path / "trained", prompt_template="alpaca")
    assert resolve_prompt_format(str(trained), chat_tokenizer) == "alpaca"  # what training recorded wins
    assert resolve_prompt_format(str(trained), chat_tokenizer, "chat") == "chat"  # the option wins over both
    assert resolve_prompt_format(str(chat_dir), chat_tokenizer, "alpaca") == "alpaca"


def test_chat_without_a_template_is_a_clear_error(tiny_model_dir, tmp_path, plain_tokenizer):
    with pytest.raises(UserError, match="--prompt-format chat was asked for.*no chat template"):
        resolve_prompt_format(str(tiny_model_dir), plain_tokenizer, "chat")
    with pytest.raises(UserError, match="no chat template"):
        check_prompt_format(str(tiny_model_dir), "chat")  # loads the tokenizer from the directory
    recorded = tmp_path / "recorded"
    recorded.mkdir()
    (recorded / "alpaca_ray.json").write_text(json.dumps({"prompt_template": "chat", "base_model": "x"}))
    with pytest.raises(UserError, match="records prompt_template 'chat'"):
        resolve_prompt_format(str(recorded), plain_tokenizer)
    (recorded / "alpaca_ray.json").write_text(json.dumps({"prompt_template": "vicuna"}))
    with pytest.raises(UserError, match="prompt_template is 'vicuna'"):
        recorded_prompt_format(str(recorded))
    check_prompt_format(str(tiny_model_dir), "auto")  # no template, nothing recorded: alpaca, fine


def test_demo_user_message_appends_the_input_after_a_blank_line():
    assert demo_user_message("Summarize.", "A long text.") == "Summarize.\n\nA long text."
    assert demo_user_message("Summarize.", "  ") == "Summarize."
