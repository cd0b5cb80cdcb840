"""Conversation templates against their references: FastChat 0.2.36's strings, Meta's token-level Llama-2
dialog, Koala's documented prompts with EasyLM's field tokenization, fastllm's prompt rule, and loss masks.

Where we deliberately differ from FastChat, the expected string is FastChat's output with the correction
applied by `FIXES` below, and each correction says why. (Token ids against transformers'
apply_chat_template: tests/test_templates_hf.py.)
"""
from __future__ import annotations

import re

import pytest
from fastchat.conversation import get_conv_template

from camelid.chat import get_template, list_templates, template_from_fastllm, template_from_lmserver
from camelid.errors import CamelidError
from camelid.templates import fastllm_configs
from camelid.tokenizer import Tokenizer

from .chat_cases import A, CONVERSATIONS, S, U, llama2_with_tokens, msgs, special_tokenizer


@pytest.fixture(scope="module")
def llama2(llama2_tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_folder(llama2_tokenizer_dir)


# FastChat renders an empty message as an open turn (`if message:`), e.g. Llama-2's `[INST] [INST]`.
# We render "" like any other content; the expected string is FastChat's layout with a placeholder
# content that is then removed.
EMPTY = "\x00"


def fastchat(name: str, conversation: list[dict[str, str]], *, system: str | None = None) -> str:
    conv = get_conv_template(name)
    rest = conversation
    if conversation[0]["role"] == S:
        conv.set_system_message(conversation[0]["content"] or EMPTY)
        rest = conversation[1:]
    elif system is not None:
        conv.set_system_message(system)
    for m in rest:
        conv.append_message(conv.roles[0 if m["role"] == U else 1], m["content"] or EMPTY)
    if rest[-1]["role"] == U:
        conv.append_message(conv.roles[1], None)
    return conv.get_prompt().replace(EMPTY, "")


def stripped(conversation, *, system: bool = False):
    """Contents stripped as Meta's chat_completion does: each instruction and reply, except that the system
    block and the first instruction are stripped as one string (system=True: the system message on its own
    too, as CodeLlama's HF template does)."""
    out = [dict(m) for m in conversation]
    for i, m in enumerate(out):
        if m["role"] == S:
            m["content"] = m["content"].strip() if system else m["content"]
        elif i == 1 and out[0]["role"] == S:
            m["content"] = m["content"].rstrip()
        else:
            m["content"] = m["content"].strip()
    return out


def no_trailing_bos(text: str, conversation) -> str:
    # FastChat's sep2 " </s><s>" leaves a BOS after the last reply of a finished conversation; Meta and
    # the HF template end it with EOS.
    return text[: -len("<s>")] if conversation[-1]["role"] == A else text


def yi_system(conversation) -> str:
    # FastChat's Yi-34b-chat drops the "<|im_start|>system\n" header (its system_template is bare).
    text = fastchat("Yi-34b-chat", conversation)
    return "<|im_start|>system\n" + text if conversation[0]["role"] == S else text


def deepseek_coder(conversation) -> str:
    # FastChat's deepseek-coder differs from the official HF template in three ways, all corrected here:
    # its default system text ("DeepSeek ... answer."; the model's own reads "Deepseek ... answer" + "\n"),
    # it ignores a given system message (the official template writes it, with no newline after it), and
    # it drops the "\n<|EOT|>" that closes each reply.
    fastchat_system = get_conv_template("deepseek-coder").system_template + "\n"
    rest = conversation[1:] if conversation[0]["role"] == S else conversation
    text = fastchat("deepseek-coder", rest).removeprefix(fastchat_system)
    pos = 0
    for m in rest:
        if m["role"] == A:
            reply = "### Response:\n" + m["content"] + "\n"
            pos = text.index(reply, pos) + len(reply)
            text = text[:pos] + "<|EOT|>\n" + text[pos:]
    system = (conversation[0]["content"] if conversation[0]["role"] == S
              else get_template("deepseek-coder").system["default"])
    return system + text


# ours -> the expected string of a conversation, from FastChat 0.2.36. Every lambda beyond plain
# `fastchat(...)` is a deliberate difference, named in its comment.
FIXES = {
    "vicuna_v0": lambda c: fastchat("one_shot", c),
    "vicuna_v0-zero-shot": lambda c: fastchat("zero_shot", c),
    "vicuna_v1.1": lambda c: fastchat("vicuna_v1.1", c),
    "alpaca": lambda c: fastchat("alpaca", c),
    "billa": lambda c: fastchat("billa", c),
    # Koala's docs: "GPT:" then the reply with no space (the reply is tokenized on its own, so its first
    # word-start token brings the space); FastChat writes "GPT: reply".
    "koala_v1": lambda c: fastchat("koala_v1", c).replace(" GPT: ", " GPT:"),
    # Llama-2 / CodeLlama: contents stripped and an explicit (even empty) system block kept, as Meta's
    # chat_completion and the HF template do; no BOS after the last EOS.
    "llama-2": lambda c: no_trailing_bos(fastchat("llama-2", stripped(c)), c),
    "codellama-instruct": lambda c: no_trailing_bos(fastchat("llama-2", stripped(c, system=True)), c),
    # Chinese-Alpaca-2: the project's own default system prompt (its scripts and fastllm's cookbook),
    # shorter than FastChat's; no BOS after the last EOS.
    "chinese-alpaca-2": lambda c: no_trailing_bos(
        fastchat("chinese-alpaca2", c, system="You are a helpful assistant. 你是一个乐于助人的助手。"), c),
    # InternLM v1's own build_inputs has no system prompt; FastChat invents one.
    "internlm-chat": lambda c: fastchat("internlm-chat", c, system=""),
    "chatml": yi_system,
    # Baichuan2 fine-tune.py closes a finished conversation with EOS.
    "baichuan2": lambda c: fastchat("baichuan2-chat", c) + ("</s>" if c[-1]["role"] == A else ""),
    # Mistral: the official HF template separates a system message from the first instruction by a
    # blank line; FastChat uses one newline.
    "mistral": lambda c: fastchat("mistral", [{**c[0], "content": c[0]["content"] + "\n"}, *c[1:]]
                                  if c[0]["role"] == S else c),
    # Zephyr/TinyLlama: no "<|system|>\n</s>\n" block when there is no system message (FastChat always
    # writes one).
    "zephyr": lambda c: fastchat("zephyr", c).removeprefix("" if c[0]["role"] == S else "<|system|>\n</s>\n"),
    "deepseek-coder": deepseek_coder,
    # DeepSeek-LLM-Chat: FastChat puts BOS in the system message, so a system message deletes it (and the
    # blank line after the system text). Our BOS is an id (render_text leaves it out, render_ids has it).
    "deepseek-chat": lambda c: (c[0]["content"] + "\n\n" + fastchat("deepseek-chat", c[1:]) if c[0]["role"] == S
                                else fastchat("deepseek-chat", c)).replace("<｜begin▁of▁sentence｜>", "", 1),
    "tinyllama": lambda c: fastchat("TinyLlama", c).removeprefix("" if c[0]["role"] == S else "<|system|>\n</s>\n"),
}


@pytest.mark.parametrize("conversation", list(CONVERSATIONS), ids=str)
@pytest.mark.parametrize("name", list(FIXES))
def test_strings_equal_fastchat_with_named_differences(name, conversation) -> None:
    c = CONVERSATIONS[conversation]
    # An explicit empty system message keeps its block (Meta, the HF templates); FastChat drops it. The
    # placeholder content in `fastchat()` gives FastChat's layout for it.
    expected = FIXES[name](c)
    finished = c[-1]["role"] == A
    assert get_template(name).render_text(c, add_generation_prompt=not finished) == expected


def test_fastchat_bugs_are_not_copied() -> None:
    # The known FastChat faults, one by one, with the right output beside them.
    conv = get_conv_template("llama-2")
    conv.append_message("[INST]", "")
    conv.append_message("[/INST]", None)
    assert conv.get_prompt() == "[INST] [INST][/INST]"
    assert get_template("llama-2").render_text(msgs((U, ""))) == "[INST]  [/INST]"
    conv = get_conv_template("Yi-34b-chat")
    conv.set_system_message("S")
    conv.append_message(conv.roles[0], "q")
    conv.append_message(conv.roles[1], None)
    assert conv.get_prompt().startswith("S<|im_end|>")
    assert get_template("yi").render_text(msgs((S, "S"), (U, "q"))).startswith("<|im_start|>system\nS<|im_end|>\n")
    conv = get_conv_template("deepseek-chat")
    conv.set_system_message("S")
    conv.append_message(conv.roles[0], "q")
    conv.append_message(conv.roles[1], None)
    assert conv.get_prompt() == "SUser: q\n\nAssistant:"  # no BOS left
    assert get_template("deepseek-chat").render_text(msgs((S, "S"), (U, "q"))) == "S\n\nUser: q\n\nAssistant:"
    assert get_conv_template("zephyr").get_prompt().startswith("<|system|>\n</s>\n")
    assert get_template("zephyr").render_text(msgs((U, "q"))) == "<|user|>\nq</s>\n<|assistant|>\n"


# ---- Meta's token-level Llama-2 dialog (llama/generation.py chat_completion) --------------------------
def meta_dialog_tokens(tok: Tokenizer, dialog: list[dict[str, str]]) -> list[int]:
    B_INST, E_INST, B_SYS, E_SYS = "[INST]", "[/INST]", "<<SYS>>\n", "\n<</SYS>>\n\n"
    if dialog[0]["role"] == S:
        dialog = [{"role": dialog[1]["role"], "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]},
                  *dialog[2:]]
    ids: list[int] = []
    for prompt, answer in zip(dialog[::2], dialog[1::2]):
        ids += tok.encode(f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} ",
                          bos=True, eos=True)
    if len(dialog) % 2:
        ids += tok.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True)
    return ids


