"""Chat-template rendering: identical to transformers' `apply_chat_template(..., tokenize=False)`
for the default model's template and for templates in the styles of other model families
(tools as JSON, namespaces, loop controls, raise_exception), and clear errors for bad or
hostile templates."""

from __future__ import annotations

import pytest

from radixserve.runtime.chat_template import ChatTemplate, ChatTemplateError, render_chat
from radixserve.runtime.loader import resolve_model
from radixserve.runtime.tokenizer import load_tokenizer

# Qwen2.5-style: tools listed as JSON lines, tool calls and tool responses, namespace use.
CHATML_TOOLS = """{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'You are helpful.' }}{%- endif %}
{{- "\\n\\n# Tools\\n<tools>" }}
{%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
{{- "\\n</tools><|im_end|>\\n" }}
{%- elif messages[0]['role'] == 'system' %}
{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last_user=-1) %}
{%- for message in messages %}{%- if message.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>assistant' }}{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
{%- for tool_call in message.tool_calls | default([]) %}
{{- '\\n<tool_call>\\n{"name": "' + tool_call.function.name + '", "arguments": ' }}{{- tool_call.function.arguments | tojson }}{{- '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}
{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""

# Mistral-style: bos/eos tokens, strict alternation enforced with raise_exception.
ALTERNATING = """{{ bos_token }}{% for message in messages %}
{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
{% endif %}
{% if message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]{% else %}{{ message['content'] }}{{ eos_token }}{% endif %}
{% endfor %}"""

# Llama-3-style: indented JSON, loop controls, a template variable with a default.
INDENTED = """{%- set date = date_string | default('26 Jul 2024') %}<|start|>system
Today: {{ date }}
{%- if tools %}
{{ tools | tojson(indent=4) }}
{%- endif %}
{%- for message in messages %}
{%- if loop.index > 6 %}{% break %}{% endif %}
{%- if message.role == 'system' %}{% continue %}{% endif %}
<|start|>{{ message.role }}
{{ message.content | trim }}<|end|>
{%- endfor %}
{%- if add_generation_prompt %}
<|start|>assistant
{% endif %}"""

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather <now> & 'later' in a city — ünïcode",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And <b>3+3</b> & 'more'?"}],
    [{"role": "user", "content": "Weather in Paris?"},
     {"role": "assistant", "content": "", "tool_calls": [
         {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
     {"role": "tool", "content": "{\"temp\": 21}"},
     {"role": "user", "content": "  Thanks, ünïcode ok?  "}],
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model("default"))


def _both(tok, template, messages, tools=None, add_generation_prompt=True, **kwargs):
    ours = render_chat(template, messages, tools=tools, add_generation_prompt=add_generation_prompt,
                       bos_token=tok.bos_token, eos_token=tok.eos_token, **kwargs)
    theirs = tok.apply_chat_template(messages, chat_template=template, tools=tools, tokenize=False,
                                     add_generation_prompt=add_generation_prompt, **kwargs)
    return ours, theirs


@pytest.mark.parametrize("agp", [True, False])
@pytest.mark.parametrize("conv", range(2))
def test_default_model_template(tokenizer, conv, agp):
    ours, theirs = _both(tokenizer, tokenizer.chat_template, CONVERSATIONS[conv], add_generation_prompt=agp)
    assert ours == theirs
    assert ours.startswith("<|im_start|>")


@pytest.mark.parametrize("tools", [None, TOOLS])
@pytest.mark.parametrize("conv", range(3))
def test_chatml_tools_template(tokenizer, conv, tools):
    ours, theirs = _both(tokenizer, CHATML_TOOLS, CONVERSATIONS[conv], tools=tools)
    assert ours == theirs
    if tools:
        assert "<now> & 'later'" in ours and "ünïcode" in ours  # tojson neither HTML- nor ASCII-escapes


def test_indented_template_with_kwargs(tokenizer):
    for conv in CONVERSATIONS:
        for kwargs in ({}, {"date_string": "1 Jan 2030"}):
            ours, theirs = _both(tokenizer, INDENTED, conv, tools=TOOLS, **kwargs)
            assert ours == theirs


def test_alternation_template_and_its_error(tokenizer):
    conv = CONVERSATIONS[1][1:]
    ours, theirs = _both(tokenizer, ALTERNATING, conv, add_generation_prompt=False)
    assert ours == theirs and ours.startswith(tokenizer.bos_token)
    with pytest.raises(ChatTemplateError, match="roles must alternate") as e:
        render_chat(ALTERNATING, CONVERSATIONS[1], bos_token="<s>", eos_token="</s>")
    assert e.value.reason == "raised"


def test_compiled_template_reuse_does_not_mutate_inputs():
    template = ChatTemplate(CHATML_TOOLS)
    conv = [dict(m) for m in CONVERSATIONS[2]]
    first = template.render(conv, tools=TOOLS)
    assert template.render(conv, tools=TOOLS) == first
    assert conv == CONVERSATIONS[2]


@pytest.mark.parametrize("template, reason, match", [
    ("{% for m in messages %}{{ m.content }", "syntax", "syntax error at line 1"),
    ("{{ messages.__class__.__mro__ }}", "render", "unsafe"),
    ("{% set _ = messages.append({'role': 'x'}) %}", "render", "unsafe"),
    ("{% set ns = namespace(_secret=1) %}", "render", "underscore"),
    ("{{ messages[0].content + 1 }}", "render", "TypeError"),
    ("", "syntax", "no chat template"),
])
def test_bad_templates_are_chat_template_errors(template, reason, match):
    with pytest.raises(ChatTemplateError, match=match) as e:
        render_chat(template, [{"role": "user", "content": "hi"}])
    assert e.value.reason == reason


def test_rich_objects_are_not_reachable_from_templates():
    class Secret:
        def delete_everything(self) -> str:
            raise AssertionError("template called into a Python object")

    out = render_chat("{{ messages[0].content }}|{{ messages[0].obj }}",
                      [{"role": "user", "content": "hi", "obj": Secret()}])
    assert out == "hi|<Secret>"
    with pytest.raises(ChatTemplateError):
        render_chat("{{ messages[0].obj.delete_everything() }}", [{"role": "user", "content": "hi", "obj": Secret()}])
