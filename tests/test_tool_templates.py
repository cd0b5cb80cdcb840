"""Tools, calls and results in the prompt, token for token as each family's official chat template writes
them (transformers' apply_chat_template with the jinja text of tests/official_templates.py, on the real
LLaMA-2 vocabulary with the family's special tokens added): camelid's built-in templates (llama-3.1,
llama-3.2, mistral-v0.3, qwen2.5) and camelid's own sandboxed rendering of the official jinja."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import tokenizers
import transformers

from camelid.chat import get_template, template_from_hf
from camelid.chat.tools import mistral_id
from camelid.errors import CamelidError
from camelid.tokenizer import Tokenizer

from .helpers import LLAMA2_TOKENIZER_DIR
from .official_templates import LLAMA31, LLAMA32, MISTRAL_V3, QWEN25

LLAMA2_TOKENIZER = LLAMA2_TOKENIZER_DIR / "tokenizer.json"
LLAMA_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
                "<|python_tag|>")
MISTRAL_TOKENS = ("[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
                  "[/TOOL_RESULTS]")
# name -> (official template, special tokens, bos, eos, tool format)
FAMILIES = {
    "llama-3.1": (LLAMA31, LLAMA_TOKENS, "<|begin_of_text|>", "<|eot_id|>", "llama3"),
    "llama-3.2": (LLAMA32, LLAMA_TOKENS, "<|begin_of_text|>", "<|eot_id|>", "llama3"),
    "mistral-v0.3": (MISTRAL_V3, MISTRAL_TOKENS, "<s>", "</s>", "mistral"),
    "qwen2.5": (QWEN25, ("<|im_start|>", "<|im_end|>", "<|endoftext|>"), "<|endoftext|>", "<|im_end|>", "hermes"),
}
# Qwen2.5's vocabulary has its tool tags as added tokens that are not special (text a message may hold).
PLAIN_TOKENS = ("<tool_call>", "</tool_call>")
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city, in °C",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Local time",
                                         "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}}
SYSTEM = {"role": "system", "content": "You are a weather bot."}
ASK = {"role": "user", "content": "Weather and time in Paris?"}


def _call(name: str, args: dict, call_id: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


def _exchange(fmt: str) -> list[dict]:
    """A call and its result: Llama's template takes one call per message, the others two at once."""
    if fmt == "llama3":
        return [{"role": "assistant", "content": "", "tool_calls": [_call("get_weather", {"city": "Paris"}, "c1")]},
                {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21}'}]
    ids = ("a1B2c3D4e", "Z9y8X7w6v") if fmt == "mistral" else ("c1", "c2")
    return [{"role": "assistant", "content": "", "tool_calls": [_call("get_weather", {"city": "Paris"}, ids[0]),
                                                                 _call("get_time", {"tz": "CET"}, ids[1])]},
            {"role": "tool", "tool_call_id": ids[0], "content": '{"temp": 21}'},
            {"role": "tool", "tool_call_id": ids[1], "content": "14:05"}]


def conversations(fmt: str) -> dict[str, tuple[list[dict], list[dict] | None]]:
    """name -> (messages, tools)."""
    exchange = _exchange(fmt)
    answer = {"role": "assistant", "content": " It is 21 degrees. "}
    follow = {"role": "user", "content": "And in Rome?"}
    return {
        "tools-first-turn": ([ASK], [WEATHER, TIME]),
        "tools-system-first-turn": ([SYSTEM, ASK], [WEATHER, TIME]),
        "call-and-result": ([ASK, *exchange], [WEATHER, TIME]),
        "system-call-result-answer-follow-up": ([SYSTEM, ASK, *exchange, answer, follow], [WEATHER, TIME]),
        "multi-turn-then-tools": ([ASK, {"role": "assistant", "content": "Which city?"}, follow], [WEATHER]),
        "finished-with-answer": ([ASK, *exchange, answer], [WEATHER, TIME]),
        "history-without-tools": ([SYSTEM, ASK, *exchange, answer, follow], None),
        "no-tools": ([SYSTEM, ASK], None),
    }


def _folder(tokens: tuple[str, ...], bos: str, eos: str, source: str) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="camelid-tools-"))
    tok = tokenizers.Tokenizer.from_file(str(LLAMA2_TOKENIZER))
    extra = [t for t in (*tokens, bos) if t not in ("<s>", "</s>")]
    tok.add_special_tokens([tokenizers.AddedToken(t, normalized=False, special=True) for t in dict.fromkeys(extra)])
    tok.add_tokens([tokenizers.AddedToken(t, normalized=False, special=False) for t in PLAIN_TOKENS])
    tok.save(str(folder / "tokenizer.json"))
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
                "unk_token": "<unk>", "chat_template": source}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, ensure_ascii=False), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def family(request):
    name = request.param
    if not LLAMA2_TOKENIZER.is_file():
        pytest.fail(f"{LLAMA2_TOKENIZER} is missing: run `make setup`")
    source, tokens, bos, eos, fmt = FAMILIES[name]
    folder = _folder(tokens, bos, eos, source)
    return name, source, fmt, transformers.AutoTokenizer.from_pretrained(folder), Tokenizer.from_folder(folder)


def _official(hf, messages: list[dict], tools, generation: bool) -> list[int]:
    got = hf.apply_chat_template(messages, tools=tools, tokenize=True, add_generation_prompt=generation)
    return list(got["input_ids"] if hasattr(got, "keys") else got)


CASES = list(conversations("hermes"))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("family", list(FAMILIES), indirect=True)
def test_builtin_and_embedded_templates_write_tools_as_the_official_one(family, case):
    name, source, fmt, hf, tok = family
    messages, tools = conversations(fmt)[case]
    generation = messages[-1]["role"] != "assistant"
    expected = _official(hf, messages, tools, generation)
    builtin = get_template(name)
    assert builtin.tool_format == fmt
    ours = _ids(builtin.with_tools(tools), messages, tok, generation)
    assert ours == expected, (tok.decode(ours), hf.decode(expected))
    # Training data with tools: the same ids, and the mask covers what the model writes (its calls too).
    ids, mask = builtin.with_tools(tools).render_ids(messages, tok, add_generation_prompt=generation)
    assert ids == expected
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    for m in messages:
        for call in m.get("tool_calls") or []:
            assert call["function"]["name"] in trained
        if m["role"] in ("user", "tool"):
            assert m["content"].strip() not in trained
    embedded = template_from_hf(source, bos_token=hf.bos_token, eos_token=hf.eos_token)
    assert embedded.tool_format == fmt
    assert _ids(embedded.with_tools(tools), messages, tok, generation) == expected


def _ids(template, messages, tok, generation: bool) -> list[int]:
    return template.prompt_ids(messages, tok, add_generation_prompt=generation)


def test_mistral_ids_of_other_clients_are_made_nine_characters():
    assert mistral_id("a1B2c3D4e") == "a1B2c3D4e"
    made = mistral_id("call_0123456789abcdef")
    assert len(made) == 9 and made.isalnum() and made == mistral_id("call_0123456789abcdef")


def test_tool_messages_need_a_call_before_them():
    template = get_template("llama-3.1")
    with pytest.raises(CamelidError, match="tool"):
        template.render_text([{"role": "tool", "content": "x", "tool_call_id": "c1"}])
