"""`camelid data prepare`: every reader on small files in its source's published format, the filters, the
mixture and split, the manifest, malformed records and atomic output, near-duplicate detection (checked
against brute-force Jaccard). ShareGPT's HTML cleaning is compared
with FastChat's own `clean_sharegpt` on the same records."""
from __future__ import annotations

import gzip
import json
import random
import re
from pathlib import Path

import pytest
from fastchat.data import clean_sharegpt as fastchat  # the peer: FastChat's ShareGPT cleaner (needs markdownify)

from camelid.cli import main
from camelid.data.filters import NearDuplicateFilter
from camelid.data.html import html_to_markdown

CODE_HTML = (
    '<div class="markdown prose w-full break-words dark:prose-invert light"><p>Here is how to sort a list in '
    '<code>Python</code>:</p><pre><div class="bg-black mb-4 rounded-md"><div class="flex items-center relative '
    'text-gray-200 bg-gray-800 px-4 py-2 text-xs font-sans"><span class="">python</span><button class="flex ml-auto '
    'gap-2"><svg stroke="currentColor" fill="none" viewBox="0 0 24 24"><path d="M16 4h2a2 2 0 0 1 2 2v14"></path>'
    '<rect x="8" y="2" width="8" height="4"></rect></svg>Copy code</button></div><div class="p-4 overflow-y-auto">'
    '<code class="!whitespace-pre hljs language-python">nums = [<span class="hljs-number">3</span>, '
    '<span class="hljs-number">1</span>, <span class="hljs-number">2</span>]\nnums.sort()\n'
    '<span class="hljs-built_in">print</span>(nums)\n</code></div></div></pre><p>The steps are:</p><ol><li><p>Make a '
    '<strong>list</strong>.</p></li><li><p>Call <em>sort</em> &amp; print it.</p></li></ol></div>'
)
LIST_HTML = ('<div class="markdown prose w-full break-words dark:prose-invert light"><p>Three ideas for a '
             'weekend:</p><ul><li>Go for a hike in the hills</li><li>Visit a <a href="https://example.org/m">museum'
             '</a></li><li>Cook a new recipe</li></ul><p>Have fun!</p></div>')


def run(*argv: str) -> int:
    return main(["data", "prepare", *argv])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def records(out: Path) -> list[dict]:
    return read_jsonl(out / "train.jsonl") + read_jsonl(out / "eval.jsonl")


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def write_json(path: Path, value) -> Path:
    path.write_text(json.dumps(value, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list, *, gz: bool = False) -> Path:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(text) if gz else text)
    return path


def alpaca_rows(n: int, prefix: str = "Write a short note about") -> list[dict]:
    topics = ["rivers", "mountains", "coffee", "bicycles", "libraries", "gardens", "trains", "bridges", "clocks",
              "violins", "lighthouses", "bees", "glaciers", "markets", "kites", "maps", "owls", "tides", "lanterns",
              "orchards"]
    return [{"instruction": f"{prefix} {topics[i % len(topics)]} number {i}.", "input": "",
             "output": f"This is a short English note about {topics[i % len(topics)]}, item {i}."} for i in range(n)]


