"""Chat messages made into the prompt a model was trained on: its own chat template, or Alpaca's template.

A model answers best in the format it learned, so a served model is prompted in its *prompt format*
(:data:`alpaca_ray.prompts.PROMPT_FORMATS`), resolved by :func:`resolve_prompt_format`:

- ``chat``: the whole conversation (system, every user and assistant turn) through the tokenizer's chat
  template, ``tokenizer.apply_chat_template(messages, add_generation_prompt=True)``, tokenized by that
  same call. Tokenizing the rendered text again with special tokens would add a second BOS to templates
  that write their own, which the model never saw in training.
- ``alpaca``: Alpaca's template has one instruction and one input, no turns. So that nothing a client
  sends is silently dropped, a conversation becomes it by this rule (:func:`alpaca_prompt`):

  * the **last user message is the instruction**;
  * **every other message goes into the input**, in conversation order, one ``Role: content`` line each
    (``System:`` for system and developer messages, ``User:``, ``Assistant:``, ``Tool:``);
  * except a **final assistant message** (after the last user message), which is the start of the
    response: the prompt ends with its text and the model continues it, as ``continue_final_message``
    does in the chat format;
  * a single user message and nothing else gives exactly Alpaca's no-input prompt, as Alpaca's demo did.

Plain functions with no Ray in them: the serve stage calls them per request, tests call them directly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from alpaca_ray.config import UserError
from alpaca_ray.prompts import PROMPT_FORMATS, alpaca_user_message, default_prompt_format, format_prompt

#: The file the train stage writes next to the weights (``final/alpaca_ray.json``); its
#: ``prompt_template`` says which prompt format the model was trained in.
METADATA_FILE = "alpaca_ray.json"
#: Roles as chat templates know them: OpenAI's ``developer`` is the newer name of ``system``.
ROLE_ALIASES = {"developer": "system"}
ROLES = ("system", "user", "assistant", "tool")
#: How each role is named in the lines of Alpaca's input.
ALPACA_ROLE_LABELS = {"system": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}


class ChatFormatError(ValueError):
    """A conversation that cannot be made into a prompt (no user message for Alpaca, a template refusing
    it): the client's fault, answered as a 400."""


@dataclass(frozen=True)
class RenderedPrompt:
    """A conversation as the model sees it: ``ids`` are given to the engine as they are (no tokenizing
    again); ``text`` is the same prompt as text, for the content filter and the reports."""

    text: str
    ids: list[int]


def eos_token_ids(tokenizer, *configs) -> list[int]:
    """Every id that ends an answer, in a stable order: the tokenizer's EOS, then each config's
    ``eos_token_id`` (an int or a list; the model config, the generation config). Chat models often end a
    turn with a token that is not the tokenizer's EOS (Llama 3's ``<|eot_id|>``), listed only in their
    generation config. Train labels up to these tokens and serve stops at them: one definition for both."""
    ids: list[int] = []
    for source in (getattr(tokenizer, "eos_token_id", None), *(getattr(c, "eos_token_id", None) for c in configs)):
        ids += [int(t) for t in (source if isinstance(source, (list, tuple)) else [source]) if t is not None]
    return list(dict.fromkeys(ids))


def message_text(content: str | list | None) -> str:
    """A message's text: OpenAI's content parts (``[{"type": "text", "text": ...}]``) joined, None as ""."""
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content
                       if isinstance(part, Mapping) and part.get("type") == "text")
    return content or ""


def normalize_messages(messages: Iterable[Mapping[str, Any]]) -> list[dict[str, str]]:
    """``{"role", "content"}`` dicts with text content and the roles chat templates know (developer ->
    system), so both prompt formats and every template see the same plain conversation."""
    normalized = []
    for index, message in enumerate(messages):
        role = ROLE_ALIASES.get(message.get("role"), message.get("role"))
        if role not in ROLES:
            raise ChatFormatError(f"messages[{index}].role must be one of system, developer, user, assistant, "
                                  f"tool; got {message.get('role')!r}")
        normalized.append({"role": role, "content": message_text(message.get("content"))})
    if not normalized:
        raise ChatFormatError("messages must not be empty")
    return normalized


def demo_user_message(instruction: str, input: str = "") -> str:  # noqa: A002 - Alpaca's field name
    """What the demo page sends a chat model: the instruction, then the input after a blank line (if any),
    the same user turn an Alpaca record is trained as in the chat format
    (:func:`alpaca_ray.prompts.alpaca_user_message`). ``demo.html`` builds the same text; the reports
    route renders it to store the prompt the model saw."""
    return alpaca_user_message(instruction, input)


