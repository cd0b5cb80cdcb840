"""ShareGPT's old dumps hold ChatGPT's rendered HTML; turn it into the markdown-ish text a model should learn.

The rules follow what FastChat's `clean_sharegpt` and Koala's pipeline did to the same dumps (learned from
their behaviour, written here with the standard library's HTML parser): blocks become paragraphs, code blocks
become fenced ``` blocks with their language, the "Copy code" button and the "N / N" regenerate counter go.
"""
from __future__ import annotations

import re
from html.parser import HTMLParser

# Inline tags and the Markdown mark written where each opens and where it closes.
INLINE_MARKS = {"strong": "**", "b": "**", "em": "*", "i": "*", "code": "`"}

# A message is HTML when it starts with a block element: plain-text dumps may quote HTML inside a question,
# and those must stay untouched.
_HTML_START = re.compile(r"^\s*<(div|p|pre|ol|ul|h[1-6]|table|blockquote)\b[^>]*>", re.IGNORECASE)
_BULLET = re.compile(r"(- |\d+\. )$")
_SKIP = {"script", "style", "svg", "button", "head", "title"}
_BLOCKS = {"p", "div", "ul", "ol", "table", "blockquote", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "section"}
_FENCED = re.compile(r"(?<=\n)(```[^\n]*\n.*?\n```)(?=\n|$)", re.DOTALL)

# Noise the ChatGPT page put into the text (FastChat removes the same): a regenerate counter "2 / 2" at the
# very start, "Copy code" left by the code block's button, "Copy" + "N chars / N words" under a reply.
REGENERATE_COUNTER = re.compile(r"^\s*\d+ / \d+(?=[^\d \t]|$)")
COPY_CHARS = re.compile(r"Copy\d+ chars / \d+ words")
EMPTY_CODE_BLOCK = re.compile(r"```[^\n`]*Copy code\s*```")


def looks_like_html(text: str) -> bool:
    return bool(_HTML_START.match(text))


