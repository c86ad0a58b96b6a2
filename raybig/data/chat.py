"""How a conversation becomes the text a language model continues: a chat template (Jinja, as Hugging Face
tokenizers keep them). Each language-model run records its template (model.json, and hf/chat_template.jinja
beside the weights), and serving renders chats with the run's own, so training and serving never disagree.
"""
from __future__ import annotations

import functools

DEFAULT_CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The text of `messages` under `template`, rendered in a sandbox: a template is data, not code."""
    return _compiled(template).render(messages=messages, add_generation_prompt=add_generation_prompt)


@functools.lru_cache(maxsize=8)
def _compiled(template: str):
    """Compiled once: a chat data set renders the same template for every turn of every conversation."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)
