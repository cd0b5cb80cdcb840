"""What a .flm carries besides weights: the vocabulary, tokenizer settings and fastllm's four prompt keys;
and the way back (a SentencePiece tokenizer.model + tokenizer_config.json rebuilt from a .flm vocabulary).

fastllm builds a prompt as pre_prompt + Σ(user_role + q_i + bot_role + a_i + history_sep) + user_role + q_N +
bot_role, with `<FLM_FIX_TOKEN_n>` for token id n and no BOS of its own. The keys are found by rendering
the model's template on marker messages (one turn, then two) and cutting the text at the markers; a
three-turn rendering checks that fastllm's rule gives the template's text. Llama-2, Vicuna and Mistral put
a space between the generation prompt and each reply, which the rule cannot hold: the keys are exact for
the current turn and earlier replies lose that space (fastllm's cookbook does the same). A template whose
turns follow no fixed pattern goes into fastllm's `chat_template` key (special tokens as <FLM_FIX_TOKEN_n>),
which fastllm then renders with its own jinja subset. Without any template the keys make a plain
completion prompt (BOS only).
"""
from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any, BinaryIO, Callable

from ..errors import CamelidError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_MARKS = ("camelidq1", "camelida1", "camelidq2", "camelida2", "camelidq3")
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_FLM_TOKEN = re.compile(r"<FLM_FIX_TOKEN_(\d+)>")
# (BOS token text, EOS token text) -> the model's chat template object, or None (see `prompt_keys`)
TemplateFor = Callable[[Any, Any], Any]


# ---- the vocabulary ---------------------------------------------------------------------------------
def build_vocab(files: dict[str, Path], metadata: dict[str, Any], config: Any) -> dict[str, Any]:
    """tokens, scores, types, model ('llama' SentencePiece-style or 'gpt2' byte-level), special ids."""
    from .gguf_writer import tokenizer_vocab
    if not files and not metadata.get("tokenizer.ggml.tokens"):
        raise CamelidError("fastllm output needs the tokenizer (fastllm tokenizes with the vocabulary in the file): "
                           "the source has none, pass --tokenizer PATH (a tokenizer.json / tokenizer.model or its "
                           "folder)")
    v = tokenizer_vocab(files, metadata, config.vocab_size)
    if "metadata" in v:  # a GGUF source: its tokenizer.* keys
        md = v["metadata"]
        v = {"model": md.get("tokenizer.ggml.model", "llama"), "tokens": list(md["tokenizer.ggml.tokens"]),
             "scores": md.get("tokenizer.ggml.scores"), "types": list(md.get("tokenizer.ggml.token_type") or []),
             "merges": list(md.get("tokenizer.ggml.merges") or []), "pre": md.get("tokenizer.ggml.pre"),
             "add_space_prefix": md.get("tokenizer.ggml.add_space_prefix", md.get("tokenizer.ggml.model") == "llama"),
             "bos": md.get("tokenizer.ggml.bos_token_id"), "eos": md.get("tokenizer.ggml.eos_token_id"),
             "add_bos": md.get("tokenizer.ggml.add_bos_token", True)}
    if v["model"] not in ("llama", "gpt2"):
        raise CamelidError(f"a {v['model']!r} vocabulary cannot be written for fastllm (llama or gpt2 BPE only)")
    n = len(v["tokens"])
    v["types"] = list(v.get("types") or [NORMAL] * n)
    if v.get("bos") is None:
        v["bos"] = config.bos_token_id
    if v.get("eos") is None:
        v["eos"] = config.eos_ids[0] if config.eos_ids else None
    if v["model"] == "gpt2" or not v.get("scores"):
        # fastllm's converter scores byte-level BPE tokens by merge rank (0, -1, ...), the rest 1.0.
        rank: dict[str, int] = {}
        for r, m in enumerate(v.get("merges") or []):
            rank.setdefault(m.replace(" ", "", 1), r)
        v["scores"] = [-float(rank[t]) if t in rank else 1.0 for t in v["tokens"]]
    return v


