"""The generate stage's plain parts: prompt, parsing and filters, seed tasks, config, stats, builder."""

from __future__ import annotations

import json

import pytest

from alpaca_ray.config import ConfigError, config_from_args, make_parser
from alpaca_ray.generate.builder import DatasetBuilder, read_journal
from alpaca_ray.generate.calls import make_request, sampling_args
from alpaca_ray.generate.config import ALPACA_BLACKLIST, BUNDLED_SEED_TASKS, GenerateConfig
from alpaca_ray.generate.parse import FilterRules, drop_reason, parse_response
from alpaca_ray.generate.prompt import DEFAULT_HEADER, SeedExample, encode_prompt, read_header
from alpaca_ray.generate.seed_tasks import read_seed_tasks
from alpaca_ray.generate.stats import estimated_cost, model_price
from alpaca_ray.llm_client import RawJournal
from alpaca_ray.records import RecordError
from tests.support.generate_teacher import SelfInstructTeacher, task_block, write_seed_tasks

EXAMPLES = [
    SeedExample("a", "Give three tips\n  for staying healthy:", "", "1. Eat well.\n2. Sleep."),
    SeedExample("b", "Translate the sentence into French.", "Good morning.", "Bonjour."),
    SeedExample("c", "Name a prime number.", "", "7"),
]


def test_encode_prompt_is_alpacas_layout():
    prompt = encode_prompt(EXAMPLES, header="HEADER\n")
    assert prompt == (
        "HEADER\n\n"
        "###\n1. Instruction: Give three tips for staying healthy\n1. Input:\n<noinput>\n1. Output:\n1. Eat well.\n2. Sleep.\n"
        "###\n2. Instruction: Translate the sentence into French.\n2. Input:\nGood morning.\n2. Output:\nBonjour.\n"
        "###\n3. Instruction: Name a prime number.\n3. Input:\n<noinput>\n3. Output:\n7\n"
        "###\n4. Instruction:")


def test_default_header_states_alpacas_requirements():
    assert DEFAULT_HEADER.endswith("List of 20 tasks:\n")
    for must in ("20", "<noinput>", "English", "100 words", "classification", "editing", "question"):
        assert must in DEFAULT_HEADER
    assert encode_prompt(EXAMPLES).startswith(DEFAULT_HEADER + "\n###\n1. Instruction:")


def test_prompt_template_file(tmp_path):
    template = tmp_path / "header.txt"
    template.write_text("My own header.\n")
    assert encode_prompt(EXAMPLES, read_header(str(template))).startswith("My own header.\n\n###\n")
    with pytest.raises(Exception, match="no such prompt template"):
        read_header(str(tmp_path / "missing.txt"))


def completion_text(*tasks: tuple[str, str, str], first: int = 4) -> str:
    blocks = [task_block(first + i, *task) for i, task in enumerate(tasks)]
    return "###\n".join(blocks)[len(f"{first}. Instruction:"):]


GOOD = ("Describe the water cycle in simple terms.", "", "Water evaporates, condenses and falls.")
WITH_INPUT = ("Classify the sentiment of this review.", "I loved every minute.", "Positive")


def test_parse_completion_and_chat_forms_alike():
    text = completion_text(GOOD, WITH_INPUT)
    parsed = parse_response(text)
    assert [r.to_dict() for r in parsed.records] == [
        {"instruction": GOOD[0], "input": "", "output": GOOD[2]},
        {"instruction": WITH_INPUT[0], "input": WITH_INPUT[1], "output": WITH_INPUT[2]}]
    assert not parsed.malformed and not parsed.dropped
    chat_text = "4. Instruction:" + text
    assert parse_response(chat_text).records == parsed.records
    assert parse_response("###\n4. Instruction:" + text).records == parsed.records


def test_parse_drops_truncated_last_task_only_on_length():
    text = completion_text(GOOD, WITH_INPUT) + "###\n6. Instruction: Explain why the sky"
    stopped = parse_response(text, "stop")
    assert len(stopped.records) == 2 and stopped.dropped["unparseable"] == 1
    cut = parse_response(completion_text(GOOD, WITH_INPUT), "length")
    assert [r.instruction for r in cut.records] == [GOOD[0]] and cut.dropped["truncated"] == 1


