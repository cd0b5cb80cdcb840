"""The terminal chat: a read-eval-print loop over a chat template and a token stream.

Commands: /reset, /system TEXT, /save FILE, /load FILE, /regen, /exit. A line ending in a backslash
continues on the next line (multi-line messages). Ctrl-C stops the current reply, not the chat.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, Iterator, TextIO

from .errors import CamelidError, Terminated

HELP = "commands: /reset /system TEXT /save FILE /load FILE /regen /exit; end a line with \\ to continue it"


class ChatSession:
    """Conversation state plus the loop; `reply(messages)` streams the assistant's text chunks."""

    def __init__(self, reply: Callable[[list[dict]], Iterator[str]], system: str | None = None,
                 out: TextIO = sys.stdout, err: TextIO = sys.stderr):
        self.reply, self.system, self.out, self.err = reply, system, out, err
        self.history: list[dict] = []

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def _read_message(self, interactive: bool) -> str | None:
        lines = []
        prompt = "you> "
        while True:
            try:
                line = input(prompt if interactive else "")
            except EOFError:
                return "\n".join(lines) if lines else None
            if line.endswith("\\"):
                lines.append(line[:-1])
                prompt = "...> "
                continue
            lines.append(line)
            return "\n".join(lines)

    def _answer(self, interactive: bool) -> None:
        self.out.write("bot> " if interactive else "")
        chunks: list[str] = []
        try:
            for chunk in self.reply(self.messages()):
                chunks.append(chunk)
                self.out.write(chunk)
                self.out.flush()
        except Terminated:
            raise
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the chat
            print("\n(stopped)", file=self.err)
        self.out.write("\n")
        self.out.flush()
        self.history.append({"role": "assistant", "content": "".join(chunks)})

    def _command(self, text: str) -> bool:
        """Run a /command; False means leave the chat."""
        name, _, arg = text.partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit"):
            return False
        if name == "/reset":
            self.history = []
            print("(history cleared)", file=self.err)
        elif name == "/system":
            self.system = arg or None
            print(f"(system message {'set' if arg else 'removed'})", file=self.err)
        elif name == "/save":
            if not arg:
                raise CamelidError("/save needs a file name")
            Path(arg).write_text(json.dumps(self.messages(), indent=2, ensure_ascii=False))
            print(f"(saved {len(self.messages())} messages to {arg})", file=self.err)
        elif name == "/load":
            self._load(arg)
        elif name == "/regen":
            if not self.history or self.history[-1]["role"] != "assistant":
                print("(nothing to regenerate)", file=self.err)
                return True
            self.history.pop()
            return None  # type: ignore[return-value]  # tells the loop to answer again
        else:
            print(f"(unknown command {name}; {HELP})", file=self.err)
        return True

    def _load(self, path: str) -> None:
        try:
            messages = json.loads(Path(path).read_text())
            if not isinstance(messages, list) or not all(isinstance(m, dict) and {"role", "content"} <= m.keys()
                                                         for m in messages):
                raise ValueError("expected a JSON list of {\"role\", \"content\"} objects")
        except (OSError, ValueError) as e:
            raise CamelidError(f"/load {path}: {e}") from None
        self.system = next((m["content"] for m in messages if m["role"] == "system"), None)
        self.history = [{"role": m["role"], "content": m["content"]} for m in messages if m["role"] != "system"]
        print(f"(loaded {len(messages)} messages from {path})", file=self.err)

    def run(self, interactive: bool | None = None) -> None:
        interactive = sys.stdin.isatty() if interactive is None else interactive
        if interactive:
            print(HELP, file=self.err)
        while True:
            try:
                text = self._read_message(interactive)
            except Terminated:
                raise
            except KeyboardInterrupt:
                print(file=self.err)
                continue
            if text is None:
                return
            if text.strip().startswith("/"):
                try:
                    verdict = self._command(text.strip())
                except CamelidError as e:
                    print(f"camelid: error: {e}", file=self.err)
                    continue
                if verdict is False:
                    return
                if verdict is None:
                    self._answer(interactive)
                continue
            if not text.strip():
                continue
            self.history.append({"role": "user", "content": text})
            self._answer(interactive)