@pytest.mark.parametrize("name", ["llama-2", "codellama-instruct"])
@pytest.mark.parametrize("conversation", [k for k in CONVERSATIONS if CONVERSATIONS[k][-1]["role"] == U], ids=str)
def test_llama2_ids_equal_metas_dialog_tokens(llama2, name, conversation) -> None:
    c = CONVERSATIONS[conversation]
    if name == "codellama-instruct" and conversation == "spaced-system":
        c = stripped(c, system=True)  # CodeLlama's HF template also trims the system message on its own
    ids, mask = get_template(name).render_ids(c, llama2)
    assert ids == meta_dialog_tokens(llama2, c)
    trained = llama2.decode([i for i, m in zip(ids, mask) if m])
    assert trained.split() == " ".join(m["content"].strip() + " </s>" for m in c if m["role"] == A).split()


# ---- Koala (EasyLM docs/koala.md) ----------------------------------------------------------------------
def test_koala_prompts_are_the_documented_ones(llama2) -> None:
    koala = get_template("koala_v1")
    first = msgs((U, "Hello!"))
    assert koala.render_text(first) == "BEGINNING OF CONVERSATION: USER: Hello! GPT:"
    second = msgs((U, "Hello!"), (A, "Hi! How can I help you?"), (U, "What is the largest animal on earth?"))
    assert koala.render_text(second) == ("BEGINNING OF CONVERSATION: USER: Hello! GPT:Hi! How can I help you?</s>"
                                         "USER: What is the largest animal on earth? GPT:")
    # EasyLM's TextProcessor: BOS, then each field tokenized on its own ("[prompt],reply,<|eos|>", ...);
    # prompt fields carry no loss; the reply and its EOS do.
    enc = llama2.encode
    fields = [([llama2.bos_id], 0), (enc("BEGINNING OF CONVERSATION: USER: Hello! GPT:"), 0),
              (enc("Hi! How can I help you?"), 1), ([llama2.eos_id], 1),
              (enc("USER: What is the largest animal on earth? GPT:"), 0)]
    ids, mask = koala.render_ids(second, llama2)
    assert ids == [i for f, _ in fields for i in f]
    assert mask == [bool(m) for f, m in fields for _ in f]
    # The reply starts with its own word-start token, which whole-string tokenization would not give.
    assert enc("GPT:Hi!")[-3:] != enc("Hi!")
    # The same prompt from EasyLM's LMServer chat flags (docs/koala.md's serving command).
    served = template_from_lmserver("BEGINNING OF CONVERSATION: ", "USER: ", " ", "GPT:", "</s>")
    assert served.render_text(second) == koala.render_text(second)