def _lines(text: str) -> list[str]:
    """Markdown lines with layout choices (blank lines, bullet character) taken out."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line:
            out.append("- " + line[2:] if line.startswith("* ") else line)
    return out


@pytest.mark.parametrize("html", [CODE_HTML, LIST_HTML])
def test_html_to_markdown_matches_fastchat(html):
    ours = html_to_markdown(html)
    assert _lines(ours) == _lines(fastchat.html_to_markdown(html))
    assert "Copy code" not in ours and "<" not in ours


def test_sharegpt_cleaning_and_filters(tmp_path):
    rows = [
        {"id": "html1", "conversations": [{"from": "human", "value": "How do I sort a list in Python?"},
                                          {"from": "gpt", "value": CODE_HTML}]},
        # a text dump: Koala turned the button's leftover "\nCopy code\n" into a paragraph break
        {"id": "text1", "conversations": [
            {"from": "gpt", "value": "Hello! How can I help?"},  # leading reply: dropped, like FastChat
            {"from": "human", "value": "Show me hello world in C"},
            {"from": "gpt", "value": "Here it is:\n\nc\nCopy code\n#include <stdio.h>\nint main(){puts(\"hi\");}"},
            {"from": "human", "value": "Thanks!"}]},  # trailing query without a reply: dropped
        {"id": "teach", "conversations": [{"from": "human", "value": "Who made you?"},
                                          {"from": "gpt", "value": "I am ChatGPT, a model trained by OpenAI."}]},
        {"id": "limit", "conversations": [{"from": "human", "value": "Write a poem about the sea"},
                                          {"from": "gpt", "value": "Too many requests in 1 hour. Try again later."}]},
        # the same query as html1 once normalized (case, spaces, end punctuation): a duplicate
        {"id": "dup", "conversations": [{"from": "human", "value": "  how do I sort a LIST in python "},
                                        {"from": "gpt", "value": "Use sorted() or list.sort() on it."}]},
        {"id": "bad", "conversations": [{"from": "human", "value": "Tell me a joke about cats"},
                                        {"from": "human", "value": "please, a short one"},
                                        {"from": "gpt", "value": "Cats do not tell jokes."}]},
        {"id": "list", "conversations": [{"from": "human", "value": "Ideas for a weekend?"},
                                         {"from": "gpt", "value": LIST_HTML}]},
    ]
    src = write_json(tmp_path / "sg_html.json", rows)
    out = tmp_path / "out"
    assert run("--source", f"sharegpt:{src}", "--out", str(out), "--eval-fraction", "0") == 0
    got = {r["id"]: r for r in records(out)}
    assert set(got) == {"sharegpt:html1", "sharegpt:text1", "sharegpt:list"}
    for r in got.values():
        assert r["source"] == "sharegpt" and r["preferred"] is True
    # FastChat's cleaner on the same records gives the same dialogs (up to markdown layout)
    for cid in ("html1", "list"):
        ref, code = fastchat.clean_html_one_sample(json.loads(json.dumps(rows[[r["id"] for r in rows].index(cid)])))
        assert code == 0
        ours = got[f"sharegpt:{cid}"]["messages"]
        assert [m["role"] for m in ours] == ["user" if c["from"] == "human" else "assistant"
                                            for c in ref["conversations"]]
        assert [_lines(m["content"]) for m in ours] == [_lines(c["value"]) for c in ref["conversations"]]
    assert "```python\nnums = [3, 1, 2]\nnums.sort()\nprint(nums)\n```" in got["sharegpt:html1"]["messages"][1]["content"]
    text1 = got["sharegpt:text1"]["messages"]
    assert [m["role"] for m in text1] == ["user", "assistant"]
    assert text1[1]["content"] == "Here it is:\n\nc\n\n#include <stdio.h>\nint main(){puts(\"hi\");}"
    # FastChat drops the teacher mention and the misordered turns too
    assert fastchat.clean_html_one_sample(json.loads(json.dumps(rows[2])))[1] == 3  # blocked words
    assert fastchat.clean_html_one_sample(json.loads(json.dumps(rows[5])))[1] == 2  # wrong format
    m = manifest(out)["sources"]["sharegpt"]
    assert m["records"] == 7 and m["conversations"] == 7 and m["kept"] == 3 and m["malformed"] == 0
    assert m["dropped"] == {"turns": 1, "empty": 0, "too_short": 0, "too_long": 0, "error_reply": 1, "teacher": 1,
                            "language": 0, "duplicate": 1, "near_duplicate": 0}


def test_hc3_oig_alpaca(tmp_path):
    hc3 = write_jsonl(tmp_path / "open_qa.jsonl", [
        {"id": "7", "question": "Why is the sky blue?",
         "human_answers": ["Sunlight scatters off air molecules, and blue light scatters the most.",
                           "Rayleigh scattering favours short wavelengths like blue."],
         "chatgpt_answers": ["As a language model trained by OpenAI, I can say the sky is blue because of "
                             "Rayleigh scattering."], "source": "open_qa"},
        {"id": "8", "question": "What is the boiling point of water at sea level?",
         "human_answers": ["It boils at 100 degrees Celsius at sea level."],
         "chatgpt_answers": ["Water boils at 100 degrees Celsius (212 F) at standard pressure."], "source": "open_qa"},
    ])
    oig = tmp_path / "oig"
    oig.mkdir()
    write_jsonl(oig / "unified_chip2.jsonl", [
        {"text": "<human>: What is a good name for a cat?\n<bot>: Whiskers is a classic name for a cat.",
         "metadata": {"source": "unified_chip2"}},
    ])
    write_jsonl(oig / "unified_basic.jsonl", [
        {"text": "Background: Paris is the capital of France.\n<human>: What is the capital of France?\n"
                 "<bot>: The capital of France is Paris.\n<human>: And its river?\n<bot>: The Seine flows "
                 "through Paris."},
    ])
    alpaca = tmp_path / "alpaca_data.json"  # saved with a byte-order mark, as Windows editors do
    alpaca.write_bytes(b"\xef\xbb\xbf" + json.dumps([
        {"instruction": "Rewrite the sentence in the past tense.", "input": "She walks to school.",
         "output": "She walked to school."},
        {"instruction": "Name three primary colors.", "input": "", "output": "Red, blue and yellow."},
    ], indent=2).encode())
    out = tmp_path / "out"
    assert run("--source", f"hc3:{hc3}", "--source", f"oig:{oig}", "--source", f"alpaca:{alpaca}",
               "--out", str(out), "--eval-fraction", "0") == 0
    got = {r["id"]: r["messages"] for r in records(out)}
    # one conversation per answer; the same question is no duplicate within its record; OpenAI mention dropped
    assert {k for k in got if k.startswith("hc3:")} == {"hc3:7:human:0", "hc3:7:human:1", "hc3:8:human:0",
                                                        "hc3:8:chatgpt:0"}
    assert got["hc3:7:human:1"] == [
        {"role": "user", "content": "Why is the sky blue?"},
        {"role": "assistant", "content": "Rayleigh scattering favours short wavelengths like blue."}]
    assert got["oig:unified_basic:1"] == [
        {"role": "user", "content": "Background: Paris is the capital of France.\n\nWhat is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
        {"role": "user", "content": "And its river?"},
        {"role": "assistant", "content": "The Seine flows through Paris."}]
    assert got["oig:unified_chip2:1"][1]["content"] == "Whiskers is a classic name for a cat."
    assert got["alpaca:alpaca_data:0"][0]["content"] == "Rewrite the sentence in the past tense.\n\nShe walks to school."
    assert got["alpaca:alpaca_data:1"] == [{"role": "user", "content": "Name three primary colors."},
                                           {"role": "assistant", "content": "Red, blue and yellow."}]
    m = manifest(out)
    assert m["sources"]["hc3"]["records"] == 2 and m["sources"]["hc3"]["conversations"] == 5
    assert m["sources"]["hc3"]["dropped"]["teacher"] == 1
    assert len(m["sources"]["oig"]["files"]) == 2 and m["sources"]["oig"]["kept"] == 2
    assert m["totals"]["kept"] == 4 + 2 + 2 == m["totals"]["train"]


HH = [
    {"chosen": "\n\nHuman: What can I cook with eggs and spinach?\n\nAssistant: An omelette: whisk the eggs, "
               "wilt the spinach, fold them together.\n\nHuman: How long does it take?\n\nAssistant: About ten minutes.",
     "rejected": "\n\nHuman: What can I cook with eggs and spinach?\n\nAssistant: An omelette: whisk the eggs, "
                 "wilt the spinach, fold them together.\n\nHuman: How long does it take?\n\nAssistant: No idea."},
    {"chosen": "\n\nHuman: How do I keep basil fresh?\n\nAssistant: Put the stems in a glass of water on the counter.",
     "rejected": "\n\nHuman: How do I keep basil fresh?\n\nAssistant: Freeze it in the freezer overnight, whole."},
]


def test_hh_gz_with_and_without_hindsight(tmp_path):
    src = write_jsonl(tmp_path / "train.jsonl.gz", HH, gz=True)
    plain, hind = tmp_path / "plain", tmp_path / "hind"
    assert run("--source", f"hh:{src}", "--out", str(plain), "--eval-fraction", "0") == 0
    assert run("--source", f"hh:{src}", "--out", str(hind), "--hindsight", "--eval-fraction", "0.5",
               "--seed", "3") == 0
    assert sorted(r["id"] for r in records(plain)) == ["hh:train:1", "hh:train:2"]
    assert all(r["preferred"] for r in records(plain))
    got = {r["id"]: r for r in records(hind)}
    assert set(got) == {"hh:train:1", "hh:train:1:rejected", "hh:train:2", "hh:train:2:rejected"}
    assert got["hh:train:1"]["messages"][3] == {"role": "assistant", "content": "About ten minutes."}
    rej = got["hh:train:1:rejected"]
    assert rej["preferred"] is False
    # Koala's marker after the query of the reply that differs, not after the shared first turn
    assert [m["content"] for m in rej["messages"]] == [
        "What can I cook with eggs and spinach?",
        "An omelette: whisk the eggs, wilt the spinach, fold them together.",
        "How long does it take? An Unhelpful Answer:", "No idea."]
    # both sides of a comparison land in the same split
    train_ids = {r["id"] for r in read_jsonl(hind / "train.jsonl")}
    for base in ("hh:train:1", "hh:train:2"):
        assert (base in train_ids) == (base + ":rejected" in train_ids)
    m = manifest(hind)["sources"]["hh"]
    assert m["conversations"] == 4 and m["kept"] == 4 and m["kept_rejected"] == 2


def test_webgpt_and_summarize(tmp_path):
    q = {"dataset": "eli5", "id": "q1", "full_text": "Why do cats purr?"}
    webgpt = write_jsonl(tmp_path / "comparisons.jsonl", [
        {"question": q, "quotes_0": {"title": ["Purring (en.wikipedia.org)"], "extract": ["Cats purr when content."]},
         "answer_0": "Cats purr mostly when they are content [1].", "tokens_0": [], "score_0": -1.0,
         "quotes_1": {"title": [], "extract": []}, "answer_1": "Cats purr by vibrating their larynx muscles.",
         "tokens_1": [], "score_1": 1.0},
        {"question": {"dataset": "eli5", "id": "q2", "full_text": "Why is the ocean salty?"},
         "quotes_0": {"title": [], "extract": []}, "answer_0": "Rivers carry dissolved minerals into it.",
         "score_0": 0.0, "quotes_1": {"title": [], "extract": []}, "answer_1": "Because of salt.", "score_1": 0.0},
        # OpenAI's own file keeps the two sides as a pair
        [{"question": {"id": "q3", "full_text": "How do vaccines work?"}, "quotes": [], "score": 0.5,
          "answer": "They train the immune system to recognise a pathogen."},
         {"question": {"id": "q3", "full_text": "How do vaccines work?"}, "quotes": [], "score": -0.5,
          "answer": "They are injections."}],
    ])
    summarize = write_jsonl(tmp_path / "batch3.json", [
        {"info": {"id": "t3_abc", "post": "I moved to a new city and I do not know anyone. How do I make friends?",
                  "title": "Making friends after moving", "subreddit": "relationships"},
         "summaries": [{"text": " Moved away, lonely.", "policy": "ref"},
                       {"text": " New in town and want advice on making friends.", "policy": "sup2"}],
         "choice": 1, "worker": "w1", "batch": "batch3", "split": "train"},
    ])
    out = tmp_path / "out"
    assert run("--source", f"webgpt:{webgpt}", "--source", f"summarize:{summarize}", "--out", str(out),
               "--hindsight", "--eval-fraction", "0") == 0
    got = {r["id"]: r for r in records(out)}
    assert set(got) == {"webgpt:comparisons:1", "webgpt:comparisons:1:rejected", "webgpt:comparisons:3",
                        "webgpt:comparisons:3:rejected", "summarize:batch3:1", "summarize:batch3:1:rejected"}
    best = got["webgpt:comparisons:1"]["messages"]
    assert best == [{"role": "user", "content": "Why do cats purr?"},
                    {"role": "assistant", "content": "Cats purr by vibrating their larynx muscles."}]
    worse = got["webgpt:comparisons:1:rejected"]["messages"]
    assert worse[0]["content"].startswith("Why do cats purr?\n\n")
    assert "[1] Purring (en.wikipedia.org): Cats purr when content." in worse[0]["content"]
    assert worse[0]["content"].endswith(" An Unhelpful Answer:")
    assert got["webgpt:comparisons:3"]["messages"][1]["content"].startswith("They train")
    s = got["summarize:batch3:1"]["messages"]
    assert "Title: Making friends after moving" in s[0]["content"] and "How do I make friends?" in s[0]["content"]
    assert s[1]["content"] == "New in town and want advice on making friends."
    assert got["summarize:batch3:1:rejected"]["messages"][1]["content"] == "Moved away, lonely."
    m = manifest(out)["sources"]
    assert m["webgpt"]["records"] == 3 and m["webgpt"]["skipped"] == {"tie": 1} and m["webgpt"]["kept"] == 4


def test_language_and_length_filters(tmp_path):
    rows = alpaca_rows(3) + [
        {"instruction": "Quelle est la capitale de la France et pourquoi est-elle si importante ?", "input": "",
         "output": "La capitale de la France est Paris, une ville importante pour son histoire et sa culture."},
        {"instruction": "请介绍一下长城的历史，以及它为什么这么有名。", "input": "",
         "output": "长城是中国古代修建的防御工程，已有两千多年的历史，是世界上最著名的建筑之一。"},
        {"instruction": "Hi", "input": "", "output": "Hello"},
        {"instruction": "Write a long story.", "input": "", "output": "Once upon a time " * 40},
    ]
    src = write_json(tmp_path / "mixed.json", rows)
    out, anyl = tmp_path / "out", tmp_path / "any"
    assert run("--source", f"alpaca:{src}", "--out", str(out), "--max-chars", "400", "--eval-fraction", "0") == 0
    assert sorted(r["id"] for r in records(out)) == ["alpaca:mixed:0", "alpaca:mixed:1", "alpaca:mixed:2"]
    d = manifest(out)["sources"]["alpaca"]["dropped"]
    assert (d["language"], d["too_short"], d["too_long"]) == (2, 1, 1)
    assert run("--source", f"alpaca:{src}", "--out", str(anyl), "--language", "any", "--eval-fraction", "0") == 0
    assert len(records(anyl)) == 6  # French and Chinese kept; "Hi"/"Hello" is still too short


def test_mixture_split_reproducible(tmp_path):
    alpaca = write_json(tmp_path / "alpaca.json", alpaca_rows(60))
    sg_rows = [{"id": f"c{i}", "conversations": [{"from": "human", "value": f"Tell me a fact about the number {i}."},
                                                 {"from": "gpt", "value": f"The number {i} is an integer."}]}
               for i in range(40)]
    sharegpt = write_json(tmp_path / "sg.json", sg_rows)
    common = ["--source", f"alpaca:{alpaca}", "--source", f"sharegpt:{sharegpt}", "--eval-fraction", "0.25"]

    def prepared(name: str, *extra: str) -> Path:
        out = tmp_path / name
        assert run(*common, "--out", str(out), *extra) == 0
        return out

    a = prepared("a", "--mix", "sharegpt=1.0,alpaca=0.5", "--seed", "1")
    b = prepared("b", "--mix", "sharegpt=1.0,alpaca=0.5", "--seed", "1")
    c = prepared("c", "--mix", "sharegpt=1.0,alpaca=0.5", "--seed", "2")
    for name in ("train.jsonl", "eval.jsonl", "manifest.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "train.jsonl").read_bytes() != (c / "train.jsonl").read_bytes()
    m = manifest(a)["sources"]
    n_train_alpaca = 60 - m["alpaca"]["eval"]
    assert m["alpaca"]["train"] == round(0.5 * n_train_alpaca)
    assert m["sharegpt"]["train"] + m["sharegpt"]["eval"] == 40
    assert 0 < m["alpaca"]["eval"] < 30 and 0 < m["sharegpt"]["eval"] < 20
    # no conversation in both splits; eval is not resampled
    train_ids = {r["id"] for r in read_jsonl(a / "train.jsonl")}
    eval_ids = {r["id"] for r in read_jsonl(a / "eval.jsonl")}
    assert not train_ids & eval_ids and len(eval_ids) == m["alpaca"]["eval"] + m["sharegpt"]["eval"]
    # oversampling repeats with a copy suffix: 2.5 = every record twice plus half of them a third time
    o = prepared("o", "--mix", "alpaca=2.5,sharegpt=0", "--seed", "1")
    mo = manifest(o)["sources"]
    assert mo["sharegpt"]["train"] == mo["sharegpt"]["eval"] == 0
    assert mo["alpaca"]["eval"] == m["alpaca"]["eval"]
    assert mo["alpaca"]["train"] == 2 * n_train_alpaca + round(0.5 * n_train_alpaca)
    ids = [r["id"] for r in read_jsonl(o / "train.jsonl")]
    assert len(ids) == len(set(ids)) and sum(i.endswith("#3") for i in ids) == round(0.5 * n_train_alpaca)
    # the split follows the conversation id, not the file order
    r = tmp_path / "sg_reversed.json"
    write_json(r, sg_rows[::-1])
    rev = tmp_path / "rev"
    assert run("--source", f"sharegpt:{r}", "--out", str(rev), "--eval-fraction", "0.25", "--seed", "1") == 0
    assert {x["id"] for x in read_jsonl(rev / "eval.jsonl")} == {i for i in eval_ids if i.startswith("sharegpt:")}


def test_malformed_records(tmp_path, capsys):
    hh = tmp_path / "hh.jsonl"
    lines = [json.dumps(HH[0]), json.dumps(HH[1]), '{"chosen": "\\n\\nHuman: hi", ', json.dumps({"chosen": HH[1]["chosen"]})]
    hh.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert run("--source", f"hh:{hh}", "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert f"{hh}:3: malformed hh record: not valid JSON" in err and "--skip-bad" in err
    assert err.startswith("camelid: error: ") and err.count("\n") == 1
    assert not out.exists() and list(tmp_path.iterdir()) == [hh]  # nothing half-written, no temporary left

    alpaca = write_json(tmp_path / "alpaca.json", [alpaca_rows(1)[0], {"instruction": "No output here"}])
    assert run("--source", f"alpaca:{alpaca}", "--out", str(out)) == 2
    assert f"{alpaca}: record index 1: malformed alpaca record: missing field 'output'" in capsys.readouterr().err

    assert run("--source", f"hh:{hh}", "--source", f"alpaca:{alpaca}", "--out", str(out), "--skip-bad",
               "--eval-fraction", "0") == 0
    m = manifest(out)
    assert m["sources"]["hh"]["records"] == 4 and m["sources"]["hh"]["malformed"] == 2
    assert m["sources"]["hh"]["kept"] == 2 and m["sources"]["alpaca"]["malformed"] == 1
    assert m["totals"]["malformed"] == 3 and m["totals"]["train"] == 3
    assert any(f"{hh}:4: malformed hh record: missing field 'rejected'" in e for e in m["malformed_examples"])

    # an existing output is never replaced without --force; with it, it is replaced whole
    (out / "stale.txt").write_text("old")
    assert run("--source", f"alpaca:{alpaca}", "--out", str(out), "--skip-bad") == 2
    assert "already exists" in capsys.readouterr().err and (out / "stale.txt").exists()
    assert run("--source", f"hh:{hh}", "--out", str(out), "--force") == 2  # fails half-way: old output stays
    assert f"{hh}:3: malformed" in capsys.readouterr().err and (out / "stale.txt").exists()
    assert run("--source", f"alpaca:{alpaca}", "--out", str(out), "--skip-bad", "--force") == 0
    assert sorted(p.name for p in out.iterdir()) == ["eval.jsonl", "manifest.json", "train.jsonl"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alpaca.json", "hh.jsonl", "out"]


def test_bad_arguments(tmp_path, capsys):
    src = write_json(tmp_path / "a.json", alpaca_rows(2))
    out = str(tmp_path / "out")
    assert run("--source", f"vicuna:{src}", "--out", out) == 2
    assert "unknown kind 'vicuna'" in capsys.readouterr().err
    assert run("--source", f"alpaca:{src}", "--out", out, "--mix", "sharegpt=1") == 2
    assert "not among the --source kinds" in capsys.readouterr().err
    assert run("--source", f"alpaca:{tmp_path / 'missing.json'}", "--out", out) == 2
    assert "no such file" in capsys.readouterr().err
    truncated = tmp_path / "cut.json"
    truncated.write_text(json.dumps(alpaca_rows(3))[:-40])
    assert run("--source", f"alpaca:{truncated}", "--out", out) == 2
    assert f"{truncated}: invalid JSON after record index 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --- near-duplicate user queries (--near-dup) ----------------------------------------------------------------

VOCAB = ("time person year way day thing man world life hand part child eye woman place work week case point "
         "government company number group problem fact river garden music train bridge market island forest "
         "letter window kitchen engine planet winter summer morning evening story paper money water light "
         "explain describe compare write list show give make find keep build plan cook paint count measure "
         "quick slow bright dark quiet loud early late simple strange famous ancient modern gentle heavy").split()


def text_of(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(VOCAB) for _ in range(n)]


def jaccard_5gram(a: str, b: str) -> float:
    """The reference: word 5-grams (or one gram of the whole text when shorter), exact sets."""
    def grams(t: str) -> set[tuple[str, ...]]:
        w = re.findall(r"[a-z0-9]+", t.lower())
        n = min(5, len(w))
        return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}
    x, y = grams(a), grams(b)
    return len(x & y) / len(x | y)


def edit(rng: random.Random, words: list[str], k: int) -> list[str]:
    """k random word substitutions, insertions or deletions."""
    w = list(words)
    for _ in range(k):
        op, i = rng.randrange(3), rng.randrange(len(w))
        if op == 0:
            w[i] = rng.choice(VOCAB)
        elif op == 1:
            w.insert(i, rng.choice(VOCAB))
        elif len(w) > 2:
            del w[i]
    return w


def convs(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}, {"role": "assistant", "content": "An answer."}]


def test_near_duplicate_paraphrases(tmp_path):
    rng = random.Random(7)
    base = text_of(rng, 70)
    one = list(base)
    one[35] = "lighthouse"          # one word: 61 of 71 shingles shared, J = 0.86
    two = list(base)
    two[20:22] = ["owl", "kite"]    # two neighbouring words: J = 60 / 72 = 0.83
    shouted = " ".join(base[:30]).upper() + ", " + " ".join(base[30:]) + "!!"  # case and punctuation: J = 1
    shuffled = list(base)
    random.Random(1).shuffle(shuffled)  # the same words in another order: not a near duplicate
    texts = [" ".join(base) + "?", " ".join(one), " ".join(two), shouted, " ".join(shuffled),
             " ".join(text_of(rng, 70)), "Name three primary colors.", "Name three primary colours."]
    assert [round(jaccard_5gram(texts[0], t), 2) for t in texts] == [1.0, 0.86, 0.83, 1.0, 0.0, 0.0, 0.0, 0.0]
    src = write_json(tmp_path / "a.json", [{"instruction": t, "input": "", "output": f"Answer {i}."}
                                           for i, t in enumerate(texts)])

    def kept(*extra: str) -> tuple[list[int], dict]:
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        assert run("--source", f"alpaca:{src}", "--out", str(out), "--language", "any", "--eval-fraction", "0",
                   *extra) == 0
        return sorted(int(r["id"].rsplit(":", 1)[1]) for r in records(out)), manifest(out)

    ids, m = kept()
    assert ids == list(range(8)) and m["filters"]["near_duplicate"] == 0 and m["settings"]["near_dup"] is None
    ids, m = kept("--near-dup", "0.8")
    assert ids == [0, 4, 5, 6, 7]   # short texts are one gram: "colors" vs "colours" differ
    assert m["filters"]["near_duplicate"] == 3 == m["sources"]["alpaca"]["dropped"]["near_duplicate"]
    assert m["filters"]["duplicate"] == 0 and m["settings"]["near_dup"] == 0.8
    ids, m = kept("--near-dup", "0.95")
    assert ids == [0, 1, 2, 4, 5, 6, 7] and m["filters"]["near_duplicate"] == 1
    ids, m = kept("--near-dup", "0.3")  # unrelated texts stay even at a low threshold
    assert ids == [0, 4, 5, 6, 7]


@pytest.mark.parametrize("threshold", [0.6, 0.8])
def test_near_duplicate_matches_brute_force(threshold):
    rng = random.Random(threshold)
    bases = [text_of(rng, rng.randrange(60, 200)) for _ in range(50)] + [text_of(rng, rng.randrange(2, 12))
                                                                         for _ in range(10)]
    texts = [" ".join(b) for b in bases]
    for _ in range(130):  # variants: from a copy to heavily edited, a few very short texts
        b = rng.choice(bases)
        texts.append(" ".join(edit(rng, b, rng.choice([0, 1, 1, 1, 2, 2, 3, 5, 8, 15]))))
    texts += [" ".join(text_of(rng, rng.randrange(1, 4))) for _ in range(10)]
    rng.shuffle(texts)

    def decisions() -> list[bool]:
        f = NearDuplicateFilter(threshold)
        return [f(convs(t), group=f"g{i}") == "near_duplicate" for i, t in enumerate(texts)]

    dropped = decisions()
    assert dropped == decisions()  # deterministic
    kept: list[str] = []
    well_above, found, above, found_above = 0, 0, 0, 0
    for text, drop in zip(texts, dropped):
        best = max((jaccard_5gram(text, k) for k in kept), default=0.0)
        if drop:
            assert best >= threshold, (text, best)  # never a false drop
        else:
            kept.append(text)
        above += best >= threshold
        found_above += drop
        if best >= threshold + 0.1:
            well_above += 1
            found += drop
    print(f"threshold {threshold}: {sum(dropped)} dropped, {found} of {well_above} well above and "
          f"{found_above} of {above} above the threshold found")
    assert well_above >= 25 and found >= 0.95 * well_above, (found, well_above)
    assert found_above >= 0.9 * above, (found_above, above)
    assert 0 < sum(dropped) < len(texts)


def test_near_duplicate_scope_and_groups(tmp_path):
    rng = random.Random(3)
    words = text_of(rng, 60)
    q, para = " ".join(words), " ".join(words[:30] + ["lantern"] + words[31:])
    alpaca = write_json(tmp_path / "a.json", [{"instruction": q, "input": "", "output": "Alpaca's answer."}])
    sharegpt = write_json(tmp_path / "s.json", [{"id": "s1", "conversations": [
        {"from": "human", "value": para}, {"from": "gpt", "value": "ShareGPT's answer."}]}])
    # HC3: the answers to one question share it on purpose; a paraphrased question in another record does not
    hc3 = write_jsonl(tmp_path / "h.jsonl", [
        {"id": "1", "question": q, "human_answers": ["First answer here.", "Second answer here."],
         "chatgpt_answers": [], "source": "open_qa"},
        {"id": "2", "question": para, "human_answers": ["Third answer here."], "chatgpt_answers": []}])
    common = ["--source", f"alpaca:{alpaca}", "--source", f"sharegpt:{sharegpt}", "--source", f"hc3:{hc3}",
              "--language", "any", "--eval-fraction", "0", "--near-dup", "0.8"]
    per_source, everywhere = tmp_path / "per_source", tmp_path / "global"
    assert run(*common, "--out", str(per_source)) == 0
    assert sorted(r["id"] for r in records(per_source)) == [
        "alpaca:a:0", "hc3:1:human:0", "hc3:1:human:1", "sharegpt:s1"]
    m = manifest(per_source)
    assert m["sources"]["hc3"]["dropped"]["near_duplicate"] == 1 and m["filters"]["near_duplicate"] == 1
    assert run(*common, "--out", str(everywhere), "--dedup", "global") == 0
    # the first copy wins: the alpaca record is read first; hc3:1 is an exact (query) duplicate of it
    assert sorted(r["id"] for r in records(everywhere)) == ["alpaca:a:0"]
    m = manifest(everywhere)
    # hc3:2 repeats the query of the dropped ShareGPT conversation exactly: counted as a duplicate
    assert m["filters"]["near_duplicate"] == 1 and m["filters"]["duplicate"] == 3
    assert m["sources"]["sharegpt"]["dropped"]["near_duplicate"] == 1


def test_near_duplicate_bad_threshold(tmp_path, capsys):
    src = write_json(tmp_path / "a.json", alpaca_rows(2))
    out = str(tmp_path / "out")
    for bad in ("0", "1.5", "-0.2", "nan"):
        assert run("--source", f"alpaca:{src}", "--out", out, "--near-dup", bad) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"camelid: error: --near-dup {float(bad)}: expected") and err.count("\n") == 1
    assert run("--source", f"alpaca:{src}", "--out", out, "--near-dup", "0.8", "--dedup", "none") == 2
    assert "--dedup source or global" in capsys.readouterr().err
    with pytest.raises(ValueError):
        NearDuplicateFilter(0.0)
    assert run("--source", f"alpaca:{src}", "--out", out, "--near-dup", "1") == 0
    assert not (tmp_path / "out" / ".spool.jsonl").exists() and len(records(tmp_path / "out")) == 2


def golden_sources(tmp: Path) -> list[str]:
    """Sources that take every branch of the pipeline: HTML cleaning, every filter, exact and near duplicates,
    id collisions, malformed records, hindsight pairs, fractional and repeated mixture weights."""
    rng = random.Random(11)
    topics = ["rivers", "coffee", "owls", "tides", "maps", "kites", "bees", "clocks"]
    sg = [{"id": "html", "conversations": [{"from": "human", "value": "How do I sort a list in Python?"},
                                          {"from": "gpt", "value": CODE_HTML}]},
          {"id": "list", "conversations": [{"from": "human", "value": "Ideas for a weekend?"},
                                          {"from": "gpt", "value": LIST_HTML}]},
          {"id": "teach", "conversations": [{"from": "human", "value": "Who made you?"},
                                           {"from": "gpt", "value": "I am ChatGPT, a model trained by OpenAI."}]},
          {"id": "short", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}]
    for i in range(30):
        words = [rng.choice(topics) for _ in range(12)]
        sg.append({"id": f"c{i % 25}", "conversations": [  # ids c0..c4 repeat: kept apart as ~2
            {"from": "human", "value": f"Tell me about {' '.join(words)} please"},
            {"from": "gpt", "value": f"Here is a note on {words[0]} and {words[1]}, number {i}."}]})
    long = [rng.choice(topics) for _ in range(40)]
    for i in range(3):  # one word changed in a 40-word query: near duplicates of the first
        words = long[:10 + i] + ["lanterns"] + long[11 + i:] if i else long
        sg.append({"id": f"near{i}", "conversations": [{"from": "human", "value": " ".join(words)},
                                                      {"from": "gpt", "value": f"A long answer, take {i}."}]})
    alpaca = alpaca_rows(40) + alpaca_rows(3, prefix="write a short NOTE about") + [{"instruction": "no output"}]
    hh_lines = [json.dumps(r) for r in HH * 3] + ['{"chosen": "broken', json.dumps({"chosen": HH[0]["chosen"]})]
    (tmp / "hh.jsonl").write_text("\n".join(hh_lines) + "\n")
    return [f"sharegpt:{write_json(tmp / 'sg.json', sg)}", f"alpaca:{write_json(tmp / 'alpaca.json', alpaca)}",
            f"hh:{tmp / 'hh.jsonl'}"]


def test_prepare_output_bytes_are_unchanged(tmp_path):
    """The pipeline's output, byte for byte, as the implementation before its split into steps wrote it
    (sha256 recorded from that version); the manifest with its source paths reduced to file names."""
    import hashlib
    sources = golden_sources(tmp_path)
    out = tmp_path / "out"
    argv = [a for s in sources for a in ("--source", s)]
    assert run(*argv, "--out", str(out), "--mix", "sharegpt=0.5,alpaca=1.5,hh=2", "--eval-fraction", "0.25",
               "--seed", "5", "--hindsight", "--near-dup", "0.7", "--dedup", "global", "--skip-bad") == 0
    m = manifest(out)
    for s in m["sources"].values():
        s["files"] = [Path(f).name for f in s["files"]]
    m["malformed_examples"] = [e.replace(str(tmp_path), "") for e in m["malformed_examples"]]
    digest = {name: hashlib.sha256((out / name).read_bytes()).hexdigest()[:16] for name in ("train.jsonl", "eval.jsonl")}
    digest["manifest"] = hashlib.sha256(json.dumps(m, indent=2, ensure_ascii=False).encode()).hexdigest()[:16]
    assert m["totals"]["malformed"] == 3 and all(m["filters"][k] for k in ("duplicate", "near_duplicate", "teacher", "too_short"))
    assert digest == GOLDEN_PREPARE


GOLDEN_PREPARE = {'train.jsonl': 'e9cd58bb2dbe5c77', 'eval.jsonl': 'f0131f4fd00d75d0', 'manifest': '4cc0d95ff30d1678'}
