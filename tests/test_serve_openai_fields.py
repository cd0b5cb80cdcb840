"""`camelid serve`, second step, over 127.0.0.1 with the official `openai` client and httpx: structured output
(validated with jsonschema over many samples at temperature 1), logit_bias, tool calls (forced, auto, streamed,
round trip), continue_final_message checked against transformers' own rendering, /health, /metrics, CORS,
the tokenizer routes read by lm-evaluation-harness's RemoteTokenizer, request validation, usage counts, the
OpenAPI document, a client that times out freeing its row, and LMServer batches larger than rows + queue."""
from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import jsonschema
import openai
import pytest

from camelid.engine import load_model
from camelid.serve.launch import start_server

from .helpers import http_client, openai_client

KEY = "fields-key-7"
MAX_BATCH, MAX_QUEUE, CONTEXT = 4, 2, 512
MODEL = "SmolLM2-135M-Instruct"
ALLOWED = "http://allowed.test"
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "colour"],
          "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 24},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "colour": {"enum": ["red", "green", "blue"]}}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Local time of a city",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string",
                                                                                                  "maxLength": 40}},
                                                        "required": ["city"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-fields") / "server.log"
    srv = start_server(["--api-key", KEY, "--max-batch", str(MAX_BATCH), "--max-queue", str(MAX_QUEUE),
                        "--context", str(CONTEXT), "--lm-max-tokens", "6", "--cors-origin", ALLOWED], log)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai_client(server, KEY, timeout=120)


@pytest.fixture(scope="module")
def http(server):
    with http_client(server, KEY, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer():
    return load_model().tokenizer


ASK_PERSON = [{"role": "user", "content": "Invent a person. Answer in JSON with name, age and favourite colour."}]


# --- structured output ------------------------------------------------------------------------------------
def test_json_schema_replies_always_validate_at_temperature_1(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    replies = []
    for seed in range(4):
        out = client.chat.completions.create(model=MODEL, messages=ASK_PERSON, response_format=fmt, temperature=1.0,
                                             n=6, seed=seed, max_tokens=120)
        replies += [(c.message.content, c.finish_reason) for c in out.choices]
    assert len(replies) == 24
    for text, reason in replies:
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), PERSON)
    assert len({text for text, _ in replies}) > 5  # sampled, not one forced answer


def test_json_object_and_streamed_schema(client):
    out = client.chat.completions.create(model=MODEL, messages=ASK_PERSON, temperature=0.7, seed=3, n=4,
                                         response_format={"type": "json_object"}, max_tokens=200)
    # Any object, however long: every reply that ended by itself is one.
    parsed = [json.loads(c.message.content) for c in out.choices if c.finish_reason == "stop"]
    assert parsed and all(isinstance(p, dict) for p in parsed)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    stream = client.chat.completions.create(model=MODEL, messages=ASK_PERSON, temperature=1.0, seed=5,
                                            response_format=fmt, stream=True, max_tokens=120)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    jsonschema.validate(json.loads(text), PERSON)


def test_completions_accept_a_schema_too(client):
    out = client.completions.create(model=MODEL, prompt="A person as JSON:", temperature=1.0, seed=1, max_tokens=120,
                                    extra_body={"response_format": {"type": "json_schema", "json_schema": {
                                        "name": "person", "schema": PERSON}}})
    jsonschema.validate(json.loads(out.choices[0].text), PERSON)


def test_unenforceable_schema_is_a_400(http):
    r = http.post("/v1/chat/completions", json={"messages": ASK_PERSON, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text


# --- logit_bias -------------------------------------------------------------------------------------------
def test_logit_bias_bans_and_forces_tokens(client, tokenizer):
    plain = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=1, temperature=0,
                                      logprobs=0)
    first = tokenizer.encode(plain.choices[0].text)
    assert len(first) == 1
    banned = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=1, temperature=0,
                                       logit_bias={str(first[0]): -100})
    assert banned.choices[0].text != plain.choices[0].text
    forced_id = tokenizer.encode(" banana")[0]
    forced = client.chat.completions.create(model=MODEL, messages=ASK_PERSON, max_tokens=3, temperature=1.0,
                                            logit_bias={str(forced_id): 100})
    assert forced.choices[0].message.content.startswith(tokenizer.decode([forced_id]) * 3)


# --- tools ------------------------------------------------------------------------------------------------
def test_forced_tool_call_round_trips_through_the_openai_client(client):
    messages = [{"role": "user", "content": "What's the weather like in Paris right now?"}]
    out = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER, TIME], temperature=0.8,
                                         seed=2, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    # The call and its result go back in; the model answers in words (tool_choice none: no tools offered).
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "clear"}'}]
    answer = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="none",
                                            temperature=0, max_tokens=30)
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls


