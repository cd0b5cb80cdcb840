"""A streaming client of a running camelid (or any OpenAI-compatible) server, for `camelid chat --url`.

`remote_reply` has the shape the terminal chat expects: messages -> iterator of text chunks. Leaving
the iterator early (Ctrl-C) closes the connection, which frees the request's slot on the server.
"""
from __future__ import annotations

import json
from typing import Callable, Iterator

from ..errors import CamelidError


def remote_reply(url: str, *, model: str | None = None, api_key: str | None = None, temperature: float = 0.7,
                 top_p: float | None = None, max_tokens: int | None = None,
                 seed: int | None = None) -> Callable[[list[dict]], Iterator[str]]:
    import httpx

    base = url.rstrip("/")
    if base.endswith("/v1"):
        base = base[:-3]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    client = httpx.Client(base_url=base, headers=headers, timeout=httpx.Timeout(10.0, read=600.0))

    turns = [0]

    def reply(messages: list[dict]) -> Iterator[str]:
        # The seed is the session's: each reply (a /regen too) gets the next one, so replies differ and a session
        # given the same seed replays the same.
        turn_seed = None if seed is None else seed + turns[0]
        turns[0] += 1
        body = {"messages": messages, "stream": True, "temperature": temperature}
        body.update({k: v for k, v in (("model", model), ("top_p", top_p), ("max_tokens", max_tokens),
                                       ("seed", turn_seed)) if v is not None})
        try:
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    response.read()
                    try:
                        message = response.json()["error"]["message"]
                    except (ValueError, KeyError, TypeError):
                        message = response.text[:200]
                    raise CamelidError(f"{base}: HTTP {response.status_code}: {message}")
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise CamelidError(f"{base}: {chunk['error']['message']}")
                    for choice in chunk.get("choices", []):
                        text = choice.get("delta", {}).get("content")
                        if text:
                            yield text
        except httpx.HTTPError as e:
            raise CamelidError(f"cannot talk to {base}: {e}") from None

    return reply