# ---- fastllm cookbook ------------------------------------------------------------------------------------
FLM = re.compile(r"<FLM_FIX_TOKEN_(\d+)>")


def fastllm_ids(tok: Tokenizer, text: str) -> list[int]:
    ids: list[int] = []
    pos = 0
    for m in FLM.finditer(text):
        ids += tok.encode(text[pos:m.start()]) if m.start() > pos else []
        ids.append(int(m.group(1)))
        pos = m.end()
    return ids + (tok.encode(text[pos:]) if pos < len(text) else [])


@pytest.mark.parametrize("family", list(fastllm_configs()))
def test_fastllm_cookbook_rule_for_three_rounds(llama2, family) -> None:
    cfg = fastllm_configs()[family]
    template = get_template("fastllm-" + family)
    qa = [("q one", "a one"), ("q two ü", "a two"), ("q three", None)]
    conversation = msgs(*[p for q, a in qa for p in ((U, q), (A, a)) if p[1] is not None])
    # round N: pre_prompt + Σ(user_role + q_i + bot_role + a_i + history_sep) + user_role + q_N + bot_role
    expected = cfg["pre_prompt"] + "".join(cfg["user_role"] + q + cfg["bot_role"] + a + cfg["history_sep"]
                                           for q, a in qa[:2]) + cfg["user_role"] + qa[2][0] + cfg["bot_role"]
    assert template.render_text(conversation) == expected
    text_pieces = [p for p in FLM.split(expected)[::2] if p]
    ids, mask = template.render_ids(conversation, llama2)
    assert ids == fastllm_ids(llama2, expected), text_pieces
    assert llama2.decode([i for i, m in zip(ids, mask) if m]).replace(" ", "") == "aoneatwo"
    # A system message is dropped, as fastllm drops it.
    assert template.render_text([{"role": S, "content": "ignored"}, *conversation]) == expected