def test_parse_needs_the_right_numbers_and_flags_malformed():
    wrong_numbers = completion_text(GOOD, first=4).replace("4. Input", "5. Input")
    parsed = parse_response(wrong_numbers)
    assert parsed.records == [] and parsed.dropped["unparseable"] == 1 and parsed.malformed
    assert parse_response("I'm sorry, I cannot do that.").malformed
    assert parse_response("").malformed
    assert not parse_response(completion_text(GOOD), "length").malformed  # a truncation, not malformed


@pytest.mark.parametrize("instruction, reason", [
    ("Name three fruits.", "too_short"),                       # 3 words: Alpaca keeps only > 3
    ("Name three red fruits.", None),
    (" ".join(["word"] * 151), "too_long"),
    (" ".join(["word"] * 150), None),
    ("Describe the image of a cat in detail.", "blacklisted"),
    ("Plot the sales numbers for this quarter.", "blacklisted"),
    ("Tell me how to go to the station quickly.", "blacklisted"),
    ("Explain how MAPS work for sailors at sea.", "blacklisted"),
    ("Explain the mapping between keys and values.", None),      # whole words only
    ("Describe the profile of a typical customer.", None),       # "file" inside a word
    ("Write a program that reverses a string.", "banned_prefix"),
    ("write a program that reverses a string.", None),          # Alpaca's check is case-sensitive
    ('"Quote" this sentence in three ways.', "starts_with_punctuation"),
    ("Érige une liste de trois villes françaises.", "starts_with_non_ascii"),
])
def test_alpacas_filters(instruction, reason):
    assert drop_reason(instruction, FilterRules()) == reason


def test_filters_are_configurable():
    rules = FilterRules(min_words=1, blacklist=("banana",), banned_prefixes=(), drop_punctuation_start=False)
    assert drop_reason("Peel bananas.", rules) is None
    assert drop_reason("Peel a banana.", rules) == "blacklisted"
    assert drop_reason("Write a program to sort.", rules) is None
    assert drop_reason("'Quoted' start is fine now.", rules) is None


def test_teacher_stand_in_answers_parse_as_planned():
    teacher = SelfInstructTeacher(good_tasks=10)
    reply = teacher("completions", {"prompt": encode_prompt(EXAMPLES)})
    parsed = parse_response(reply.text)
    assert len(parsed.records) == 11  # 10 good + the near-duplicate (dropped later, by ROUGE-L)
    assert dict(parsed.dropped) == {"too_short": 1, "blacklisted": 1, "banned_prefix": 1}
    chat = SelfInstructTeacher(good_tasks=10, repeat_label=True)("chat", {"messages": [
        {"role": "user", "content": encode_prompt(EXAMPLES)}]})
    assert chat.text.startswith("4. Instruction:")
    assert len(parse_response(chat.text).records) == 11


def write_lines(path, lines):
    path.write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines) + "\n")
    return str(path)


def test_read_seed_tasks(tmp_path):
    instructions = write_seed_tasks(tmp_path / "seeds.jsonl", count=6)
    seeds = read_seed_tasks(tmp_path / "seeds.jsonl")
    assert [s.instruction for s in seeds] == instructions
    assert seeds[0].input and seeds[1].input == "" and seeds[0].id == "seed_task_0"


