"""Request bodies of the OpenAI-compatible and LMServer APIs, and the error shape both answer with.

Pydantic does the type checking; a failed check becomes a 400 in OpenAI's error shape (see app.py).
Unknown fields are refused with a 400 naming them: a client must never believe an option took effect
when it did not.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator


class APIError(Exception):
    """An error the client caused (or a busy server): answered as {"error": {...}} with `status`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, type=self.type, param=self.param, code=self.code,
                              headers=self.headers)


def error_response(status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _check_text(value):
    """Strings must be valid Unicode: a lone UTF-16 surrogate ("\\ud800") cannot be tokenized."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("contains a lone UTF-16 surrogate; send valid Unicode text") from None
    elif isinstance(value, (list, tuple)):
        for v in value:
            _check_text(v)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_text(k)
            _check_text(v)
    return value


class _Request(BaseModel):
    # Fields this server does not know are refused (400 naming the field), never silently dropped: a client
    # that asks for something must learn that it did not happen. Infinity/NaN are refused everywhere.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _valid_unicode(cls, value):
        return _check_text(value)


class TextPart(_Request):
    type: Literal["text"]
    text: str


class FunctionCall(_Request):
    name: str
    arguments: str  # a JSON object as a string, as OpenAI sends it


class ToolCall(_Request):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message answers this call

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Request):
    include_usage: bool = False


class FunctionDef(_Request):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaSpec(_Request):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaSpec | None = None


INT64 = 1 << 63


class _Sampling(_Request):
    model: str | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = Field(None)
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    response_format: ResponseFormat | None = None
    user: str | None = None  # an end-user id; only logged by OpenAI too
    # Not in OpenAI's API, but common in compatible servers (vLLM, llama.cpp).
    top_k: int | None = Field(None, ge=1)
    repetition_penalty: float = Field(1.0, gt=0, le=100)
    ignore_eos: bool = False  # vLLM's option: generate max_tokens whatever the model says (benchmarks)

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool | None = None
    # vLLM's/transformers' options: a conversation ending with an assistant message is continued by default.
    continue_final_message: bool | None = None
    add_generation_prompt: bool | None = None


_TokenIds = Annotated[list[int], Field(min_length=1)]


class CompletionRequest(_Sampling):
    prompt: Union[str, Annotated[list[str], Field(min_length=1)], _TokenIds, Annotated[list[_TokenIds], Field(min_length=1)]]
    max_tokens: int | None = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)


class TokenizeRequest(_Request):
    """vLLM's /tokenize (`prompt`, `add_special_tokens`) and llama.cpp's (`content`, `add_special`,
    `with_pieces`); `messages` renders the chat template first."""
    model: str | None = None
    prompt: str | None = None
    content: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[Tool] | None = None  # with messages: offered in the prompt, as vLLM's /tokenize takes them
    add_special_tokens: bool | None = None
    add_special: bool | None = None
    add_generation_prompt: bool = True
    with_pieces: bool = False


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


class LMGenerateRequest(_Request):
    """EasyLM's /generate."""
    prefix_text: list[str]
    temperature: float | None = Field(None, ge=0, le=2)


class LMGreedyUntilRequest(_Request):
    prefix_text: list[str]
    until: Union[list[str], list[list[str]]]


class LMLoglikelihoodRequest(_Request):
    text: list[str]
    prefix_text: list[str] | None = None


class LMRollingRequest(_Request):
    text: list[str]


class LMChatRequest(_Request):
    prompt: str
    context: str = ""
    temperature: float | None = Field(None, ge=0, le=2)