def test_fastllm_config_builds_a_template(llama2) -> None:
    t = template_from_fastllm("<FLM_FIX_TOKEN_1>", "[INST] ", " [/INST]", " <FLM_FIX_TOKEN_2><FLM_FIX_TOKEN_1>")
    conversation = msgs((U, "a"), (A, "b"), (U, "c"))
    # One round is Meta's Llama-2 prompt, token for token. (Later rounds differ: fastllm puts the reply
    # right after " [/INST]", with no space.)
    first = msgs((U, "a b"))
    assert t.render_ids(first, llama2)[0] == meta_dialog_tokens(llama2, first)
    assert t.render_text(conversation) == "<FLM_FIX_TOKEN_1>[INST] a [/INST]b <FLM_FIX_TOKEN_2><FLM_FIX_TOKEN_1>[INST] c [/INST]"


# ---- loss masks ----------------------------------------------------------------------------------------
FINISHED = msgs((S, "Be brief."), (U, "What is one plus one?"), (A, "It is two."), (U, "And two plus two?"),
                (A, "Four, of course."))


@pytest.mark.parametrize("name", [n for n, _ in list_templates() if not n.startswith("fastllm-")])
def test_mask_is_each_reply_plus_its_end_token(llama2, name) -> None:
    template = get_template(name)
    conversation = FINISHED if template.system["placement"] != "none" else FINISHED[1:]
    tok = special_tokenizer(llama2, template)
    ids, mask = template.render_ids(conversation, tok, add_generation_prompt=False)
    assert len(ids) == len(mask)
    runs, run = [], []
    for i, m in zip(ids, mask):
        if m:
            run.append(i)
        elif run:
            runs.append(run)
            run = []
    runs += [run] if run else []
    replies = [m["content"] for m in conversation if m["role"] == A]
    rest = template.assistant["prefix"][len(template.generation):]
    ends = [template.assistant["suffix"]] * len(replies)
    ends[-1] += template.end
    assert len(runs) == len(replies)
    for n, (r, reply, end) in enumerate(zip(runs, replies, ends)):
        # (The LLaMA-2 decoder reads "▁" as a space, also inside DeepSeek's "<｜end▁of▁sentence｜>".)
        assert tok.decode(r).strip() == (rest + reply + end).replace("▁", " ").strip()
        if name == "baichuan2" and n < len(runs) - 1:
            # Baichuan2's history carries no EOS after a reply (build_chat_input; fine-tune.py puts the
            # EOS only as a label there), so an earlier reply ends with its own last token.
            continue
        # The reply ends with its end of turn: a stop token, the end of a stop string, or text that
        # the next user turn continues into a stop string (BiLLa's "\nHuman:", YuLan's "\n[|Human|]").
        after = tok.decode(r) + template.user["prefix"]
        assert r[-1] in template.stop_token_ids(tok) or any(
            s in after[len(tok.decode(r)) - len(end):] for s in template.stop_strings if end), (name, tok.decode(r))
    if template.system["placement"] == "last_user" and conversation[0]["role"] == S:
        # Mistral v0.3 writes the system message before the final instruction only: a finished conversation
        # has none, so its prompt is no prefix of it (the official template does the same).
        return
    if template.generation.endswith(" "):
        # A prompt ending in a space (XVERSE's and BiLLa's "Assistant: ", as their references write it) ends
        # in a lone space token, which the finished conversation merges into the reply's first word.
        return
    # The untrained rest is exactly the prompt: with a generation prompt, the ids of the last reply's
    # prompt are a prefix of the finished conversation's ids.
    prompt_ids, prompt_mask = template.render_ids(conversation[:-1], tok)
    assert ids[:len(prompt_ids)] == prompt_ids and mask[:len(prompt_ids)] == prompt_mask
    assert not prompt_mask[-1]
    last = len(prompt_ids) + len(runs[-1])
    assert all(mask[len(prompt_ids):last]) and not any(mask[last:])
    assert tok.decode(ids[last:]).strip() == template.assistant["separator"].strip()


