"""Token ids of the named templates against transformers' apply_chat_template with each model's official
chat template (written into a tokenizer_config.json beside the real LLaMA-2 tokenizer, with the model's
special tokens added; SmolLM2's from its GGUF), and the sandboxed HF jinja path itself."""
from __future__ import annotations

import json

import pytest
import transformers

from camelid.chat import check_template_name, get_template, resolve_template, template_for, template_from_hf
from camelid.errors import CamelidError
from camelid.formats.gguf import GGUFReader
from camelid.tokenizer import Tokenizer

from .chat_cases import A, CONVERSATIONS, S, U, llama2_folder, msgs

# The official templates, as the models' tokenizer_config.json carry them.
LLAMA2 = (  # meta-llama/Llama-2-7b-chat-hf
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
CODELLAMA = (  # codellama/CodeLlama-7b-Instruct-hf
    "{% if messages[0]['role'] == 'system' %}{% set system_message = '<<SYS>>\\n' + messages[0]['content'] | trim + "
    "'\\n<</SYS>>\\n\\n' %}{% set messages = messages[1:] %}{% else %}{% set system_message = '' %}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 %}{% set content = system_message + message['content'] %}{% else %}"
    "{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content | trim + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + content | trim + ' ' + eos_token }}{% endif %}{% endfor %}")
MISTRAL = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""  # mistralai/Mistral-7B-Instruct-v0.1 and Mixtral-8x7B-Instruct-v0.1 (current)
ZEPHYR = (  # HuggingFaceH4/zephyr-7b-beta, TinyLlama/TinyLlama-1.1B-Chat-v1.0
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")
LLAMA3 = (  # meta-llama/Meta-Llama-3-8B-Instruct
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
YI = (  # 01-ai/Yi-34B-Chat
    "{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}{% endif %}"
    "{% if system_message is defined %}{{ '<|im_start|>system\n' + system_message + '<|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}{% set content = message['content'] %}{% if message['role'] == 'user' %}"
    "{{ '<|im_start|>user\n' + content + '<|im_end|>\n<|im_start|>assistant\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ content + '<|im_end|>' + '\n' }}{% endif %}{% endfor %}")
INTERNLM2 = (  # internlm/internlm2-chat-7b
    "{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
DEEPSEEK_CODER = """{% if not add_generation_prompt is defined %}
{% set add_generation_prompt = false %}
{% endif %}
{%- set ns = namespace(found=false) -%}
{%- for message in messages -%}
    {%- if message['role'] == 'system' -%}
        {%- set ns.found = true -%}
    {%- endif -%}
{%- endfor -%}
{{bos_token}}{%- if not ns.found -%}
{{'You are an AI programming assistant, utilizing the Deepseek Coder model, developed by Deepseek Company, and you only answer questions related to computer science. For politically sensitive questions, security and privacy issues, and other non-computer science questions, you will refuse to answer\\n'}}
{%- endif %}
{%- for message in messages %}
    {%- if message['role'] == 'system' %}
{{ message['content'] }}
    {%- else %}
        {%- if message['role'] == 'user' %}
{{'### Instruction:\\n' + message['content'] + '\\n'}}
        {%- else %}
{{'### Response:\\n' + message['content'] + '\\n<|EOT|>\\n'}}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{% if add_generation_prompt %}
{{'### Response:'}}
{% endif %}"""  # deepseek-ai/deepseek-coder-6.7b-instruct
DEEPSEEK_CHAT = (  # deepseek-ai/deepseek-llm-7b-chat, deepseek-llm-67b-chat
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}{{ bos_token }}"
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")

LLAMA31 = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\\n\\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""  # meta-llama/Llama-3.1-8B-Instruct (Llama-3.3-70B-Instruct: the same)
# Llama-3.2-1B/3B-Instruct: the same but for the date, today's unless given.
LLAMA32 = LLAMA31.replace('{%- if not date_string is defined %}\n    {%- set date_string = "26 Jul 2024" %}\n{%- endif %}',
                          '{%- if not date_string is defined %}\n    {%- if strftime_now is defined %}\n'
                          '        {%- set date_string = strftime_now("%d %b %Y") %}\n    {%- else %}\n'
                          '        {%- set date_string = "26 Jul 2024" %}\n    {%- endif %}\n{%- endif %}')
MISTRAL_V3 = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
            {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""  # mistralai/Mistral-7B-Instruct-v0.3
QWEN2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
         "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
         "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")  # Qwen/Qwen2-7B-Instruct
QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""  # Qwen/Qwen2.5-7B-Instruct
YI15 = (  # 01-ai/Yi-1.5-34B-Chat
    "{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}{% endif %}"
    "{% if system_message is defined %}{{ system_message }}{% endif %}"
    "{% for message in messages %}{% set content = message['content'] %}{% if message['role'] == 'user' %}"
    "{{ '<|im_start|>user\\n' + content + '<|im_end|>\\n<|im_start|>assistant\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ content + '<|im_end|>' + '\\n' }}{% endif %}{% endfor %}")

IM = ("<|im_start|>", "<|im_end|>")
LLAMA31_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
                  "<|python_tag|>")
# our name -> (official template, special tokens of the model, bos, eos)
OFFICIAL = {
    "llama-2": (LLAMA2, (), "<s>", "</s>"),
    "codellama-instruct": (CODELLAMA, (), "<s>", "</s>"),
    "mistral": (MISTRAL, (), "<s>", "</s>"),
    "zephyr": (ZEPHYR, (), "<s>", "</s>"),
    "llama-3": (LLAMA3, ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
                "<|begin_of_text|>", "<|eot_id|>"),
    "yi": (YI, IM, "<|startoftext|>", "<|im_end|>"),
    "yi-1.5": (YI15, IM, "<|startoftext|>", "<|im_end|>"),
    "llama-3.1": (LLAMA31, LLAMA31_TOKENS, "<|begin_of_text|>", "<|eot_id|>"),
    "llama-3.2": (LLAMA32, LLAMA31_TOKENS, "<|begin_of_text|>", "<|eot_id|>"),
    "mistral-v0.3": (MISTRAL_V3, ("[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                                  "[TOOL_RESULTS]", "[/TOOL_RESULTS]"), "<s>", "</s>"),
    "qwen2": (QWEN2, (*IM, "<|endoftext|>"), "<|endoftext|>", "<|im_end|>"),
    "qwen2.5": (QWEN25, (*IM, "<|endoftext|>", "<tool_call>", "</tool_call>"), "<|endoftext|>", "<|im_end|>"),
    "internlm2": (INTERNLM2, IM, "<s>", "</s>"),
    "deepseek-coder": (DEEPSEEK_CODER, ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<|EOT|>"),
                       "<｜begin▁of▁sentence｜>", "<|EOT|>"),
    "deepseek-chat": (DEEPSEEK_CHAT, ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
                      "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
}
# Mistral's current template writes " [INST] " after BOS and EOS for its non-legacy tokenizer, which puts
# no word-start mark after a special token: the same tokens as mistral-common's [BOS]▁[INST]...▁[/INST]▁reply[EOS].
# (tests/test_templates.py checks the same template against FastChat's string on the legacy tokenizer.)
NON_LEGACY = {"mistral"}
# Mistral v0.3 puts the system message before the last instruction: a conversation's rendering is not a prefix
# of its continuation's, so the HF path cannot find the replies (the built-in template can).
NOT_INCREMENTAL = {"mistral-v0.3"}
# Zephyr's and TinyLlama's template writes no BOS and apply_chat_template(tokenize=True) adds none, but
# both were trained (alignment-handbook) on the rendered text tokenized with the tokenizer's BOS: we add it.
BOS_ADDED_BY_TRAINING = {"zephyr"}


@pytest.fixture(scope="module")
def official():
    """name -> (transformers tokenizer, our tokenizer) for each official template."""
    out, loaded = {}, {}
    for name, (source, tokens, bos, eos) in OFFICIAL.items():
        if bos not in ("<s>",) and bos not in tokens:
            tokens = (*tokens, bos)
        key = (tokens, bos, eos, name not in NON_LEGACY)
        if key not in loaded:  # templates of one vocabulary share it; the template is passed per call
            folder = llama2_folder(tuple(tokens), {"bos_token": bos, "eos_token": eos}, legacy=key[-1])
            loaded[key] = (transformers.AutoTokenizer.from_pretrained(folder), Tokenizer.from_folder(folder))
        out[name] = loaded[key]
    return out


def hf_ids(hf, conversation, generation: bool, source: str | None = None) -> list[int]:
    got = hf.apply_chat_template(conversation, tokenize=True, add_generation_prompt=generation, chat_template=source)
    return list(got["input_ids"] if hasattr(got, "keys") else got)


CASES = [k for k in CONVERSATIONS if k != "empty-contents"] + ["empty-contents"]


@pytest.mark.parametrize("conversation", CASES, ids=str)
@pytest.mark.parametrize("name", list(OFFICIAL))
def test_ids_equal_apply_chat_template(official, name, conversation) -> None:
    hf, tok = official[name]
    c = CONVERSATIONS[conversation]
    generation = c[-1]["role"] == U
    expected = hf_ids(hf, c, generation, OFFICIAL[name][0])
    if name in BOS_ADDED_BY_TRAINING:
        expected = [tok.bos_id] + expected
    ids, mask = get_template(name).render_ids(c, tok, add_generation_prompt=generation)
    assert ids == expected, (tok.decode(ids), hf.decode(expected))
    assert get_template(name).prompt_ids(c, tok, add_generation_prompt=generation) == ids
    # The model's own template through camelid's sandboxed HF path gives the same ids and mask.
    source, _, bos, eos = OFFICIAL[name]
    embedded = template_from_hf(source, bos_token=bos, eos_token=eos)
    # Its prompt-only path renders the conversation once: transformers' ids, whether or not the template
    # renders incrementally (Mistral v0.3 with a system message does not).
    prompt = embedded.prompt_ids(c, tok, add_generation_prompt=generation)
    assert (prompt if name not in BOS_ADDED_BY_TRAINING else [tok.bos_id] + prompt) == expected
    if name in NOT_INCREMENTAL and c[0]["role"] == S and len(c) > 2:
        # Its system message moves to the final instruction: replies cannot be told apart from the jinja alone.
        with pytest.raises(CamelidError, match="incrementally"):
            embedded.render_ids(c, tok, add_generation_prompt=generation)
        return
    e_ids, e_mask = embedded.render_ids(c, tok, add_generation_prompt=generation)
    assert (e_ids if name not in BOS_ADDED_BY_TRAINING else [tok.bos_id] + e_ids) == ids
    assert e_mask == (mask if name not in BOS_ADDED_BY_TRAINING else mask[1:])


# ---- SmolLM2: the chat template in the built-in GGUF ----------------------------------------------------
@pytest.fixture(scope="module")
def smollm2(smollm2_gguf, tmp_path_factory):
    metadata = GGUFReader(smollm2_gguf).metadata
    ours = Tokenizer.from_gguf_metadata(metadata)
    folder = tmp_path_factory.mktemp("smollm2")
    # The same vocabulary as a tokenizer.json, for transformers.
    ours._backend.tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "chat_template": metadata["tokenizer.chat_template"]}), encoding="utf-8")
    return transformers.AutoTokenizer.from_pretrained(folder), ours, metadata["tokenizer.chat_template"]


@pytest.mark.parametrize("conversation", CASES, ids=str)
def test_smollm2_ids_equal_its_gguf_template(smollm2, conversation) -> None:
    hf, tok, source = smollm2
    c = CONVERSATIONS[conversation]
    generation = c[-1]["role"] == U
    expected = hf_ids(hf, c, generation)
    for template in (get_template("smollm"), template_from_hf(source, bos_token="<|im_start|>", eos_token="<|im_end|>")):
        ids, mask = template.render_ids(c, tok, add_generation_prompt=generation)
        assert ids == expected, template
        assert template.prompt_ids(c, tok, add_generation_prompt=generation) == ids, template
        trained = tok.decode([i for i, m in zip(ids, mask) if m])
        assert trained == "".join(m["content"] + "<|im_end|>" for m in c if m["role"] == A)


def test_long_conversation_prompt_ids_equal_transformers(smollm2) -> None:
    # 64 exchanges: the prompt path (one rendering, one encoding) and the masked path agree with
    # apply_chat_template, also when continuing the final reply.
    hf, tok, source = smollm2
    t = template_from_hf(source, bos_token="<|im_start|>", eos_token="<|im_end|>")
    c = [{"role": "system", "content": "Be brief."}]
    for i in range(64):
        c += msgs((U, f"Question {i}: {i} + {i}?"), (A, f"{2 * i}, of course."))
    c += msgs((U, "And the next?"))
    expected = hf_ids(hf, c, True)
    assert t.prompt_ids(c, tok) == expected == t.render_ids(c, tok)[0]
    opened = c + msgs((A, "It is"))
    got = hf.apply_chat_template(opened, tokenize=True, continue_final_message=True)
    got = list(got["input_ids"] if hasattr(got, "keys") else got)
    assert t.prompt_ids(opened, tok, add_generation_prompt=False, continue_final_message=True) == got
    assert t.render_ids(opened, tok, add_generation_prompt=False, continue_final_message=True)[0] == got


def test_hf_template_honours_add_generation_prompt(smollm2) -> None:
    hf, tok, source = smollm2
    t = template_from_hf(source, bos_token="<|im_start|>", eos_token="<|im_end|>")
    c = msgs((U, "Hi"))
    with_prompt = t.render_text(c, add_generation_prompt=True)
    without = t.render_text(c, add_generation_prompt=False)
    assert with_prompt == without + "<|im_start|>assistant\n"
    assert with_prompt == hf.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
    assert without == hf.apply_chat_template(c, tokenize=False, add_generation_prompt=False)


# ---- the sandbox -----------------------------------------------------------------------------------------
def test_raise_exception_becomes_a_clear_error() -> None:
    t = template_from_hf(LLAMA2, bos_token="<s>", eos_token="</s>")
    with pytest.raises(CamelidError, match="Conversation roles must alternate"):
        t._render(msgs((A, "a"), (U, "b")), False)
    with pytest.raises(CamelidError, match="refused the conversation: no tools"):
        template_from_hf("{{ raise_exception('no tools') }}").render_text(msgs((U, "x")))


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",           # reaching Python internals
    "{{ messages.append({'role': 'user', 'content': 'x'}) }}",  # mutating the caller's data
    "{{ cycler.__init__.__globals__ }}",
])
def test_hf_templates_run_sandboxed(source) -> None:
    with pytest.raises(CamelidError, match="chat template"):
        template_from_hf(source).render_text(msgs((U, "x")))


def test_bad_jinja_is_a_clear_error() -> None:
    with pytest.raises(CamelidError, match="does not parse"):
        template_from_hf("{% for m in messages %}")


# ---- which template a model gets -----------------------------------------------------------------------
def test_resolution_order(tmp_path, smollm2) -> None:
    _, tok, source = smollm2
    (tmp_path / "camelid.json").write_text(json.dumps({"chat_template": "llama-2"}))
    args = dict(model_dir=tmp_path, embedded=source, model_name="vicuna-7b", tokenizer=tok)
    # explicit > camelid.json > embedded > name
    assert resolve_template(explicit="zephyr", **args) == (get_template("zephyr"), None)
    assert resolve_template(explicit=None, **args) == (get_template("llama-2"), None)
    (tmp_path / "camelid.json").write_text(json.dumps({"chat_template": "embedded"}))
    t, notice = resolve_template(explicit=None, **args)
    assert t.name == "embedded" and notice is None
    assert t.render_text(msgs((U, "q"))) == get_template("smollm").render_text(msgs((U, "q")))
    t, notice = resolve_template(explicit=None, **{**args, "embedded": None})
    assert t is get_template("vicuna_v1.1") and "'vicuna'" in notice and "--template" in notice
    # Most specific name wins: CodeLlama is not Llama-2, Vicuna v0 is not v1.1.
    assert resolve_template(explicit=None, model_dir=None, embedded=None, model_name="CodeLlama-7b-Instruct-hf",
                            tokenizer=tok)[0].name == "codellama-instruct"
    assert resolve_template(explicit=None, model_dir=None, embedded=None, model_name="vicuna-13b-delta-v0",
                            tokenizer=tok)[0].name == "vicuna_v0"
    with pytest.raises(CamelidError, match="carries no chat template and its name matches none"):
        resolve_template(explicit=None, model_dir=None, embedded=None, model_name="gpt2-medium", tokenizer=tok)
    with pytest.raises(CamelidError, match="carries no chat template"):
        resolve_template(explicit="embedded", model_dir=None, embedded=None, model_name="x", tokenizer=tok)
    # camelid.json may carry fastllm settings or EasyLM LMServer chat flags; half of them is an error.
    (tmp_path / "camelid.json").write_text(json.dumps({"chat_template": {
        "chat_prepend_text": "BEGINNING OF CONVERSATION: ", "chat_user_prefix": "USER: ", "chat_user_suffix": " ",
        "chat_lm_prefix": "GPT:", "chat_lm_suffix": "</s>"}}))
    t, _ = resolve_template(explicit=None, **args)
    assert t.render_text(msgs((U, "Hello!"))) == "BEGINNING OF CONVERSATION: USER: Hello! GPT:"
    (tmp_path / "camelid.json").write_text(json.dumps({"chat_template": {"pre_prompt": "", "user_role": "U:"}}))
    with pytest.raises(CamelidError, match="lacks bot_role, history_sep"):
        resolve_template(explicit=None, **args)


def test_template_for_answers_for_a_model_path(tmp_path, smollm2, smollm2_gguf) -> None:
    # The one choice chat, serve, train and eval make: a folder's camelid.json, else the embedded template,
    # else the name; a file has no camelid.json beside it to read.
    _, tok, source = smollm2
    (tmp_path / "camelid.json").write_text(json.dumps({"chat_template": "llama-2"}))
    assert template_for(tmp_path, source, "vicuna-7b", tokenizer=tok) == (get_template("llama-2"), None)
    assert template_for(tmp_path, source, "vicuna-7b", "zephyr", tokenizer=tok) == (get_template("zephyr"), None)
    embedded, notice = template_for(smollm2_gguf, source, "vicuna-7b", tokenizer=tok)
    assert embedded.name == "embedded" and notice is None
    assert embedded.prompt_ids(msgs((U, "q")), tok) == get_template("smollm").prompt_ids(msgs((U, "q")), tok)
    # BOS/EOS text given directly (a writer that has no tokenizer object) is what the jinja template sees.
    t, _ = template_for(None, "{{ bos_token }}{{ messages[0]['content'] }}{{ eos_token }}", bos_token="<B>",
                        eos_token="<E>")
    assert t.render_text(msgs((U, "q")), add_generation_prompt=False) == "<B>q<E>"
    t, notice = template_for(str(tmp_path / "missing"), None, "CodeLlama-7b-Instruct-hf")
    assert t.name == "codellama-instruct" and "'codellama'" in notice
    with pytest.raises(CamelidError, match="gpt2-medium carries no chat template"):
        template_for(None, None, "gpt2-medium")


def test_check_template_name_refuses_before_loading() -> None:
    check_template_name(None)
    check_template_name("embedded")  # the model's own: known only once it is open
    check_template_name("Llama-2")
    with pytest.raises(CamelidError, match=r"^--template: no conversation template named 'lama-2'.*llama-2"):
        check_template_name("lama-2")