def tokenizer_keys(v: dict[str, Any]) -> dict[str, str]:
    """fastllm's tokenizer settings. SentencePiece vocabularies keep runs of spaces (fastllm's default
    would collapse them), byte-level ones map bytes to their printable characters."""
    llama = v["model"] == "llama"
    keys = {"tokenizer_use_score": "1",
            "tokenizer_add_dummy_prefix": str(bool(v.get("add_space_prefix", True)) if llama else False),
            "tokenizer_remove_extra_whitespaces": "False",
            "tokenizer_byte_as_char": str(not llama),
            "camelid_add_bos_token": str(bool(v.get("add_bos", llama)))}
    if not llama:
        # fastllm needs only tokens and scores; the merges, token types and pre-tokenizer (which a byte-level
        # vocabulary cannot be rebuilt without) ride along in keys fastllm ignores, so .flm -> HF / GGUF keeps
        # the exact tokenizer.
        keys.update({"camelid_merges": json.dumps(v.get("merges") or [], ensure_ascii=False),
                     "camelid_token_types": json.dumps(v["types"]), "camelid_tokenizer_pre": v.get("pre") or "gpt2"})
    return keys


def _placeholder(token: str, i: int) -> bool:
    return token in (f"[PAD{i}]",)  # rows the vocabulary was padded with to match the embedding (not real tokens)


def write_vocab(f: BinaryIO, v: dict[str, Any]) -> None:
    entries = [(i, t) for i, t in enumerate(v["tokens"]) if not _placeholder(t, i)]
    f.write(struct.pack("<i", len(entries)))
    for i, token in entries:
        raw = token.encode("utf-8")
        f.write(struct.pack(f"<{len(raw) + 2}i", len(raw), *raw, i))
        f.write(struct.pack("<f", float(v["scores"][i])))


# ---- the prompt keys --------------------------------------------------------------------------------
def _model_template(v: dict[str, Any], template_for: TemplateFor | None) -> Any:
    if template_for is None:
        return None
    tokens = v["tokens"]
    name = lambda i: tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None  # noqa: E731
    return template_for(name(v.get("bos")), name(v.get("eos")))


def _render(template: Any, turns: list[str], generation: bool) -> str:
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    return (template.bos_token_text() or "") + template.render_text(messages, add_generation_prompt=generation)


def fastllm_rule(keys: dict[str, str], turns: list[str]) -> str:
    """fastllm's prompt for a conversation ending in a user turn."""
    out = keys["pre_prompt"]
    for q, a in zip(turns[0::2], turns[1::2]):
        out += keys["user_role"] + q + keys["bot_role"] + a + keys["history_sep"]
    return out + keys["user_role"] + turns[-1] + keys["bot_role"]


def derive_keys(template: Any, to_tokens: Callable[[str], str] = str) -> tuple[dict[str, str] | None, str]:
    """(pre_prompt, user_role, bot_role, history_sep) from a template's own renderings, and how well fastllm's
    rule reproduces the template: "exact" (checked on three turns), "gap" (exact for the current turn; each
    earlier reply loses the text the template puts before it), "inexact", or "none" (no keys found).
    `to_tokens` rewrites special-token text (to <FLM_FIX_TOKEN_n>) first, so no cut falls inside a token."""
    q1, a1, q2, a2, q3 = _MARKS
    try:
        one = to_tokens(_render(template, [q1], True))
        two = to_tokens(_render(template, [q1, a1, q2], True))
        three = to_tokens(_render(template, [q1, a1, q2, a2, q3], True))
    except CamelidError:
        return None, "none"
    if one.count(q1) != 1:
        return None, "none"
    head, bot = one.split(q1)
    if not two.startswith(head + q1 + bot) or two.count(q2) != 1 or two.count(a1) != 1:
        return None, "none"
    # Text between the generation prompt and the reply (Llama-2's and Vicuna's space before the answer) has
    # no place in fastllm's rule: the keys then fit the current turn, not the history, exactly.
    gap, rest = two[len(head + q1 + bot):].split(a1)
    middle, end = rest.split(q2)
    if end != bot:
        return None, "none"
    # head = pre + user_role and middle = history_sep + user_role: user_role is their longest common ending
    # that starts outside a token marker.
    n = 0
    while n < min(len(head), len(middle)) and head[len(head) - 1 - n] == middle[len(middle) - 1 - n]:
        n += 1
    while n and (_inside_marker(head, len(head) - n) or _inside_marker(middle, len(middle) - n)):
        n -= 1
    keys = {"pre_prompt": head[:len(head) - n], "user_role": head[len(head) - n:], "bot_role": bot,
            "history_sep": middle[:len(middle) - n]}
    if gap:
        return keys, "gap"
    return keys, "exact" if fastllm_rule(keys, [q1, a1, q2, a2, q3]) == three else "inexact"