# ---- errors and the registry -------------------------------------------------------------------------
def test_role_errors_are_clear() -> None:
    t = get_template("vicuna")
    with pytest.raises(CamelidError, match="message 2 is 'user' right after another 'user' message"):
        t.render_text(msgs((U, "a"), (U, "b")))
    with pytest.raises(CamelidError, match="message 1 is 'assistant' where a user message must come first"):
        t.render_text(msgs((A, "a")))
    with pytest.raises(CamelidError, match="only the first message may be one"):
        t.render_text(msgs((U, "a"), (S, "b")))
    with pytest.raises(CamelidError, match="role must be system, user or assistant"):
        t.render_text([{"role": "tool", "content": "x"}])
    with pytest.raises(CamelidError, match="needs the conversation to end with a user message"):
        t.render_text(msgs((U, "a"), (A, "b")), add_generation_prompt=True)
    with pytest.raises(CamelidError, match="has no place for a system message"):
        get_template("xverse").render_text(msgs((S, "s"), (U, "a")))
    with pytest.raises(CamelidError, match="did you mean vicuna_v1.1"):
        get_template("vicuna_v1.2")


ISSUE_LIST = ["koala_v1", "vicuna_v0", "vicuna_v1.1", "vicuna_v1.3", "vicuna_v1.5", "alpaca", "llama-2",
              "codellama-instruct", "chinese-alpaca-2", "llama-3", "internlm-chat", "internlm2", "xverse", "billa",
              "yulan", "yi", "deepseek-coder", "deepseek-chat", "baichuan2", "mistral", "zephyr", "tinyllama", "smollm", "chatml"]


def test_registry_covers_the_issue_list_and_the_cookbook() -> None:
    names = {n for n, _ in list_templates()}
    for name in ISSUE_LIST:
        assert get_template(name).name in names
    assert {"fastllm-" + f for f in fastllm_configs()} <= names
    assert all(description for _, description in list_templates())


def test_xverse_yulan_internlm_follow_the_cookbook(llama2) -> None:
    # Templates whose only reference is fastllm's cookbook (XVERSE, YuLan) or InternLM's build_inputs, which
    # the cookbook reproduces: the same text (XVERSE's <|endoftext|> is id 3 in its vocabulary).
    conversation = msgs((U, "q1"), (A, "a1"), (U, "q2"))
    for ours, family in (("xverse", "xverse"), ("yulan", "yulan"), ("internlm-chat", "internlm")):
        theirs = get_template("fastllm-" + family).render_text(conversation)
        text = get_template(ours).render_text(conversation)
        if family == "xverse":
            theirs = theirs.replace("<FLM_FIX_TOKEN_3>", "<|endoftext|>")
        if family == "internlm":  # ours adds the first BOS as an id (render_text leaves it out)
            theirs = theirs.removeprefix("<s>")
        assert text == theirs, family


