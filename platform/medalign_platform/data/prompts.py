"""Prompt formats of the supported student families, as chat templates.

Every item becomes one user turn -- the image, then the question -- and the answer follows
the rendered prompt. ``model.prompt_template`` picks the format:

``auto`` (default)
    the processor's own chat template when it has one (llava-hf checkpoints, and the
    folders ``medalign convert llava-med`` writes), else ``llava_v1``;
``llava_v1``
    LLaVA-1.5 / Vicuna without a system prompt, what llava-hf's llava-1.5 template renders:
    ``USER: <image>\\n{question} ASSISTANT:``;
``vicuna_v1``
    the original LLaVA-1.5 training and evaluation format (``conv_vicuna_v1``): Vicuna's
    system prompt, then ``USER: <image>\\n{question} ASSISTANT:``;
``mistral_instruct``
    LLaVA-Med v1.5's ``conv_mistral_instruct`` (LLaMA-2 separator style, empty system
    prompt): ``[INST] <image>\\n{question} [/INST]``; the tokenizer adds ``<s>``;
``qwen_chatml``
    llava-interleave-qwen's ChatML: ``<|im_start|>user <image>\\n{question}<|im_end|>\\n<|im_start|>assistant\\n``;
a string with ``{question}``
    used as is (``<image>`` must appear in it once).

The answer is appended after one space, or directly when the prompt ends in whitespace
(ChatML's ``assistant\\n``), and closed with the tokenizer's EOS token by the collator.
"""

from __future__ import annotations

IMAGE_PLACEHOLDER = "<image>"

_IMAGE_FIRST = "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>{% endif %}{% endfor %}"
# transformers renders templates with trim_blocks: a literal newline after a block tag is dropped.
_NEWLINE = "{{ '\\n' }}"
_TEXTS = "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"

#: Named chat templates (Jinja, the format ``tokenizer.apply_chat_template`` renders).
CHAT_TEMPLATES: dict[str, str] = {
    "llava_v1": (
        "{% for message in messages %}{% if message['role'] == 'user' %}USER: " + _IMAGE_FIRST + _NEWLINE + _TEXTS
        + " {% else %}ASSISTANT: " + _TEXTS + "</s>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    ),
    "vicuna_v1": (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. "
        "{% for message in messages %}{% if message['role'] == 'user' %}USER: " + _IMAGE_FIRST + _NEWLINE + _TEXTS
        + " {% else %}ASSISTANT: " + _TEXTS + "</s>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    ),
    "mistral_instruct": (
        "{% for message in messages %}{% if message['role'] == 'user' %}[INST] " + _IMAGE_FIRST + _NEWLINE + _TEXTS
        + " [/INST]{% else %} " + _TEXTS + "</s>{% endif %}{% endfor %}"
    ),
    "qwen_chatml": (
        "{% for message in messages %}<|im_start|>{{ message['role'] }} " + _IMAGE_FIRST + _NEWLINE + _TEXTS
        + "<|im_end|>" + _NEWLINE + "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant" + _NEWLINE
        + "{% endif %}"
    ),
}
PROMPT_TEMPLATES = ("auto", *CHAT_TEMPLATES)


def conversation(question: str) -> list[dict]:
    """One user turn: the image, then the question."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def clean_question(question: str) -> str:
    """Removes any ``<image>`` left in a raw LLaVA ``"<image>\\n..."`` value and normalises whitespace."""
    if not isinstance(question, str):
        raise TypeError(f"question must be a string, got {type(question).__name__}")
    return " ".join(question.replace(IMAGE_PLACEHOLDER, " ").split())


def check_template(template: str | None) -> str:
    """Validates a ``model.prompt_template`` value and returns it (``None`` means ``auto``)."""
    template = template or "auto"
    if template in PROMPT_TEMPLATES:
        return template
    if "{question}" in template and template.count(IMAGE_PLACEHOLDER) == 1:
        return template
    raise ValueError(f"model.prompt_template={template!r}: choose one of {list(PROMPT_TEMPLATES)} or give a format "
                     "string with {question} and exactly one <image>")


def render_prompt(question: str, processor, template: str | None = "auto") -> str:
    """The prompt text for one question, before the processor expands ``<image>``.

    Args:
        question: the question (``<image>`` in it is removed; the template places the image).
        processor: the student's processor (its chat template serves ``auto``).
        template: see the module docstring.
    """
    template = check_template(template)
    question = clean_question(question)
    if "{question}" in template:
        return template.format(question=question)
    if template == "auto":
        own = getattr(processor, "chat_template", None)
        if not own:
            return render_with(CHAT_TEMPLATES["llava_v1"], question)
        return processor.apply_chat_template(conversation(question), add_generation_prompt=True, tokenize=False)
    return render_with(CHAT_TEMPLATES[template], question)


def render_with(chat_template: str, question: str) -> str:
    """Renders a Jinja chat template for one question (no tokenizer needed)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(conversations=[conversation(question)], chat_template=chat_template,
                                        add_generation_prompt=True)
    return rendered[0]


def answer_separator(prompt: str) -> str:
    """What goes between the prompt and the answer: nothing after whitespace, else one space."""
    return "" if prompt[-1:].isspace() else " "
