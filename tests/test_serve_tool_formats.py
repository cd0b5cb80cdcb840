"""Tool calling in each family's own format through a real `camelid serve` on 127.0.0.1 and the `openai`
client. Six tiny random LLaMA folders share one server: Llama-3.1, Mistral v0.3 and Qwen2.5, each once with
the official chat template embedded (tokenizer_config.json) and once with camelid's built-in template
(camelid.json). The prompt the server builds, tools included, is checked token for token against
transformers' apply_chat_template with the official template (through /tokenize, as vLLM's takes tools);
forced calls (named, required, streamed) come back schema-valid in the format, and a call with its result
goes back in as the official template writes it."""
from __future__ import annotations

import json
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
import tokenizers
import torch
import transformers

from camelid.chat.tools import mistral_id
from camelid.serve.launch import start_server

from .helpers import LLAMA2_TOKENIZER_DIR, openai_client
from .official_templates import LLAMA31, MISTRAL_V3, QWEN25

LLAMA2_TOKENIZER = LLAMA2_TOKENIZER_DIR / "tokenizer.json"
KEY = "tool-formats-3"
# family -> (official template, special tokens, plain added tokens, bos, eos, built-in template)
FAMILIES = {
    "llama": (LLAMA31, ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                            "<|eom_id|>", "<|python_tag|>"), (), "<|begin_of_text|>", "<|eot_id|>", "llama-3.1"),
    "mistral": (MISTRAL_V3, ("[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                                 "[TOOL_RESULTS]", "[/TOOL_RESULTS]"), (), "<s>", "</s>", "mistral-v0.3"),
    "qwen": (QWEN25, ("<|im_start|>", "<|im_end|>", "<|endoftext|>"), ("<tool_call>", "</tool_call>"),
             "<|endoftext|>", "<|im_end|>", "qwen2.5"),
}
MODELS = [f"{family}-{kind}" for family in FAMILIES for kind in ("official", "builtin")]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Local time of a city",
                                         "parameters": {"type": "object",
                                                        "properties": {"city": {"type": "string", "maxLength": 12}},
                                                        "required": ["city"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What's the weather like in Paris right now?"}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}


def _model(folder: Path, family: str, embedded: bool) -> Path:
    template, special, plain, bos, eos, builtin = FAMILIES[family]
    folder.mkdir(parents=True)
    tok = tokenizers.Tokenizer.from_file(str(LLAMA2_TOKENIZER))
    tok.add_special_tokens([tokenizers.AddedToken(t, normalized=False, special=True)
                            for t in special + ((bos,) if bos != "<s>" and bos not in special else ())])
    tok.add_tokens([tokenizers.AddedToken(t, normalized=False, special=False) for t in plain])
    tok.save(str(folder / "tokenizer.json"))
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos, "unk_token": "<unk>"}
    if embedded:
        settings["chat_template"] = template
    else:
        (folder / "camelid.json").write_text(json.dumps({"chat_template": builtin}), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, ensure_ascii=False), encoding="utf-8")
    config = transformers.LlamaConfig(vocab_size=32064, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                      bos_token_id=tok.token_to_id(bos), eos_token_id=tok.token_to_id(eos))
    torch.manual_seed(len(folder.name))
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    if not LLAMA2_TOKENIZER.is_file():
        pytest.fail(f"{LLAMA2_TOKENIZER} is missing: run `make setup`")
    root = tmp_path_factory.mktemp("tool-formats")
    return {name: _model(root / name, name.split("-")[0], name.endswith("official")) for name in MODELS}


@pytest.fixture(scope="module")
def server(folders, tmp_path_factory):
    args = ["--api-key", KEY, "--context", "1024", "--max-batch", "4"]
    for name, folder in folders.items():
        args += ["--model", f"{name}={folder}"]
    srv = start_server(args, tmp_path_factory.mktemp("tool-formats-log") / "server.log", timeout=300)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai_client(server, KEY, timeout=120)


@pytest.fixture(scope="module")
def official(folders):
    """family -> transformers tokenizer with the official template."""
    return {family: transformers.AutoTokenizer.from_pretrained(folders[f"{family}-official"]) for family in FAMILIES}


def _served_ids(server, model: str, messages: list[dict], tools: list[dict] | None) -> list[int]:
    body = {"model": model, "messages": messages, "tools": tools, "add_generation_prompt": True}
    r = httpx.post(f"{server.url}/tokenize", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def _hf_messages(messages: list[dict]) -> list[dict]:
    """transformers' convention: a call's arguments as a dict. The function's name comes first whatever order
    the client's fields have (the openai client's are alphabetical): Mistral's template writes the dict as given,
    and its calls were trained name first."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [{**c, "function": {"name": c["function"]["name"],
                                                  "arguments": json.loads(c["function"]["arguments"])}}
                               for c in m["tool_calls"]]
        out.append({k: v for k, v in m.items() if v is not None})
    return out


def _expected(hf, messages: list[dict], tools) -> list[int]:
    got = hf.apply_chat_template(_hf_messages(messages), tools=tools, tokenize=True, add_generation_prompt=True)
    return list(got["input_ids"] if hasattr(got, "keys") else got)


@pytest.mark.parametrize("model", MODELS)
def test_forced_call_round_trips_in_the_family_format(server, client, official, model):
    family = model.split("-")[0]
    hf = official[family]
    assert _served_ids(server, model, ASK, [WEATHER, TIME]) == _expected(hf, ASK, [WEATHER, TIME])
    out = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER, TIME], temperature=1.0, seed=3,
                                         tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS["get_weather"])
    if family == "mistral":
        assert len(call.id) == 9 and call.id.isalnum()
    # The prompt was the official rendering plus where the format's call begins.
    opener = {"llama": "", "mistral": "[TOOL_CALLS]", "qwen": "<tool_call>\n"}[family]
    prefix = hf.encode(opener, add_special_tokens=False) if opener else []
    assert out.usage.prompt_tokens == len(_expected(hf, ASK, [WEATHER, TIME])) + len(prefix)
    # The call and its result go back in, written as the official template writes them.
    messages = ASK + [choice.message.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "clear"}'}]
    assert _served_ids(server, model, messages, [WEATHER, TIME]) == _expected(hf, messages, [WEATHER, TIME])
    answer = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER, TIME], tool_choice="none",
                                            temperature=0, max_tokens=8)
    assert answer.usage.prompt_tokens == len(_expected(hf, messages, None)) and not answer.choices[0].message.tool_calls


@pytest.mark.parametrize("model", ["llama-builtin", "mistral-official", "qwen-official"])
def test_required_call_streams_openai_deltas(client, model):
    kwargs = dict(model=model, messages=[{"role": "user", "content": "Time in Tokyo?"}], tools=[WEATHER, TIME],
                  tool_choice="required", temperature=0)
    calls = client.chat.completions.create(**kwargs).choices[0].message.tool_calls
    assert 1 <= len(calls) <= 2  # at most one call per tool offered
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    chunks = [c for c in client.chat.completions.create(**kwargs, stream=True) if c.choices]
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    for k, call in enumerate(calls):  # as OpenAI streams them: id and name first, then the arguments
        mine = [d for d in deltas if d.index == k]
        assert mine[0].id and mine[0].type == "function" and mine[0].function.name == call.function.name
        assert mine[0].function.arguments == ""
        assert "".join(d.function.arguments or "" for d in mine) == call.function.arguments
        assert len(mine) > 2  # the arguments come in pieces as they are written
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("model", ["llama-official", "mistral-builtin"])
def test_auto_choice_offers_tools_and_answers_text_or_calls(server, client, official, model):
    hf = official[model.split("-")[0]]
    out = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER], temperature=0, max_tokens=12)
    assert out.usage.prompt_tokens == len(_expected(hf, ASK, [WEATHER]))
    message = out.choices[0].message
    # A random model writes words: they come back as content, never half a call.
    assert (message.content is not None) != bool(message.tool_calls)



@pytest.mark.parametrize("model", ["mistral-official", "mistral-builtin"])
def test_other_clients_call_ids_are_mapped_for_mistral(server, official, model):
    # OpenAI-style ids ("call_...") would make Mistral's own template refuse the conversation.
    call = {"id": "call_Xy12", "type": "function", "function": {"name": "get_time", "arguments": '{"city": "Rome"}'}}
    messages = ASK + [{"role": "assistant", "content": None, "tool_calls": [call]},
                      {"role": "tool", "tool_call_id": "call_Xy12", "content": "14:05"}]
    mapped = mistral_id("call_Xy12")
    expected = [{**m, "tool_calls": [{**call, "id": mapped}]} if m.get("tool_calls") else
                {**m, "tool_call_id": mapped} if m["role"] == "tool" else m for m in messages]
    assert _served_ids(server, model, messages, [TIME]) == _expected(official["mistral"], expected, [TIME])


def test_misplaced_tool_messages_are_a_400(server):
    body = {"model": "llama-official", "tools": [TIME],
            "messages": [{"role": "tool", "tool_call_id": "c1", "content": "14:05"}, *ASK]}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert "tool result with no assistant turn before it" in r.json()["error"]["message"]