@pytest.mark.parametrize("lines, message", [
    (['{"instruction": "x", "instances": [{"input": "", "output": "y"}]}', "{not json"], r"line 2: invalid JSON"),
    ([{"instances": [{"input": "", "output": "y"}]}], r"line 1: field 'instruction': is missing"),
    ([{"instruction": "  ", "instances": [{"output": "y"}]}], r"line 1: field 'instruction': is empty"),
    ([{"instruction": "x"}], r"line 1: field 'instances': is missing"),
    ([{"instruction": "x", "instances": []}], r"field 'instances': must be a non-empty list"),
    ([{"instruction": "x", "instances": [{"input": "", "output": 3}]}],
     r"line 1: field 'instances\[0\].output': must be a string, got int"),
    ([{"instruction": "x", "instances": [{"input": ""}]}], r"field 'instances\[0\].output': is missing"),
    (["[1, 2]"], r"line 1: expected a JSON object, got list"),
    ([{"id": "a", "instruction": "x", "instances": [{"output": "y"}]},
      {"id": "a", "instruction": "z", "instances": [{"output": "y"}]}], r"line 2: field 'id': duplicate id 'a'"),
    ([""], "contains no seed tasks"),
])
def test_seed_task_errors_name_file_line_and_field(tmp_path, lines, message):
    path = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(RecordError, match=message) as info:
        read_seed_tasks(path)
    assert str(info.value).startswith(path)


def test_missing_seed_file(tmp_path):
    with pytest.raises(RecordError, match="no such seed task file"):
        read_seed_tasks(tmp_path / "nope.jsonl")


def test_self_instruct_seed_tasks_from_shared_data(shared_data):
    seeds = read_seed_tasks(shared_data / "self_instruct_seed_tasks.jsonl")
    assert len(seeds) == 175 and len({s.id for s in seeds}) == 175
    assert sum(1 for s in seeds if s.input) > 0


def test_config_defaults_are_alpacas():
    config = GenerateConfig(output="out", target=10)
    assert (config.temperature, config.top_p, config.max_tokens) == (1.0, 1.0, 3072)
    assert config.stop == ["\n20", "20.", "20."] and config.num_prompt_instructions == 3
    assert config.blacklist == ALPACA_BLACKLIST and config.banned_prefixes == ["Write a program"]
    assert config.similarity_threshold == 0.7 and config.min_instruction_words == 3
    assert config.max_instruction_words == 150
    assert config.seed_tasks == BUNDLED_SEED_TASKS and config.seed_tasks.endswith("alpaca_ray/data/seed_tasks.jsonl")
    assert config.teacher_base_url == "https://api.openai.com/v1" and config.api_key_env == "OPENAI_API_KEY"
    assert sampling_args(config) == {"temperature": 1.0, "top_p": 1.0, "max_tokens": 3072,
                                     "stop": ["\n20", "20.", "20."]}


@pytest.mark.parametrize("values, message", [
    ({"output": "out", "target": 0}, "target must be a whole number >= 1"),
    ({"output": "out"}, "target is required"),
    ({"target": 5}, "output is required"),
    ({"output": "s3://bucket/x", "target": 5}, "local or shared-filesystem"),
    ({"output": "out", "target": 5, "top_p": 0}, "top_p"),
    ({"output": "out", "target": 5, "api": "edits"}, "api must be"),
])
def test_config_validation(values, message):
    with pytest.raises(ConfigError, match=message):
        GenerateConfig(**values)


def test_config_from_flags():
    parser = make_parser("alpaca-ray generate", "", GenerateConfig)
    args = parser.parse_args(["--output", "o", "--target", "7", "--api", "completions", "--stop", "\n9",
                              "--blacklist", "foo", "bar", "--logit-bias", '{"50256": -100}', "--no-progress"])
    config = config_from_args(GenerateConfig, args)
    assert (config.target, config.api, config.stop, config.blacklist) == (7, "completions", ["\n9"], ["foo", "bar"])
    assert config.logit_bias == {"50256": -100} and config.progress is False
    assert sampling_args(config)["logit_bias"] == {"50256": -100}


def test_prices():
    assert model_price("gpt-4o-mini-2024-07-18")[0] == (0.15, 0.60)
    assert model_price("gpt-4o")[0] == (2.50, 10.00)
    cost, note = estimated_cost("gpt-4o-mini", 1_000_000, 2_000_000)
    assert cost == pytest.approx(0.15 + 1.20) and "built-in" in note
    cost, note = estimated_cost("my-local-teacher", 10, 10)
    assert cost is None and "unknown model price" in note
    assert estimated_cost("my-local-teacher", 10**6, 0, {"input": 2.0, "output": 1.0})[0] == pytest.approx(2.0)