def test_baichuan2_ids_equal_build_chat_input(llama2) -> None:
    # Baichuan2's generation_utils.build_chat_input: system tokens, then per message the role token id
    # (user 195 = <reserved_106>, assistant 196 = <reserved_107>) and its content tokenized on its own,
    # then the assistant token id; fine-tune.py ends a finished conversation with EOS.
    template = get_template("baichuan2")
    tok = special_tokenizer(llama2, template)
    user, bot = tok.token_to_id("<reserved_106>"), tok.token_to_id("<reserved_107>")
    c = msgs((S, "Be brief."), (U, "Hi there"), (A, "Hello! 你好"), (U, "more"))
    expected = tok.encode("Be brief.") + [user] + tok.encode("Hi there") + [bot] + tok.encode("Hello! 你好") + \
        [user] + tok.encode("more") + [bot]
    assert template.render_ids(c, tok)[0] == expected
    ids, mask = template.render_ids(c[:3], tok, add_generation_prompt=False)
    assert ids == expected[:expected.index(user, 1 + expected.index(bot))] + [tok.eos_id]
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "Hello! 你好</s>"


def test_internlm_ids_equal_build_inputs(llama2) -> None:
    # InternLM v1 modeling_internlm.build_inputs: "<s><|User|>:{q}<eoh>\n<|Bot|>:{a}<eoa>\n" per round,
    # then "<s><|User|>:{q}<eoh>\n<|Bot|>:", tokenized whole by a tokenizer that adds BOS (so two at the start).
    template = get_template("internlm-chat")
    tok = llama2_with_tokens(("<eoh>", "<eoa>"))
    c = msgs((U, "Hi"), (A, "Hello!"), (U, "2+2?"))
    prompt = "<s><|User|>:Hi<eoh>\n<|Bot|>:Hello!<eoa>\n<s><|User|>:2+2?<eoh>\n<|Bot|>:"
    assert template.render_ids(c, tok)[0] == tok.encode(prompt, bos=True)
    ids, mask = template.render_ids(c[:2], tok, add_generation_prompt=False)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "Hello!<eoa>"


def test_content_that_spells_a_special_token_stays_text(llama2) -> None:
    # A user typing "</s>" or "<|im_end|>" gets those characters, not the end-of-turn token.
    for name, marker in (("vicuna", "</s>"), ("llama-2", "</s>"), ("chatml", "<|im_end|>")):
        template = get_template(name)
        tok = special_tokenizer(llama2, template)
        end = tok.token_to_id(marker)
        c = msgs((U, f"say {marker} now"), (A, f"ok {marker}"), (U, "q"))
        ids, mask = template.render_ids(c, tok)
        clean, _ = template.render_ids(msgs((U, "say now"), (A, "ok"), (U, "q")), tok)
        assert ids.count(end) == clean.count(end) >= 1, name  # only the template's own end tokens
        assert tok.decode(ids).count(marker) == tok.decode(clean).count(marker) + 2
        assert tok.decode([i for i, m in zip(ids, mask) if m]).strip().startswith(f"ok {marker}")


# ---- the prompt-only path (serving, generation) --------------------------------------------------------
def long_conversation(turns: int) -> list[dict[str, str]]:
    """A system message and `turns` user/assistant exchanges, ending with a user message."""
    c = [{"role": S, "content": "You answer in one line."}]
    for i in range(turns):
        c += msgs((U, f"Question {i}: what is {i} times {i + 1}? é 世"), (A, f" It is {i * (i + 1)}. "))
    return c + msgs((U, "Thanks, and the last one?"))


PROMPT_CASES = {**CONVERSATIONS, "long": long_conversation(12),
                "special-text": msgs((U, "say </s> and <|im_end|> now"), (A, "ok </s> <s>"), (U, "q"))}


@pytest.mark.parametrize("name", [n for n, _ in list_templates()])
def test_prompt_ids_equal_the_masked_paths_ids(llama2, name) -> None:
    template = get_template(name)
    tok = special_tokenizer(llama2, template)
    for key, c in PROMPT_CASES.items():
        if template.system["placement"] == "none" and c[0]["role"] == S:
            c = c[1:]
        modes = [{"add_generation_prompt": False}]
        modes += [{"add_generation_prompt": True}] if c[-1]["role"] == U else \
            [{"add_generation_prompt": False, "continue_final_message": True}]
        for kwargs in modes:
            ids, _ = template.render_ids(c, tok, **kwargs)
            assert template.prompt_ids(c, tok, **kwargs) == ids, (key, kwargs)
