"""The arena's votes in SQLite (WAL): one row per vote with both conversations, the two model names,
the verdict and the time. Each vote is committed before the answer goes back, so a crash loses nothing."""
from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path

WINNERS = ("model_a", "model_b", "tie", "tie (bothbad)")
SCHEMA = """CREATE TABLE IF NOT EXISTS votes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tstamp REAL NOT NULL,
    model_a TEXT NOT NULL,
    model_b TEXT NOT NULL,
    winner TEXT NOT NULL CHECK (winner IN ('model_a', 'model_b', 'tie', 'tie (bothbad)')),
    conversation_a TEXT NOT NULL,
    conversation_b TEXT NOT NULL
)"""


def default_path() -> Path:
    """Under the user's data folder: $XDG_DATA_HOME/camelid/votes.db (~/.local/share/camelid/votes.db)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "camelid" / "votes.db"


class VoteStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a committed vote survives a crash of the machine too
        self.db.execute(SCHEMA)

    def add(self, model_a: str, model_b: str, winner: str, conversation_a: list, conversation_b: list) -> int:
        if winner not in WINNERS:
            raise ValueError(f"winner must be one of {', '.join(WINNERS)}")
        with self.lock:
            cur = self.db.execute(
                "INSERT INTO votes (tstamp, model_a, model_b, winner, conversation_a, conversation_b) VALUES (?,?,?,?,?,?)",
                (time.time(), model_a, model_b, winner, json.dumps(conversation_a), json.dumps(conversation_b)))
            return int(cur.lastrowid)

    def battles(self) -> list[tuple[str, str, str]]:
        with self.lock:
            return [tuple(r) for r in self.db.execute("SELECT model_a, model_b, winner FROM votes ORDER BY id")]

    def count(self) -> int:
        with self.lock:
            return int(self.db.execute("SELECT COUNT(*) FROM votes").fetchone()[0])

    def close(self) -> None:
        self.db.close()


def read_battles(path: str | Path) -> list[tuple[str, str, str]]:
    """(model_a, model_b, winner) of every vote in a votes database, read-only."""
    db = sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True)
    try:
        return [tuple(r) for r in db.execute("SELECT model_a, model_b, winner FROM votes ORDER BY id")]
    finally:
        db.close()
