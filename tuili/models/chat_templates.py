"""Chat templates for GGUF files that carry none (tokenizer.chat_template absent), by GGUF
architecture. Written for tuili from each family's documented turn format."""

# Gemma 3: turns "<start_of_turn>{user|model}\n...<end_of_turn>\n"; no system role, so a system
# message opens the first user turn, followed by a blank line. Content: a string or text parts.
GEMMA3 = """\
{%- macro text(content) -%}
{%- if content is string -%}{{ content | trim }}
{%- else -%}{%- for part in content if part['type'] == 'text' -%}{{ part['text'] | trim }}{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{{ bos_token }}
{%- set system = messages[0]['role'] == 'system' -%}
{%- set turns = messages[1:] if system else messages -%}
{%- for message in turns -%}
{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
{%- if role not in ('user', 'model') -%}
{{ raise_exception('Gemma 3 turns are user or assistant (one system message may come first), not ' + message['role']) }}
{%- endif -%}
<start_of_turn>{{ role }}
{% if loop.first and system %}{{ text(messages[0]['content']) }}

{% endif %}{{ text(message['content']) }}<end_of_turn>
{% endfor -%}
{%- if add_generation_prompt -%}
<start_of_turn>model
{% endif -%}
"""

FOR_GGUF = {"gemma3": GEMMA3}
