"""Conversations in the train stage, without Ray: reading messages / ShareGPT rows, rendering them in a chat
template with the loss on assistant turns only, and choosing the prompt format."""

from __future__ import annotations

import json

import pytest

from alpaca_ray.config import UserError
from alpaca_ray.records import AlpacaRecord, ChatRecord, RecordError, load_records, training_record_from_dict
from alpaca_ray.train.data import IGNORE_INDEX, Example, assistant_spans, collate, tokenize_chat
from alpaca_ray.train.pipeline import ModelInfo, check_chat_template, resolve_prompt_format

#: ChatML-like, ending every turn with the tiny tokenizer's EOS (``</s>``), then a newline the model must
#: not be taught to write (it follows the end of the turn).
TINY_CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
                      "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
CHAT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another one?"},
        {"role": "assistant", "content": "Red."}]


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_model_dir):
    from alpaca_ray.train.model import load_tokenizer

    return load_tokenizer(str(tiny_model_dir), chat_template=TINY_CHAT_TEMPLATE)


def labelled_text(tokenizer, row: dict) -> list[str]:
    """The labelled tokens decoded, one string per run of consecutive labels."""
    runs, current = [], []
    for token, label in zip(row["input_ids"], row["loss_mask"]):
        if label:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def test_loss_is_on_every_assistant_turn_and_its_end_of_turn_token_only(chat_tokenizer):
    row = tokenize_chat(chat_tokenizer, CHAT, 512, [chat_tokenizer.eos_token_id])
    assert labelled_text(chat_tokenizer, row) == ["Blue.</s>", "Red.</s>"]
    # the ids are exactly what the model is served: apply_chat_template's own tokenization
    assert row["input_ids"] == chat_tokenizer.apply_chat_template(CHAT, tokenize=True)["input_ids"]
    assert row["num_labels"] == sum(row["loss_mask"]) and not row["truncated"]
    assert row["input_ids"][row["prompt_len"]] == row["input_ids"][row["loss_mask"].index(1)]
    # the first label starts right after the prompt serve renders for the first answer
    prompt = chat_tokenizer.apply_chat_template(CHAT[:2], tokenize=True, add_generation_prompt=True)["input_ids"]
    assert row["prompt_len"] == len(prompt) and row["input_ids"][:len(prompt)] == prompt


def test_truncated_conversation_keeps_labels_within_max_length(chat_tokenizer):
    full = tokenize_chat(chat_tokenizer, CHAT, 512, [chat_tokenizer.eos_token_id])
    cut = tokenize_chat(chat_tokenizer, CHAT, full["prompt_len"] + 2, [chat_tokenizer.eos_token_id])
    assert cut["truncated"] and len(cut["input_ids"]) == full["prompt_len"] + 2
    assert cut["loss_mask"] == full["loss_mask"][:full["prompt_len"] + 2] and cut["num_labels"] == 2


def test_collate_takes_labels_from_the_loss_mask(chat_tokenizer):
    row = tokenize_chat(chat_tokenizer, CHAT, 512, [chat_tokenizer.eos_token_id])
    example = Example(0, tuple(row["input_ids"]), row["prompt_len"], tuple(row["loss_mask"]))
    batch = collate([[example, example]], pad_id=0, packed=True)
    labels = batch["labels"][0].tolist()
    expected = [t if m else IGNORE_INDEX for t, m in zip(row["input_ids"], row["loss_mask"])]
    assert labels == expected + expected and example.num_labels == sum(row["loss_mask"])


def test_a_template_that_changes_earlier_turns_is_refused(tiny_model_dir):
    from alpaca_ray.train.data import ChatTemplateError
    from alpaca_ray.train.model import load_tokenizer

    # renders the last message differently from how it renders it once more turns follow
    tokenizer = load_tokenizer(str(tiny_model_dir), chat_template=(
        "{% for m in messages %}{% if loop.last %}[{{ m['content'] }}]</s>{% else %}{{ m['content'] }}</s>"
        "{% endif %}{% endfor %}"))
    with pytest.raises(ChatTemplateError, match="renders the start of a conversation differently"):
        assistant_spans(tokenizer, CHAT, [tokenizer.eos_token_id])