def test_required_tool_choice_picks_among_tools_and_streams_deltas(client):
    messages = [{"role": "user", "content": "What time is it in Tokyo?"}]
    kwargs = dict(model=MODEL, messages=messages, tools=[WEATHER, TIME], tool_choice="required", temperature=0)
    whole = client.chat.completions.create(**kwargs)
    [call] = whole.choices[0].message.tool_calls
    assert call.function.name in ("get_weather", "get_time")
    chunks = [c for c in client.chat.completions.create(**kwargs, stream=True) if c.choices]
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id and deltas[0].function.name == call.function.name and deltas[0].function.arguments == ""
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_auto_tool_choice_returns_text_or_a_parsed_call(client):
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hello."}],
                                         tools=[WEATHER], temperature=0, max_tokens=40)
    message = out.choices[0].message
    assert message.content or message.tool_calls
    if message.tool_calls:
        assert out.choices[0].finish_reason == "tool_calls"
        json.loads(message.tool_calls[0].function.arguments)


# --- conversations OpenAI accepts -------------------------------------------------------------------------
def test_a_final_assistant_message_is_continued_as_transformers_renders_it(client, http):
    from transformers.utils.chat_template_utils import render_jinja_template
    info = http.get("/tokenizer_info").json()
    messages = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "The capital of France is"}]
    [rendered], _ = render_jinja_template([messages], chat_template=info["chat_template"],
                                          continue_final_message=True)
    chat = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=8)
    plain = client.completions.create(model=MODEL, prompt=rendered, temperature=0, max_tokens=8)
    assert chat.choices[0].message.content == plain.choices[0].text
    assert chat.usage.prompt_tokens == plain.usage.prompt_tokens
    only_system = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=5,
                                                 messages=[{"role": "system", "content": "Greet the user."}])
    assert only_system.choices[0].message.content