def test_make_request_samples_distinct_seed_tasks():
    seeds = [SeedExample(str(i), f"Seed instruction number {i}.", "", "out") for i in range(10)]
    requests = [make_request(n, seeds, "H\n", 3, 0, "run") for n in range(7, 12)]
    assert [r["request_id"] for r in requests] == [f"run-{n:06d}" for n in range(7, 12)]
    for request in requests:
        assert len(set(request["seed_task_ids"])) == 3 and request["prompt"].endswith("###\n4. Instruction:")
    assert make_request(9, seeds, "H\n", 3, 0, "other-run")["prompt"] == requests[2]["prompt"]  # (seed, number)


def journal_record(request_id: str, text: str, t: float, finish_reason: str = "stop", **extra) -> dict:
    return {"request_id": request_id, "time": t, "model": "m", "api": "completions", "prompt": "p",
            "seed_task_ids": ["a", "b", "c"], "text": text, "finish_reason": finish_reason,
            "usage": {"prompt_tokens": 10, "completion_tokens": 20}, **extra}


def test_builder_keeps_in_order_dedups_and_caps_at_target():
    near_seed = ("Give three tips for staying very healthy and fit.", "", "Eat.")
    other = ("Summarize the story of a famous novel briefly.", "", "A summary.")
    builder = DatasetBuilder(["Give three tips for staying healthy and fit."], target=3)
    assert builder.add(journal_record("r1", completion_text(GOOD, near_seed, WITH_INPUT), 1.0, retries=2)) == 2
    assert builder.add(journal_record("r1", completion_text(other), 1.5)) == 0  # same request id: counted once
    assert builder.add(journal_record("r2", completion_text(GOOD, other, WITH_INPUT), 2.0)) == 1
    assert [r.instruction for r in builder.records] == [GOOD[0], WITH_INPUT[0], other[0]] and builder.done
    assert builder.add(journal_record("r3", completion_text(("Invent a new board game for children.", "", "x")),
                                      3.0)) == 0
    assert builder.add(journal_record("r4", "", 4.0, error="malformed response")) == 0
    tally = builder.tally
    assert (tally.responses, tally.retries, tally.kept, tally.surplus, tally.malformed) == (4, 2, 3, 1, 1)
    assert tally.dropped["near_duplicate"] == 3  # near the seed, and GOOD + WITH_INPUT again
    assert (tally.prompt_tokens, tally.completion_tokens) == (40, 80)


def test_read_journal_merges_files_in_arrival_order(tmp_path):
    RawJournal(tmp_path / "a.jsonl").append(journal_record("a1", "x", 3.0))
    RawJournal(tmp_path / "a.jsonl").append(journal_record("a2", "x", 1.0))
    RawJournal(tmp_path / "b.jsonl").append(journal_record("b1", "x", 2.0))
    with open(tmp_path / "b.jsonl", "a") as handle:
        handle.write('{"request_id": "torn')
    records, torn = read_journal(str(tmp_path))
    assert [r["request_id"] for r in records] == ["a2", "b1", "a1"] and torn == 1


def test_bundled_seed_tasks_are_the_default_and_load():
    seeds = read_seed_tasks(GenerateConfig(output="o", target=1).seed_tasks)
    assert len(seeds) == 175 and len({s.instruction for s in seeds}) == 175


def test_bundled_teacher_replay_parses_as_self_instruct_answers():
    """The recorded answers shipped for offline runs go through the same parser as live ones."""
    import os

    path = os.path.join(os.path.dirname(BUNDLED_SEED_TASKS), "teacher_replay.jsonl")
    with open(path, encoding="utf-8") as handle:
        answers = [json.loads(line) for line in handle if line.strip()]
    parsed = [parse_response(a["text"], a.get("finish_reason", "stop")) for a in answers]
    assert sum(len(p.records) for p in parsed) >= len(answers) * 5