def _inside_marker(text: str, cut: int) -> bool:
    return any(m.start() < cut < m.end() for m in _FLM_TOKEN.finditer(text))


def _to_flm_tokens(text: str, v: dict[str, Any]) -> str:
    """Special-token strings in template text -> <FLM_FIX_TOKEN_n> (fastllm would otherwise split them)."""
    specials = {v["tokens"][i]: i for i, t in enumerate(v["types"]) if t == CONTROL and i < len(v["tokens"])}
    for key in ("bos", "eos"):
        i = v.get(key)
        if isinstance(i, int) and 0 <= i < len(v["tokens"]):
            specials[v["tokens"][i]] = i
    specials = {s: i for s, i in specials.items() if s}
    if not specials:
        return text
    pattern = re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))
    return pattern.sub(lambda m: f"<FLM_FIX_TOKEN_{specials[m.group(0)]}>", text)


def prompt_keys(v: dict[str, Any], chat_template: str | None, template_for: TemplateFor | None) -> dict[str, str]:
    """All four prompt keys (fastllm falls back to a Llama-3 prompt for any that is missing), plus fastllm's
    `chat_template` (from the jinja `chat_template`) when the model's template is beyond its rule.
    `template_for(bos_token, eos_token)`: the model's template as an object that renders messages
    (`render_text`, `bos_token_text`), or None; the caller picks it (formats import no chat code)."""
    template = _model_template(v, template_for)
    keys, fit = derive_keys(template, lambda text: _to_flm_tokens(text, v)) if template is not None else (None, "none")
    if keys is None:
        bos = v.get("bos")
        plain = f"<FLM_FIX_TOKEN_{bos}>" if v.get("add_bos", True) and isinstance(bos, int) else ""
        keys = {"pre_prompt": plain, "user_role": "", "bot_role": "", "history_sep": ""}
    # fastllm's own jinja subset cannot parse many real templates (Meta's Llama-2 template stops it with
    # "Jinja Error: expression error" when a chat starts), so the template goes in only when the keys are wrong
    # beyond the current turn; a "gap" (a space before each earlier reply) stays a best effort, as fastllm's
    # own cookbook has it for Llama-2.
    if template is not None and fit in ("none", "inexact") and chat_template:
        keys["chat_template"] = fastllm_chat_template(chat_template, v)
    return keys


def fastllm_chat_template(source: str, v: dict[str, Any]) -> str:
    """The model's jinja template as fastllm can run it from a .flm: there it has no bos_token / eos_token
    variables (they come from tokenizer_config.json, which a .flm lacks), and a special token written as text
    would be split into pieces; both become <FLM_FIX_TOKEN_n>."""
    header = ""
    for key in ("bos", "eos"):
        i = v.get(key)
        if isinstance(i, int) and 0 <= i < len(v["tokens"]):
            header += "{%- set " + key + "_token = " + json.dumps(f"<FLM_FIX_TOKEN_{i}>") + " -%}"
    return header + _to_flm_tokens(source, v)


# ---- the way back -----------------------------------------------------------------------------------
def _fastllm_jinja(md: dict[str, str], pieces: list[str]) -> str | None:
    """fastllm's prompt rule as a Hugging Face chat template (token ids written as their pieces)."""
    if not all(k in md for k in ("pre_prompt", "user_role", "bot_role", "history_sep")):
        return None

    def text(key: str) -> str:
        s = _FLM_TOKEN.sub(lambda m: pieces[int(m.group(1))] if int(m.group(1)) < len(pieces) else m.group(0), md[key])
        return json.dumps(s)  # a JSON string is a valid jinja string literal

    return ("{{ " + text("pre_prompt") + " }}{% for message in messages %}{% if message['role'] == 'user' %}"
            "{{ " + text("user_role") + " + message['content'] + " + text("bot_role") + " }}"
            "{% elif message['role'] == 'assistant' %}{{ message['content'] + " + text("history_sep") + " }}"
            "{% endif %}{% endfor %}")


