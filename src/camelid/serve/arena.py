"""The arena: a blind side-by-side of two served models, votes into SQLite, and the leaderboard.

A battle is made on the server (two different models at random) and the page only ever sees "A" and
"B": replies stream through /arena/battles/{id}/{a|b} with the model's name masked out of every chunk,
and the names come back only with the vote. Installed by app.py when two or more models are served.
"""
from __future__ import annotations

import asyncio
import json
import random
import secrets
import threading
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import Field

from .schemas import APIError, ChatCompletionRequest, ChatMessage, _Request
from .votes import VoteStore

STATIC = Path(__file__).parent / "static"
PAGES = ("/arena", "/leaderboard")  # the pages themselves are public; their data routes need the API key
router = APIRouter()


class BattleTurn(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float = Field(0.7, ge=0, le=2)
    max_tokens: int | None = Field(None, ge=1)


class Vote(_Request):
    winner: Literal["model_a", "model_b", "tie", "tie (bothbad)"]
    conversation_a: list[dict] = Field(min_length=1)
    conversation_b: list[dict] = Field(min_length=1)


class Battles:
    """Battles in progress (in memory: a battle not voted on before a restart is simply forgotten)."""

    def __init__(self, models: list[str], votes_path: Path, limit: int = 10000):
        self.models, self.votes_path, self.limit = models, votes_path, limit
        self.open: dict[str, tuple[str, str]] = {}
        self.lock = threading.Lock()
        self._store: VoteStore | None = None

    @property
    def store(self) -> VoteStore:
        """Opened at the first vote or leaderboard request: a server nobody votes on writes no file."""
        with self.lock:
            if self._store is None:
                self._store = VoteStore(self.votes_path)
            return self._store

    def new(self) -> str:
        a, b = random.sample(self.models, 2)
        battle = secrets.token_hex(8)
        with self.lock:
            if len(self.open) >= self.limit:  # unvoted battles are dropped oldest first
                self.open.pop(next(iter(self.open)))
            self.open[battle] = (a, b)
        return battle

    def get(self, battle: str) -> tuple[str, str]:
        with self.lock:
            pair = self.open.get(battle)
        if pair is None:
            raise APIError(404, f"no open battle {battle!r} (already voted on, or the server restarted): start a new one",
                           code="not_found")
        return pair


def _battles(request: Request) -> Battles:
    return request.app.state.arena


@router.post("/arena/battles")
async def new_battle(request: Request) -> dict:
    return {"battle_id": _battles(request).new()}


# Declared before the {side} route, which would otherwise take "vote" for a side.
@router.post("/arena/battles/{battle}/vote")
async def vote(battle: str, body: Vote, request: Request) -> dict:
    battles = _battles(request)
    a, b = battles.get(battle)
    with battles.lock:
        if battles.open.pop(battle, None) is None:
            raise APIError(409, "this battle already has a vote", code="conflict")
    # A database write (fsync'ed): in a worker thread, off the event loop.
    vote_id = await asyncio.to_thread(battles.store.add, a, b, body.winner, body.conversation_a, body.conversation_b)
    return {"vote_id": vote_id, "model_a": a, "model_b": b, "winner": body.winner}


@router.post("/arena/battles/{battle}/{side}")
async def battle_turn(battle: str, side: Literal["a", "b"], body: BattleTurn, request: Request):
    from .openai_api import chat_completions
    name = _battles(request).get(battle)[0 if side == "a" else 1]
    chat = ChatCompletionRequest(model=name, messages=body.messages, temperature=body.temperature,
                                 max_tokens=body.max_tokens, stream=True)
    response = await chat_completions(chat, request)
    hidden = f'"model": {json.dumps(name, ensure_ascii=False)}'.encode()

    async def masked():
        async for chunk in response.body_iterator:
            data = chunk.encode() if isinstance(chunk, str) else chunk
            yield data.replace(hidden, b'"model": "hidden"')
    return StreamingResponse(masked(), media_type="text/event-stream", headers=dict(response.headers))


@router.get("/leaderboard.json")
async def leaderboard_json(request: Request) -> dict:
    from ..eval.ratings import leaderboard
    store = _battles(request).store
    # Reading every vote and fitting 100 bootstrap rounds is seconds of CPU work at a few thousand votes.
    battles = await asyncio.to_thread(store.battles)
    return {"votes": len(battles), "leaderboard": await asyncio.to_thread(leaderboard, battles, rounds=100)}


def install(app: FastAPI, models: list[str], votes_path: str | Path | None) -> None:
    """Add the arena to an app serving `models` (two or more) with votes kept at `votes_path`."""
    from .votes import default_path
    app.state.arena = Battles(models, Path(votes_path) if votes_path else default_path())
    app.include_router(router)

    @app.get("/arena", include_in_schema=False)
    async def arena_page() -> FileResponse:
        return FileResponse(STATIC / "arena.html")

    @app.get("/leaderboard", include_in_schema=False)
    async def leaderboard_page() -> FileResponse:
        return FileResponse(STATIC / "leaderboard.html")