# --- validation -------------------------------------------------------------------------------------------
Q = [{"role": "user", "content": "hi"}]
INVALID = [
    ({"messages": Q, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": Q, "seed": 2 ** 64}, "seed"),
    ({"messages": Q, "seed": -(2 ** 63) - 1}, "seed"),
    ({"messages": Q, "max_tokens": CONTEXT}, "max_tokens"),
    ({"messages": [{"role": "user"}]}, "content"),
    ({"messages": Q, "functions": []}, "functions"),
    ({"messages": Q, "logit_bias": {"hello": 1}}, "logit_bias"),
    ({"messages": Q, "logit_bias": {"10": 101}}, "logit_bias"),
    ({"messages": Q, "tool_choice": "required"}, "tool_choice"),
    ({"messages": Q, "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"messages": Q, "response_format": {"type": "json_schema"}}, "response_format"),
]


@pytest.mark.parametrize("body,param", INVALID)
def test_invalid_requests_are_400_naming_the_field(http, body, param):
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert param in (error["param"] or "") + error["message"], error


def test_raw_json_oddities_are_400(http):
    for raw, words in ((b'{"messages": [{"role": "user", "content": "hi"}], "repetition_penalty": Infinity}',
                        "repetition_penalty"),
                       (b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "surrogate"),
                       (b'{"prompt": "a\\udc00", "max_tokens": 1}', "surrogate")):
        path = "/v1/completions" if b"prompt" in raw else "/v1/chat/completions"
        r = http.post(path, content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
        assert "TextInputSequence" not in r.text


# --- counts, logprobs, empty prompt -----------------------------------------------------------------------
def test_usage_sums_prompts_and_logprobs_include_the_sampled_token(client, http):
    prompts = ["One two three", "The quick brown fox jumps"]
    lengths = [http.post("/tokenize", json={"prompt": p}).json()["count"] for p in prompts]
    out = client.completions.create(model=MODEL, prompt=prompts, max_tokens=2, temperature=0.9, seed=4, logprobs=0)
    assert out.usage.prompt_tokens == sum(lengths)
    for choice in out.choices:
        for token, top in zip(choice.logprobs.tokens, choice.logprobs.top_logprobs):
            assert list(top) == [token]
    two = client.completions.create(model=MODEL, prompt="Colours: red,", max_tokens=4, temperature=1.0, seed=9,
                                    logprobs=2)
    for token, lp, top in zip(two.choices[0].logprobs.tokens, two.choices[0].logprobs.token_logprobs,
                              two.choices[0].logprobs.top_logprobs):
        assert top[token] == lp and len(top) in (2, 3)
    fresh = f"A prompt never seen before {time.time()}"
    echo = client.completions.create(model=MODEL, prompt=fresh, max_tokens=1, echo=True, logprobs=1)
    assert echo.usage.prompt_tokens_details.cached_tokens == 0
    empty = client.completions.create(model=MODEL, prompt="", max_tokens=3, temperature=0)
    assert empty.choices[0].finish_reason in ("length", "stop")


# --- tokenizer routes -------------------------------------------------------------------------------------
def test_lm_eval_remote_tokenizer_reads_the_server(server, tokenizer, http):
    from lm_eval.utils import RemoteTokenizer
    remote = RemoteTokenizer(f"{server.url}/v1/completions", auth_token=KEY)
    text = "Hello world, <|im_end|> tokenized remotely."
    assert remote.encode(text) == tokenizer.encode(text)
    assert remote.decode(tokenizer.encode(text)) == text
    assert remote.eos_token_id == tokenizer.eos_id and remote.bos_token_id == tokenizer.bos_id
    assert "<|im_start|>assistant" in remote.apply_chat_template(Q, add_generation_prompt=True)
    # llama.cpp's shapes: content / with_pieces / detokenize -> content.
    r = http.post("/tokenize", json={"content": "Hello world", "with_pieces": True}).json()
    assert [t["piece"] for t in r["tokens"]] == ["Hello", " world"]
    assert http.post("/detokenize", json={"tokens": [t["id"] for t in r["tokens"]]}).json()["content"] == "Hello world"
    chat = http.post("/tokenize", json={"messages": Q}).json()
    assert tokenizer.decode(chat["tokens"]).endswith("<|im_start|>assistant\n")


# --- health, metrics, CORS, OpenAPI -----------------------------------------------------------------------
def test_health_metrics_and_cors(server, client):
    health = httpx.get(f"{server.url}/health")  # public, like /ready
    assert health.status_code == 200 and health.json()["status"] == "ok"
    client.chat.completions.create(model=MODEL, messages=Q, max_tokens=4, temperature=0)
    assert httpx.get(f"{server.url}/metrics").status_code == 401
    text = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for name in ("camelid_requests_total", "camelid_generation_tokens_total", "camelid_queue_depth",
                 "camelid_batch_occupancy", "camelid_time_to_first_token_seconds_count",
                 "camelid_inter_token_latency_seconds_count"):
        assert name in text, name
    ttft = [line for line in text.splitlines() if line.startswith("camelid_time_to_first_token_seconds_count")]
    assert float(ttft[0].split()[-1]) >= 1
    preflight = {"Origin": ALLOWED, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    ok = httpx.options(f"{server.url}/v1/chat/completions", headers=preflight)
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ALLOWED
    other = httpx.options(f"{server.url}/v1/chat/completions", headers=preflight | {"Origin": "http://evil.test"})
    assert "access-control-allow-origin" not in other.headers


def test_openapi_document_matches_the_server(server, http):
    doc = http.get("/openapi.json").json()
    for path, item in doc["paths"].items():
        for method, op in item.items():
            assert "422" not in op["responses"], (path, method)
            assert "200" in op["responses"] and op["responses"]["200"].get("content"), (path, method)
            if method == "post":
                assert "400" in op["responses"], (path, method)
    schemas = doc["components"]["schemas"]
    assert set(schemas["LMGenerateRequest"]["required"]) == {"prefix_text"}
    assert set(schemas["LMGreedyUntilRequest"]["required"]) == {"prefix_text", "until"}
    assert "text" in schemas["LMLoglikelihoodRequest"]["required"]
    assert "usage" in schemas["ChatCompletion"]["required"]
    r = http.get("/v1/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"


# --- rows: a client that times out, batches larger than the queue -----------------------------------------
def _busy(server) -> int:
    return httpx.get(f"{server.url}/health").json()["models"][MODEL]["rows_busy"]


def test_a_non_streamed_client_that_times_out_frees_its_row_within_a_second(server):
    body = {"messages": [{"role": "user", "content": "Write a long story"}], "max_tokens": 450, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=httpx.Timeout(30, read=1.5))
    left = time.perf_counter()
    while _busy(server) and time.perf_counter() - left < 5:
        time.sleep(0.02)
    assert _busy(server) == 0 and time.perf_counter() - left < 1.0
    deadline = time.perf_counter() + 5
    while "client gone" not in server.log() and time.perf_counter() < deadline:
        time.sleep(0.05)
    assert "client gone" in server.log()


def test_lmserver_batch_larger_than_rows_and_queue_runs_in_parts(http):
    prompts = [f"Count: {i}," for i in range(3 * (MAX_BATCH + MAX_QUEUE))]
    r = http.post("/generate", json={"prefix_text": prompts, "temperature": 0})
    assert r.status_code == 200, r.text
    outputs = r.json()["output_text"]
    assert len(outputs) == len(prompts)
    alone = [http.post("/generate", json={"prefix_text": [p], "temperature": 0}).json()["output_text"][0]
             for p in prompts[:2]]
    assert outputs[:2] == alone
    until = http.post("/greedy-until", json={"prefix_text": prompts, "until": [[",", " ", "\n"]] * len(prompts)})
    assert until.status_code == 200 and len(until.json()["output_text"]) == len(prompts)


# --- the event loop stays free while a prompt is built ----------------------------------------------------
@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_health_answers_while_a_long_prompt_is_prepared(server, route):
    """Rendering and tokenizing ~0.9 MB of conversation (or of one prompt) takes the server a second or more;
    it happens in a worker thread, with the tokenizer releasing the GIL, so /health requests sent meanwhile
    are answered while that request is still being prepared. Were it on the event loop, no /health answer
    could come back before the long request's own."""
    text = "lorem ipsum dolor sit amet, consectetur adipiscing elit " * 5200  # ~290k characters
    messages = [{"role": "user", "content": "1 " + text}, {"role": "assistant", "content": "2 " + text},
                {"role": "user", "content": "3 " + text}]
    body = {"messages": messages} if "chat" in route else {"prompt": "\n".join(m["content"] for m in messages)}
    headers = {"Authorization": f"Bearer {KEY}"}
    done: dict = {}

    def long_request() -> None:
        r = httpx.post(f"{server.url}{route}", json=body | {"max_tokens": 4}, headers=headers, timeout=120)
        done["status"], done["body"], done["at"] = r.status_code, r.json(), time.perf_counter()

    answers = []  # (sent, answered) of each /health request
    with httpx.Client(base_url=server.url, timeout=120) as probe, concurrent.futures.ThreadPoolExecutor(1) as pool:
        probe.get("/health")  # the connection is open before the clock starts
        sent = time.perf_counter()
        job = pool.submit(long_request)
        while not job.done():
            asked = time.perf_counter()
            assert probe.get("/health").status_code == 200
            answers.append((asked, time.perf_counter()))
            time.sleep(0.02)
        job.result()
    # The whole prompt was built (then found too long for the context): the work the probes overlapped.
    assert done["status"] == 400 and done["body"]["error"]["code"] == "context_length_exceeded", done
    took = done["at"] - sent
    during = [a for s, a in answers if sent + took / 2 <= s and a < done["at"]]
    assert len(during) >= 2, f"{len(during)} /health answers in the second half of a {took:.2f}s request"
    assert max(a - s for s, a in answers) < took / 2, answers