def rebuild_tokenizer(reader: Any, folder: Path) -> None:
    """tokenizer.model (SentencePiece BPE: pieces, scores, types) + tokenizer_config.json from a .flm vocabulary."""
    md = reader.metadata
    if md.get("tokenizer_byte_as_char") == "True" and "camelid_merges" in md and reader.vocab:
        return _rebuild_byte_level(reader, folder)
    if md.get("tokenizer_byte_as_char") == "True" or not reader.vocab:
        what = "has no vocabulary" if not reader.vocab else "holds a byte-level BPE vocabulary without its merges"
        raise CamelidError(f"{reader.path} {what}, so camelid cannot rebuild its tokenizer; pass --tokenizer PATH "
                           "(the model's tokenizer.json / tokenizer.model or its folder)")
    by_id = {tid: (raw, score) for raw, tid, score in reader.vocab}
    if sorted(by_id) != list(range(len(by_id))):
        raise CamelidError(f"{reader.path}: the vocabulary's ids are not 0..{len(by_id) - 1}; pass --tokenizer PATH")
    from sentencepiece import sentencepiece_model_pb2 as pb2
    cfg = reader.config
    proto = pb2.ModelProto()
    pieces = [by_id[i][0].decode("utf-8", errors="replace") for i in range(len(by_id))]
    unk = pieces.index("<unk>") if "<unk>" in pieces else -1
    controls = {i for i in (cfg.bos_token_id, *cfg.eos_ids) if isinstance(i, int) and 0 <= i < len(pieces)}
    for i, piece in enumerate(pieces):
        p = proto.pieces.add()
        p.piece, p.score = piece, by_id[i][1]
        p.type = (pb2.ModelProto.SentencePiece.UNKNOWN if i == unk else pb2.ModelProto.SentencePiece.CONTROL
                  if i in controls else pb2.ModelProto.SentencePiece.BYTE if _BYTE_PIECE.fullmatch(piece)
                  else pb2.ModelProto.SentencePiece.NORMAL)
    t = proto.trainer_spec
    t.model_type = pb2.TrainerSpec.BPE
    t.vocab_size = len(pieces)
    t.byte_fallback = any(_BYTE_PIECE.fullmatch(p) for p in pieces)
    t.unk_id = max(unk, 0)
    t.bos_id = cfg.bos_token_id if cfg.bos_token_id in controls else -1
    t.eos_id = cfg.eos_ids[0] if cfg.eos_ids and cfg.eos_ids[0] in controls else -1
    t.pad_id = -1
    n = proto.normalizer_spec
    n.name = "identity"
    n.add_dummy_prefix = md.get("tokenizer_add_dummy_prefix", "True").lower() == "true"
    n.remove_extra_whitespaces = md.get("tokenizer_remove_extra_whitespaces", "True").lower() == "true"
    n.escape_whitespaces = True
    (folder / "tokenizer.model").write_bytes(proto.SerializeToString())
    tc: dict[str, Any] = {"tokenizer_class": "LlamaTokenizer", "legacy": True,
                          "add_bos_token": md.get("camelid_add_bos_token", "True") == "True", "add_eos_token": False,
                          "bos_token": pieces[t.bos_id] if t.bos_id >= 0 else None,
                          "eos_token": pieces[t.eos_id] if t.eos_id >= 0 else None,
                          "unk_token": pieces[unk] if unk >= 0 else None, "pad_token": None,
                          "clean_up_tokenization_spaces": False}
    template = md.get("camelid_chat_template") or md.get("chat_template") or _fastllm_jinja(md, pieces)
    if template:
        tc["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")


def _rebuild_byte_level(reader: Any, folder: Path) -> None:
    """tokenizer.json + tokenizer_config.json from a byte-level .flm camelid wrote (merges and types in its keys)."""
    from ..gguf_vocab import write_hf_files
    md, cfg = reader.metadata, reader.config
    by_id = {tid: raw.decode("utf-8", errors="replace") for raw, tid, _ in reader.vocab}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(max(by_id) + 1)]
    try:
        gguf_like = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens,
                     "tokenizer.ggml.token_type": json.loads(md["camelid_token_types"])[:len(tokens)],
                     "tokenizer.ggml.merges": json.loads(md["camelid_merges"]),
                     "tokenizer.ggml.pre": md.get("camelid_tokenizer_pre"),
                     "tokenizer.ggml.add_bos_token": md.get("camelid_add_bos_token") == "True"}
    except ValueError as e:
        raise CamelidError(f"{reader.path}: its camelid tokenizer keys are damaged ({e}); pass --tokenizer PATH") from None
    if cfg.bos_token_id is not None:
        gguf_like["tokenizer.ggml.bos_token_id"] = cfg.bos_token_id
    if cfg.eos_ids:
        gguf_like["tokenizer.ggml.eos_token_id"] = cfg.eos_ids[0]
    write_hf_files(gguf_like, folder, chat_template=md.get("camelid_chat_template") or md.get("chat_template"))
