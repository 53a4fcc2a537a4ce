"""Chat templates: turn a prompt (messages) and a reply into the exact text the model is trained on.

template_format (--chat_template_format):
  tokenizer  the tokenizer's own chat_template (default)
  chatml     <|im_start|>role\\ncontent<|im_end|>\\n  (plain text markers; the vocabulary is not resized)
  zephyr     <|role|>\\ncontent{eos}\\n
  none       the text is already formatted: prompt as given, reply followed by the eos token text
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

TEMPLATE_FORMATS = ("tokenizer", "chatml", "zephyr", "none")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

ZEPHYR_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# Stands in for the reply when the prompt is not a prefix of the full conversation (see render_reply).
_REPLY_SENTINEL = "\x00preftune-reply\x00"


def _check_format(template_format: str) -> None:
    if template_format not in TEMPLATE_FORMATS:
        raise ValueError(
            f"unknown chat template format {template_format!r}; choose one of {', '.join(TEMPLATE_FORMATS)}"
        )


def _jinja_template(tokenizer, template_format: str) -> str:
    """The jinja template to render with (template_format is not "none")."""
    _check_format(template_format)
    if template_format == "chatml":
        return CHATML_TEMPLATE
    if template_format == "zephyr":
        if tokenizer.eos_token is None:
            raise ValueError("the zephyr chat template needs an eos token, and this tokenizer has none")
        return ZEPHYR_TEMPLATE
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "this tokenizer has no chat template; pick one with --chat_template_format chatml "
            "(or zephyr, or none for text that is already formatted)"
        )
    return tokenizer.chat_template


def apply_template(tokenizer, template_format: str) -> None:
    """Set tokenizer.chat_template for chatml/zephyr so a saved tokenizer carries it; check the others."""
    _check_format(template_format)
    if template_format != "none":
        tokenizer.chat_template = _jinja_template(tokenizer, template_format)


def _render(messages: list[dict], tokenizer, template: str, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def render_prompt(
    example_prompt: list[dict], tokenizer, template_format: str, raw_prompt: str | None = None
) -> str:
    """The prompt text, ending with the generation prompt (e.g. "<|im_start|>assistant\\n")."""
    if template_format == "none":
        if raw_prompt is not None:
            return raw_prompt
        return "\n\n".join(m["content"] for m in example_prompt)
    template = _jinja_template(tokenizer, template_format)
    return _render(example_prompt, tokenizer, template, add_generation_prompt=True)


def render_reply(
    prompt_messages: list[dict],
    reply: str,
    tokenizer,
    template_format: str,
    raw_prompt: str | None = None,
) -> str:
    """The reply as the template places it after the prompt, end-of-turn marker included.

    E.g. "Paris<|im_end|>\\n" for chatml. Computed as render(conversation)[len(render_prompt):], so
    prompt + reply is exactly the text of the whole conversation.
    """
    if template_format == "none":
        return reply + (tokenizer.eos_token or "")
    template = _jinja_template(tokenizer, template_format)
    prompt = _render(prompt_messages, tokenizer, template, add_generation_prompt=True)
    full = _render(prompt_messages + [{"role": "assistant", "content": reply}], tokenizer, template, False)
    if full.startswith(prompt):
        return full[len(prompt) :]
    # Some templates render earlier turns differently once a reply follows (e.g. they drop reasoning
    # or a default system prompt). Then keep the reply and whatever the template puts after it.
    marked = _render(
        prompt_messages + [{"role": "assistant", "content": _REPLY_SENTINEL}], tokenizer, template, False
    )
    if _REPLY_SENTINEL not in marked:
        raise ValueError("the chat template changes the reply text; can't tell where the reply starts")
    logger.debug("chat template: prompt is not a prefix of the conversation; using the reply + end marker")
    return reply + marked.split(_REPLY_SENTINEL, 1)[1]