def test_chat_template_must_end_assistant_turns_with_eos(tiny_model_dir):
    from alpaca_ray.train.config import TrainConfig
    from alpaca_ray.train.model import load_tokenizer

    cfg = TrainConfig(base_model=str(tiny_model_dir), data="d.json", output="out", chat_template="no-eos.jinja")
    no_eos = load_tokenizer(str(tiny_model_dir), chat_template="{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    with pytest.raises(UserError, match="no-eos.jinja does not end an assistant turn with an EOS token"):
        check_chat_template(cfg, no_eos, [no_eos.eos_token_id])
    good = load_tokenizer(str(tiny_model_dir), chat_template=TINY_CHAT_TEMPLATE)
    check_chat_template(cfg, good, [good.eos_token_id])  # passes


@pytest.mark.parametrize("wanted,has_template,chats,expected", [
    ("auto", False, False, "alpaca"),  # a base model without a template: Alpaca's, as Stanford trained
    ("auto", True, False, "chat"),     # an instruct model: its own format
    ("auto", True, True, "chat"),
    ("alpaca", True, False, "alpaca"),
    ("chat", True, False, "chat"),
])
def test_prompt_format_resolution(wanted, has_template, chats, expected):
    from alpaca_ray.train.config import TrainConfig

    cfg = TrainConfig(base_model="m", data="d.json", output="o", prompt_format=wanted)
    records = [AlpacaRecord("Say hi.", "", "Hi.")] + ([ChatRecord(tuple(CHAT))] if chats else [])
    assert resolve_prompt_format(cfg, ModelInfo("float32", True, has_template, [2]), records) == expected


def test_prompt_format_errors_name_the_problem():
    from alpaca_ray.train.config import TrainConfig

    chats = [AlpacaRecord("Say hi.", "", "Hi."), ChatRecord(tuple(CHAT))]
    no_template = ModelInfo("float32", True, False, [2])
    cfg = TrainConfig(base_model="base-llm", data="d.json", output="o")
    with pytest.raises(UserError, match="conversations.*base-llm has no chat template: give one with --chat-template"):
        resolve_prompt_format(cfg, no_template, chats)
    forced = TrainConfig(base_model="m", data="d.json", output="o", prompt_format="alpaca")
    with pytest.raises(UserError, match="d.json: record 2 is a conversation.*drop --prompt-format alpaca"):
        resolve_prompt_format(forced, ModelInfo("float32", True, True, [2]), chats)
    chat = TrainConfig(base_model="base-llm", data="d.json", output="o", prompt_format="chat")
    with pytest.raises(UserError, match="base-llm has no chat template.*or use --prompt-format alpaca"):
        resolve_prompt_format(chat, no_template, chats[:1])


def test_messages_sharegpt_and_alpaca_rows_read_from_one_file(tmp_path):
    rows = [{"messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]}], "source": "x"},
            {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                               {"from": "gpt", "value": "A"}]},
            {"instruction": "Name a color.", "input": "", "output": "Blue."}]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    first, second, third = load_records(str(path), parse=training_record_from_dict)
    assert first.messages == ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                              {"role": "assistant", "content": "Hello"}) and first.extra == {"source": "x"}
    assert [m["role"] for m in second.messages] == ["system", "user", "assistant"]
    assert isinstance(third, AlpacaRecord) and third.output == "Blue."


@pytest.mark.parametrize("row,message", [
    ({"messages": []}, "field 'messages': must be a non-empty list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "field 'messages[0].role': unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": 3}]}, "field 'messages[0].content': must be a string"),
    ({"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]},
     "first message after any system message must be from the user"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]},
     "no assistant message with content"),
    ({"conversations": [{"from": "alien", "value": "x"}]}, "field 'conversations[0].from': unknown from 'alien'"),
])
def test_bad_conversations_name_file_line_and_field(tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "ok"},
                                             {"role": "assistant", "content": "fine"}]}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(RecordError) as info:
        load_records(str(path), parse=training_record_from_dict)
    assert str(info.value).startswith(f"{path}, line 2: ") and message in str(info.value)
