"""The two Alpaca prompt templates, the one place they live.

They are Stanford Alpaca's, to the character (``train.py`` of tatsu-lab/stanford_alpaca): the response
follows ``### Response:`` with no separator, and training appends the EOS token after the output.
Golden tests pin them, since a one-newline difference changes what the model learns.
"""

from __future__ import annotations

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)

#: The template name stored with a trained checkpoint, so serving uses what training used.
TEMPLATE_NAME = "alpaca"
#: How a model is prompted: Alpaca's templates above, or the tokenizer's own chat template
#: (``tokenizer.apply_chat_template``). A checkpoint records which one it was trained in
#: (``final/alpaca_ray.json``'s ``prompt_template``), and serve renders prompts the same way.
PROMPT_FORMATS = ("alpaca", "chat")


def default_prompt_format(tokenizer) -> str:
    """What a user expects when nothing says otherwise: the model's own chat template when its tokenizer
    has one (an instruct or chat model), else Alpaca's template (a base model such as LLaMA)."""
    return "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"


def format_prompt(instruction: str, input: str = "") -> str:  # noqa: A002 - Alpaca's field name
    """Return the Alpaca prompt for an instruction and an optional input (empty input: the short template)."""
    if input and input.strip():
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def format_example(instruction: str, input: str, output: str, eos_token: str = "") -> tuple[str, str]:  # noqa: A002
    """Return (prompt, target) for training: the loss is taken on ``target`` only."""
    return format_prompt(instruction, input), f"{output}{eos_token}"


def alpaca_user_message(instruction: str, input: str = "") -> str:  # noqa: A002 - Alpaca's field name
    """An Alpaca instruction (and input) as one user turn of a chat: the input after a blank line."""
    return f"{instruction}\n\n{input}" if input and input.strip() else instruction


def alpaca_to_messages(instruction: str, input: str, output: str) -> list[dict]:  # noqa: A002
    """An Alpaca record as a two-turn conversation, to train it in a model's chat template."""
    return [{"role": "user", "content": alpaca_user_message(instruction, input)},
            {"role": "assistant", "content": output}]