class _Markdown(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skip = 0            # depth inside elements whose text is page chrome
        self.pre = 0             # 1 inside <pre>: text is kept verbatim
        self.code_lang = ""
        self.code_buf: list[str] = []
        self.pre_other: list[str] = []  # text in <pre> outside <code>: the block's header or plain preformatted text
        self.in_code = 0
        self.lists: list[list] = []  # stack of [kind, counter]
        self.href: list[str | None] = []
        self.link_start: list[int] = []
        self.quote_start: list[int] = []
        self.row: list[str] | None = None
        self.cell: list[str] | None = None
        self.table_rows = 0

    # -- helpers
    def _emit(self, s: str) -> None:
        if self.cell is not None:
            self.cell.append(s)
        else:
            self.out.append(s)

    def _block_break(self) -> None:
        if self.cell is not None or (self.out and _BULLET.search(self.out[-1])):
            return  # no break inside a table cell or right after a list bullet ("<li><p>")
        self.out.append("\n" if self.lists else "\n\n")

    # -- parser callbacks
    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag in _SKIP:
            self.skip += 1
            return
        if self.skip:
            return
        if self.pre:
            if tag == "code":
                self.in_code += 1
                m = re.search(r"language-([\w+#.-]+)", a.get("class") or "")
                if m:
                    self.code_lang = m.group(1)
            elif tag == "br":
                self.code_buf.append("\n")
            return
        if tag == "pre":
            self.pre = 1
            self.code_lang, self.code_buf, self.pre_other, self.in_code = "", [], [], 0
        elif tag == "br":
            self._emit("\n")
        elif tag in ("ul", "ol"):
            self.lists.append([tag, 0])
            self._block_break()
        elif tag == "li":
            depth = max(len(self.lists) - 1, 0)
            if self.lists and self.lists[-1][0] == "ol":
                self.lists[-1][1] += 1
                bullet = f"{self.lists[-1][1]}. "
            else:
                bullet = "- "
            newline = "" if self.out and self.out[-1].endswith("\n") else "\n"
            self.out.append(newline + "  " * depth + bullet)
        elif tag in ("h1", "h2", "h3", "h4", "h5", "h6"):
            self._block_break()
            self._emit("#" * int(tag[1]) + " ")
        elif tag in INLINE_MARKS:
            self._emit(INLINE_MARKS[tag])
        elif tag == "a":
            self.href.append(a.get("href"))
            self.link_start.append(len(self.out))
        elif tag == "blockquote":
            self._block_break()
            self.quote_start.append(len(self.out))
        elif tag == "tr":
            self.row = []
        elif tag in ("td", "th"):
            self.cell = []
        elif tag == "hr":
            self._block_break()
            self._emit("---")
            self._block_break()
        elif tag in _BLOCKS:
            self._block_break()

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP:
            return
        self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP:
            self.skip = max(self.skip - 1, 0)
            return
        if self.skip:
            return
        if self.pre:
            if tag == "code":
                self.in_code = max(self.in_code - 1, 0)
            elif tag == "pre":
                self.pre = 0
                header = "".join(self.pre_other).replace("Copy code", "").strip()
                if self.code_buf:
                    code = "".join(self.code_buf)
                    if not self.code_lang and re.fullmatch(r"[\w+#.-]{1,20}", header):
                        self.code_lang = header  # ChatGPT's header label, e.g. "python"
                else:
                    code = "".join(self.pre_other)
                code = code.strip("\n")
                self.out.append(f"\n\n```{self.code_lang}\n{code}\n```\n\n")
            return
        if tag in ("ul", "ol"):
            if self.lists:
                self.lists.pop()
            self._block_break()
        elif tag in INLINE_MARKS:
            self._emit(INLINE_MARKS[tag])
        elif tag == "a" and self.href:
            href, start = self.href.pop(), self.link_start.pop()
            text = "".join(self.out[start:]).strip()
            if href and not href.startswith("#") and href != text:
                del self.out[start:]
                self.out.append(f"[{text}]({href})")
        elif tag == "blockquote" and self.quote_start:
            start = self.quote_start.pop()
            body = re.sub(r"\n{3,}", "\n\n", "".join(self.out[start:]).strip())
            del self.out[start:]
            self.out.append("\n".join(("> " + line).rstrip() for line in body.split("\n")))
            self._block_break()
        elif tag in ("td", "th") and self.cell is not None:
            if self.row is not None:
                self.row.append(" ".join("".join(self.cell).split()))
            self.cell = None
        elif tag == "tr" and self.row is not None:
            self.out.append("\n| " + " | ".join(self.row) + " |")
            if self.table_rows == 0:
                self.out.append("\n|" + "---|" * len(self.row))
            self.table_rows += 1
            self.row = None
        elif tag == "table":
            self.table_rows = 0
            self._block_break()
        elif tag in _BLOCKS:
            self._block_break()

    def handle_data(self, data: str) -> None:
        if self.skip:
            return
        if self.pre:
            # The code block's header (language label, "Copy code") sits before <code>; keep the code apart.
            (self.code_buf if self.in_code else self.pre_other).append(data)
            return
        text = re.sub(r"\s+", " ", data)
        if not text.strip() and (not self.out or self.out[-1].endswith(("\n", " "))):
            return
        self._emit(text)


def html_to_markdown(html: str) -> str:
    """Convert one ChatGPT-page HTML message to markdown-ish text."""
    parser = _Markdown()
    parser.feed(html)
    parser.close()
    parts = _FENCED.split("".join(parser.out))
    for i in range(0, len(parts), 2):  # tidy the prose between code blocks; code stays as it was
        parts[i] = re.sub(r"\n{3,}", "\n\n", re.sub(r"[ \t]+\n", "\n", parts[i]))
    return clean_chatgpt_text("".join(parts).strip())


def clean_chatgpt_text(text: str) -> str:
    """Remove the page's leftovers from a reply that is already text (both kinds of dump)."""
    m = REGENERATE_COUNTER.match(text)
    if m:  # "2 / 2Write..." or "1 / 1\n..." but not "3 / 4 of a cup"
        text = text[m.end():]
    text = COPY_CHARS.sub("", text)
    text = EMPTY_CODE_BLOCK.sub("", text)
    # Koala's rule for text dumps: the button label sits on its own line between the language and the code.
    text = text.replace("\nCopy code\n", "\n\n")
    return text.strip()