def alpaca_prompt(messages: list[dict[str, str]]) -> str:
    """Alpaca's prompt for a normalized conversation, by the rule in this module's docstring."""
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last_user is None:
        raise ChatFormatError("messages must contain a user message: Alpaca's template needs an instruction")
    response_start = ""
    context = [m for i, m in enumerate(messages) if i != last_user]
    if len(messages) - 1 > last_user and messages[-1]["role"] == "assistant":
        response_start = messages[-1]["content"]
        context = context[:-1]
    lines = "\n".join(f"{ALPACA_ROLE_LABELS[m['role']]}: {m['content']}" for m in context)
    return format_prompt(messages[last_user]["content"], lines) + response_start


def _input_ids(encoded) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True), older ones a list
    ids = encoded["input_ids"] if isinstance(encoded, Mapping) else encoded
    return [int(i) for i in ids]


def render_chat(messages: list[dict[str, str]], tokenizer) -> RenderedPrompt:
    """The conversation through the tokenizer's chat template: a generation prompt for a new assistant
    turn, or, when the last message is the assistant's, that message left open for the model to continue."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatFormatError("this model's tokenizer has no chat template")
    continue_final = messages[-1]["role"] == "assistant"
    options = {"add_generation_prompt": not continue_final, "continue_final_message": continue_final}
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, **options)
        ids = _input_ids(tokenizer.apply_chat_template(messages, tokenize=True, **options))
    except (TemplateError, ValueError) as err:  # the template's raise_exception(...), e.g. roles must alternate
        raise ChatFormatError(f"the model's chat template refuses these messages: {err}") from None
    return RenderedPrompt(text, ids)


def render_prompt(messages: list[dict[str, str]], tokenizer, prompt_format: str) -> RenderedPrompt:
    """A normalized conversation as the model's prompt, in its prompt format (see the module docstring).

    Alpaca's prompt is tokenized as training tokenized it (with the tokenizer's special tokens, BOS first).
    """
    if prompt_format == "chat":
        return render_chat(messages, tokenizer)
    if prompt_format != "alpaca":
        raise ValueError(f"unknown prompt format {prompt_format!r}; expected one of {', '.join(PROMPT_FORMATS)}")
    text = alpaca_prompt(messages)
    return RenderedPrompt(text, _input_ids(tokenizer(text)))


def recorded_prompt_format(model_dir: str) -> str | None:
    """The prompt format the train stage recorded with a checkpoint (``alpaca_ray.json``'s
    ``prompt_template``); None when the directory has no such file (a hub model, a model made elsewhere)."""
    path = os.path.join(model_dir, METADATA_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            metadata = json.load(handle)
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot read it as JSON: {err}") from None
    template = metadata.get("prompt_template") if isinstance(metadata, dict) else None
    if template is None:
        return None
    if template not in PROMPT_FORMATS:
        raise UserError(f"{path}: prompt_template is {template!r}, not one of {', '.join(PROMPT_FORMATS)}; fix the "
                        "file or serve with an explicit --prompt-format")
    return template


def resolve_prompt_format(model_dir: str, tokenizer, requested: str = "auto") -> str:
    """How to prompt the model in ``model_dir``: ``requested`` when it is a format, else (``auto``) what
    training recorded, else the tokenizer's default (its chat template when it has one, else Alpaca's).

    Raises :class:`UserError` when the result is ``chat`` and the tokenizer has no chat template: a model
    that cannot be prompted as asked fails when deployed, not on every request.
    """
    if requested not in ("auto", *PROMPT_FORMATS):
        raise UserError(f"prompt_format must be auto, {' or '.join(PROMPT_FORMATS)}; got {requested!r}")
    recorded = recorded_prompt_format(model_dir) if os.path.isdir(model_dir) else None
    prompt_format = requested if requested != "auto" else recorded or default_prompt_format(tokenizer)
    if prompt_format == "chat" and not getattr(tokenizer, "chat_template", None):
        because = ("--prompt-format chat was asked for" if requested == "chat"
                   else f"{os.path.join(model_dir, METADATA_FILE)} records prompt_template 'chat'")
        raise UserError(f"{model_dir}: {because}, but the model's tokenizer has no chat template (no chat_template "
                        "in tokenizer_config.json, no chat_template.jinja); serve it with --prompt-format alpaca, "
                        "or add a chat template to the tokenizer")
    return prompt_format


def check_prompt_format(model_dir: str, requested: str = "auto") -> None:
    """Fail now, before anything is deployed, if a local model cannot be served in ``requested`` format.

    Loads the tokenizer only when the answer may be ``chat`` and is not decided by the tokenizer itself
    (``auto`` with no recorded format picks chat only when a template exists, so there is nothing to check).
    """
    if not os.path.isdir(model_dir):
        return  # a hub name or object-store URI: each replica checks its own copy when it starts
    recorded = recorded_prompt_format(model_dir)
    if requested == "chat" or (requested == "auto" and recorded == "chat"):
        from transformers import AutoTokenizer

        resolve_prompt_format(model_dir, AutoTokenizer.from_pretrained(model_dir), requested)
    elif requested not in ("auto", *PROMPT_FORMATS):
        resolve_prompt_format(model_dir, None, requested)
