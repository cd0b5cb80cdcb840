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

from .official_templates import (CODELLAMA, DEEPSEEK_CHAT, DEEPSEEK_CODER, INTERNLM2, LLAMA2, LLAMA3, LLAMA31, LLAMA32,
                                 MISTRAL, MISTRAL_V3, QWEN2, QWEN25, YI, YI15, ZEPHYR)
from .chat_cases import A, CONVERSATIONS, S, U, llama2_folder, msgs

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


def test_loaded_model_template_is_template_for(smollm2_gguf) -> None:
    from camelid.engine import load_model
    loaded = load_model(smollm2_gguf)
    template, notice = loaded.template()
    assert template.name == "embedded" and notice is None
    c = msgs((S, "Be brief."), (U, "Hi"))
    assert template.prompt_ids(c, loaded.tokenizer) == get_template("smollm").prompt_ids(c, loaded.tokenizer)
    assert loaded.template("llama-2") == (get_template("llama-2"), None)
