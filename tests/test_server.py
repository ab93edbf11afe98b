"""`pmod server`: the OpenAI-compatible HTTP server, over real sockets on 127.0.0.1."""

from __future__ import annotations

import base64
import http.client
import io
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from builders import random_tensors, tiny_config, write_checkpoint  # noqa: E402
from tiny_tokenizer import write_tiny_tokenizer  # noqa: E402

from pmod.errors import PmodError  # noqa: E402
from pmod.app.generate import Sampler, SamplerArgs  # noqa: E402
from pmod.prompt import Message  # noqa: E402
from pmod.app.serve import make_server  # noqa: E402
from pmod.app.serve.errors import RequestError  # noqa: E402
from pmod.app.serve.openai import Defaults, parse_chat_request  # noqa: E402

QUESTION = "what colour is the circle ?"
MAX_BODY = 256 * 1024


class Log(io.StringIO):
    """The server's log: it writes under its own lock, tests read the lines."""

    def lines(self) -> list[str]:
        return self.getvalue().splitlines()


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    config = tiny_config()
    path = write_checkpoint(tmp_path_factory.mktemp("server"), config, random_tensors(config, seed=0),
                            name="tiny-pmod")
    write_tiny_tokenizer(path, config.vocab_size)
    return path


@pytest.fixture(scope="module")
def server(text_model):
    log = Log()
    httpd, thread = make_server(text_model, port=0, dtype="float32", max_tokens=24, max_body=MAX_BODY, log=log)
    httpd.test_log = log
    yield httpd
    httpd.close()
    thread.join(5)
    assert not thread.is_alive()


def direct(httpd, messages, images=(), system=None, max_tokens=24, temp=0.0, top_p=1.0, seed=None, stop=None):
    """(text, stats) of Session.complete run directly on the server's session."""
    from pmod.app.session import Reply

    def run(session):
        reply = Reply()
        pieces = list(session.complete(messages, list(images), system=system, max_tokens=max_tokens,
                                       sampler=Sampler(SamplerArgs(temp, top_p, seed)), stop=stop, reply=reply))
        assert "".join(pieces) == reply.text
        return reply.text, reply.stats

    return httpd.call(run)


def request(httpd, method, path, body=None, raw: bytes | None = None, headers=None, timeout=30):
    """(status, headers, parsed JSON or text) over http.client."""
    host, port = httpd.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        text = resp.read().decode()
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = text
        return resp.status, dict(resp.getheaders()), parsed
    finally:
        conn.close()


def chat(httpd, content=QUESTION, **params):
    body = {"model": "tiny-pmod", "messages": [{"role": "user", "content": content}], **params}
    return request(httpd, "POST", "/v1/chat/completions", body)


def sse(httpd, body, timeout=30) -> tuple[list[dict], list[str]]:
    """(chunks, raw data lines) of a streamed completion."""
    host, port = httpd.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps({**body, "stream": True}),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        assert resp.getheader("Content-Type").startswith("text/event-stream")
        text = resp.read().decode()
    finally:
        conn.close()
    lines = [ln[len("data: "):] for ln in text.split("\n\n") if ln.startswith("data: ")]
    assert text.endswith("data: [DONE]\n\n")
    return [json.loads(ln) for ln in lines if ln != "[DONE]"], lines


def assert_error(status, body, want_status=400, param=None, contains=None):
    assert status == want_status, body
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == ("invalid_request_error" if want_status < 500 and want_status != 503 else "server_error")
    assert isinstance(err["message"], str) and err["message"] and "\n" not in err["message"]
    if param is not None:
        assert err["param"] == param
    if contains is not None:
        assert contains in err["message"], err["message"]


# ----------------------------------------------------------------------------- completions
def test_completion_equals_session(server):
    text, stats = direct(server, [Message("user", QUESTION)])
    assert len(text) > 10
    status, headers, body = chat(server, temperature=0)
    assert status == 200, body
    assert headers["Content-Type"] == "application/json"
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "tiny-pmod"
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["message"] == {"role": "assistant", "content": text}
    assert choice["finish_reason"] == ("length" if stats.finish_reason == "length" else "stop")
    full = stats.prompt_tokens + stats.resumed_tokens  # the whole prompt, however much came from the cache
    usage = {k: v for k, v in body["usage"].items() if k != "prompt_tokens_details"}
    assert usage == {"prompt_tokens": full, "completion_tokens": stats.generated_tokens,
                     "total_tokens": full + stats.generated_tokens}
    assert body["usage"]["prompt_tokens"] > 20


def test_stream_concatenates_to_the_same_text(server):
    text, stats = direct(server, [Message("user", QUESTION)])
    chunks, lines = sse(server, {"messages": [{"role": "user", "content": QUESTION}],
                                 "stream_options": {"include_usage": True}})
    assert lines[-1] == "[DONE]"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = [c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]]
    assert len([p for p in content if p]) > 1  # streamed in pieces
    assert "".join(content) == text
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["delta"] == {}
    assert finals[0]["choices"][0]["finish_reason"] == "length"  # 24 tokens, no EOS with this seed
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == stats.generated_tokens
    assert usage["usage"]["prompt_tokens"] == stats.prompt_tokens + stats.resumed_tokens


def test_max_tokens_and_usage(server):
    for key in ("max_tokens", "max_completion_tokens"):
        status, _, body = chat(server, **{key: 3})
        assert status == 200, body
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 3
    text3, _ = direct(server, [Message("user", QUESTION)], max_tokens=3)
    assert body["choices"][0]["message"]["content"] == text3


def test_stop_truncates(server):
    text, _ = direct(server, [Message("user", QUESTION)])
    stop = text[6:9]
    want = text[:text.find(stop)]
    status, _, body = chat(server, stop=stop)
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == want
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] < 24
    status, _, body = chat(server, stop=["zzzz", stop])
    assert body["choices"][0]["message"]["content"] == want
    chunks, _ = sse(server, {"messages": [{"role": "user", "content": QUESTION}], "stop": [stop]})
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert streamed == want
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_stop_across_pieces(server):
    """A stop string split over two streamed pieces: nothing of it is sent, in either mode."""
    def pieces(session):
        return list(session.complete([Message("user", QUESTION)], max_tokens=24))

    got = server.call(pieces)
    k = next(k for k in range(len(got) - 1) if len(got[k]) >= 2 and got[k + 1])
    stop = got[k][-1] + got[k + 1][0]
    full = "".join(got)
    want = full[:full.find(stop)]
    assert chat(server, stop=stop)[2]["choices"][0]["message"]["content"] == want
    chunks, _ = sse(server, {"messages": [{"role": "user", "content": QUESTION}], "stop": stop})
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == want
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def _pieces(httpd, max_tokens=24) -> list[str]:
    return httpd.call(lambda session: list(session.complete([Message("user", QUESTION)], max_tokens=max_tokens)))


def _both_modes(httpd, stop) -> list[tuple[str, str]]:
    """[(content, finish_reason)] of the same request, not streamed and streamed."""
    body = {"messages": [{"role": "user", "content": QUESTION}], "stop": stop}
    status, _, out = request(httpd, "POST", "/v1/chat/completions", body)
    assert status == 200, out
    chunks, _ = sse(httpd, body)
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    return [(out["choices"][0]["message"]["content"], out["choices"][0]["finish_reason"]),
            (streamed, chunks[-1]["choices"][0]["finish_reason"])]


NEVER = "\u2603"  # not in the tiny model's vocabulary: a stop string with it never matches


def test_stop_held_back_tail_is_released(server):
    """A tail that only begins a stop string is held back, then sent: nothing is lost."""
    got = _pieces(server)
    full = "".join(got)
    assert NEVER not in full
    k = next(k for k in range(1, len(got) - 1) if len(got[k]) >= 2)
    for stop in ([got[k] + NEVER],           # a whole piece begins it: held until the next one comes
                 [full[-2:] + NEVER],         # the reply's last characters begin it: sent at the end
                 [NEVER, full[-1] + NEVER],   # several strings, none matches
                 [""]):                        # empty strings are dropped
        assert _both_modes(server, stop) == [(full, "length")] * 2, stop


def test_stop_earliest_match_wins(server):
    """With several stop strings (one a prefix-holder of another), the reply ends before the first match."""
    full = "".join(_pieces(server))
    late, early = full[12:15], full[4:6]
    assert full.find(early) < full.find(late)
    want = full[:full.find(early)]
    for stop in ([late, early], [early, late], [late + NEVER, early], [early[0] + NEVER, early]):
        assert _both_modes(server, stop) == [(want, "stop")] * 2, stop


class _Gated:
    """The server's session, but generation waits after its first yielded piece until ``gate`` is set."""

    def __init__(self, session):
        self.inner, self.gate, self.yielded, self.waited = session, threading.Event(), [], None

    def complete(self, *args, **kwargs):
        pieces = self.inner.complete(*args, **kwargs)
        try:
            for piece in pieces:
                self.yielded.append(piece)
                yield piece
                if len(self.yielded) == 1:
                    self.waited = self.gate.wait(15)
        finally:
            pieces.close()

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_stream_sends_pieces_as_they_come(server):
    """With stop strings, each piece the session yields goes out at once, not at the end."""
    got = _pieces(server)
    full = "".join(got)
    stop = [got[1] + NEVER, full[-3:] + NEVER]  # held-back tails along the way, no match
    gated = _Gated(server.session)
    server.session, batch = gated, server.max_batch
    server.max_batch = 1  # the serial path, whose session.complete is gated (batching: test_serving.py)
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=15)
    try:
        body = {"messages": [{"role": "user", "content": QUESTION}], "stop": stop, "stream": True}
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        first = ""
        while not first:  # generation is paused after one piece: it must reach us meanwhile
            line = resp.readline().decode()
            assert line, "the stream ended before any content"
            if line.startswith("data: {"):
                first = json.loads(line[6:])["choices"][0]["delta"].get("content", "")
        assert gated.yielded == [first]  # the client has it while the next piece is not made yet
        gated.gate.set()
        rest = resp.read().decode()
    finally:
        gated.gate.set()
        conn.close()
        server.session, server.max_batch = gated.inner, batch
    assert gated.waited is True
    chunks = [json.loads(ln[6:]) for ln in rest.splitlines() if ln.startswith("data: {")]
    assert first + "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == full
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_system_message_and_parts(server):
    system = "You answer in one word."
    text, _ = direct(server, [Message("user", "hello\nthere")], system=system)
    body = {"messages": [{"role": "system", "content": system},
                         {"role": "user", "content": [{"type": "text", "text": "hello"},
                                                      {"type": "text", "text": "there"}]}]}
    status, _, out = request(server, "POST", "/v1/chat/completions", body)
    assert status == 200, out
    assert out["choices"][0]["message"]["content"] == text
    default, _ = direct(server, [Message("user", "hello\nthere")])
    assert default != text  # the system line reached the prompt


def test_multi_turn_and_seeded_sampling(server):
    msgs = [Message("user", "hello"), Message("assistant", "hi there ."), Message("user", QUESTION)]
    text, _ = direct(server, msgs, temp=0.8, seed=5)
    body = {"messages": [{"role": m.role, "content": m.text} for m in msgs], "temperature": 0.8, "seed": 5}
    outs = [request(server, "POST", "/v1/chat/completions", body)[2]["choices"][0]["message"]["content"]
            for _ in range(2)]
    assert outs == [text, text]


def test_models_and_health(server):
    status, _, body = request(server, "GET", "/v1/models")
    assert status == 200
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == ["tiny-pmod"]
    assert body["data"][0]["object"] == "model"
    status, _, body = request(server, "GET", "/v1/models/tiny-pmod")
    assert status == 200 and body["id"] == "tiny-pmod"
    assert_error(*request(server, "GET", "/v1/models/other")[::2], want_status=404)
    assert request(server, "GET", "/health")[2] == {"status": "ok"}
    assert_error(*request(server, "GET", "/v1/nothing")[::2], want_status=404)
    assert_error(*request(server, "POST", "/v2/chat", {"x": 1})[::2], want_status=404)
    assert_error(*request(server, "GET", "/v1/chat/completions")[::2], want_status=405)


# ----------------------------------------------------------------------------- bad requests
BAD = [
    ("malformed json", b'{"messages": [', None, "not valid JSON"),
    ("not an object", b"[1, 2]", None, "JSON object"),
    ("nan", b'{"messages": [{"role": "user", "content": "a"}], "temperature": NaN}', None, "JSON"),
    ("no messages", b'{"model": "x"}', "messages", None),
    ("messages null", {"messages": None}, "messages", None),
    ("empty messages", {"messages": []}, "messages", None),
    ("bad role", {"messages": [{"role": "wizard", "content": "a"}]}, "messages[0].role", "wizard"),
    ("message not object", {"messages": ["hi"]}, "messages[0]", None),
    ("content type", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content", None),
    ("ends with assistant", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     "messages", "end with a user"),
    ("temperature -1", {"temperature": -1}, "temperature", ">= 0"),
    ("temperature str", {"temperature": "hot"}, "temperature", None),
    ("top_p 0", {"top_p": 0}, "top_p", None),
    ("max_tokens 0", {"max_tokens": 0}, "max_tokens", None),
    ("max_tokens float", {"max_tokens": 2.5}, "max_tokens", None),
    ("seed negative", {"seed": -3}, "seed", None),
    ("stop int", {"stop": 3}, "stop", None),
    ("stream str", {"stream": "yes"}, "stream", None),
    ("n 2", {"n": 2}, "n", None),
    ("http image", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}, {"type": "text", "text": "a"}]}]},
     "messages[0].content[0].image_url", "not fetched"),
    ("ftp image", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "ftp://x/y"}}]}]},
     "messages[0].content[0].image_url", "unsupported"),
    ("relative path", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "cat.png"}]}]},
     "messages[0].content[0].image_url", None),
    ("missing file", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file:///no/such/image.png"}}]}]},
     "messages[0].content[0].image_url", "not found"),
    ("bad base64", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]},
     "messages[0].content[0].image_url", "base64"),
    ("unknown part", {"messages": [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]},
     "messages[0].content[0]", "audio"),
    ("image in system", {"messages": [{"role": "system", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
        {"role": "user", "content": "a"}]}, "messages[0].content", "only user"),
    ("stray marker", {"messages": [{"role": "user", "content": "look: <image>"}]}, "messages", "marker"),
]


@pytest.mark.parametrize("name,body,param,contains", BAD, ids=[b[0] for b in BAD])
def test_bad_request_is_400(server, name, body, param, contains):
    if isinstance(body, bytes):
        status, _, out = request(server, "POST", "/v1/chat/completions", raw=body)
    else:
        body = {"messages": [{"role": "user", "content": QUESTION}], **body}
        status, _, out = request(server, "POST", "/v1/chat/completions", body)
    assert_error(status, out, 400, param, contains)


def test_errors_keep_the_server_serving(server):
    text, _ = direct(server, [Message("user", QUESTION)])
    # over the context (512 positions): found at prefill, before any token; stream and not
    long = "the circle is red . " * 200
    assert_error(*chat(server, long)[::2], 400, "messages", "prompt too long")
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": long}], "stream": True}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert_error(resp.status, json.loads(resp.read()), 400, "messages", "prompt too long")
    conn.close()
    # an image sent to a text-only model
    png = base64.b64encode(_png(8, 8)).decode()
    status, _, out = chat(server, [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
                                   {"type": "text", "text": "what is it ?"}])
    assert_error(status, out, 400, "messages")
    assert chat(server)[2]["choices"][0]["message"]["content"] == text


def test_oversize_body_is_413(server):
    big = json.dumps({"messages": [{"role": "user", "content": "a" * (MAX_BODY + 10)}]}).encode()
    status, headers, out = request(server, "POST", "/v1/chat/completions", raw=big)
    assert_error(status, out, 413)
    assert headers.get("Connection") == "close"
    # Expect: 100-continue: refused before the body is sent
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {MAX_BODY * 4}\r\nExpect: 100-continue\r\n\r\n".encode())
        data = _recv_all(s)
    assert data.startswith(b"HTTP/1.1 413"), data[:100]
    assert json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_too_large"
    assert chat(server, max_tokens=2)[0] == 200


def test_concurrent_requests_queue(server):
    text, _ = direct(server, [Message("user", QUESTION)])
    results = [None] * 4

    def go(i):
        if i % 2:
            chunks, _ = sse(server, {"messages": [{"role": "user", "content": QUESTION}]})
            results[i] = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        else:
            results[i] = chat(server)[2]["choices"][0]["message"]["content"]

    threads = [threading.Thread(target=go, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [text] * 4


def _post_raw(body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)


def test_client_disconnects(server):
    host, port = server.server_address[:2]
    long = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 400}
    gone = lambda: sum("client gone" in ln for ln in server.test_log.lines())  # noqa: E731
    before = gone()
    # mid-stream: read the first event, then hang up
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(_post_raw({**long, "stream": True}))
        assert s.recv(256).startswith(b"HTTP/1.1 200")
    # mid-generation without streaming: noticed while the tokens come
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(_post_raw(long))
        time.sleep(0.1)
    # while queued: the compute thread is held, the client leaves, its job never runs
    gate, started = threading.Event(), threading.Event()
    holder = threading.Thread(target=server.call, args=(lambda _: (started.set(), gate.wait(10)),))
    holder.start()
    started.wait(5)
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(_post_raw(long))
        time.sleep(0.2)
    time.sleep(0.6)
    gate.set()
    holder.join(10)
    assert chat(server, max_tokens=2)[0] == 200
    assert gone() >= before + 2  # the queued one surely; the others unless they finished first


def test_http10_stream(server):
    text, _ = direct(server, [Message("user", QUESTION)], max_tokens=5)
    body = json.dumps({"messages": [{"role": "user", "content": QUESTION}], "stream": True, "max_tokens": 5})
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=10) as s:  # no chunked encoding: the close ends it
        s.sendall(f"POST /v1/chat/completions HTTP/1.0\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())
        data = _recv_all(s).decode()
    head, events = data.split("\r\n\r\n", 1)
    assert head.startswith("HTTP/1.1 200") and "chunked" not in head
    events = [e[6:] for e in events.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1]) == text


def test_queue_limit_is_503(server):
    gate, started = threading.Event(), threading.Event()
    holder = threading.Thread(target=server.call, args=(lambda _: (started.set(), gate.wait(10)),))
    holder.start()
    started.wait(5)
    old, server.max_queue = server.max_queue, 1
    try:
        first = threading.Thread(target=chat, args=(server,), kwargs={"max_tokens": 2})
        first.start()
        deadline = time.time() + 5
        while server._pending < 1 and time.time() < deadline:
            time.sleep(0.01)
        status, _, out = chat(server, max_tokens=2)
        assert_error(status, out, 503)
        assert out["error"]["code"] == "server_busy"
    finally:
        server.max_queue = old
        gate.set()
        holder.join(10)
    first.join(30)


def test_log_lines(server):
    chat(server, max_tokens=2)
    request(server, "GET", "/v1/models")
    lines = server.test_log.lines()
    post = [ln for ln in lines if "POST /v1/chat/completions 200" in ln]
    assert post and "prompt=" in post[-1] and "completion=2" in post[-1] and post[-1].endswith("s")
    assert any("GET /v1/models 200" in ln for ln in lines)


# ----------------------------------------------------------------------------- real clients
def _httpx():
    for name in ("httpx", "httpx2"):
        try:
            return __import__(name)
        except ImportError:
            continue
    pytest.skip("no httpx")


def test_httpx_stream(server):
    httpx = _httpx()
    text, _ = direct(server, [Message("user", QUESTION)])
    body = {"model": "tiny-pmod", "messages": [{"role": "user", "content": QUESTION}], "stream": True}
    got, done = "", False
    with httpx.Client(base_url=server.url, timeout=30) as client:
        with client.stream("POST", "/v1/chat/completions", json=body) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                got += json.loads(line[6:])["choices"][0]["delta"].get("content", "")
        # keep-alive: the same connection serves the next request
        out = client.post("/v1/chat/completions", json={**body, "stream": False}).json()
    assert done and got == text
    assert out["choices"][0]["message"]["content"] == text


def test_openai_client(server):
    openai = pytest.importorskip("openai")
    text, stats = direct(server, [Message("user", QUESTION)])
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny-pmod"]
    r = client.chat.completions.create(model="tiny-pmod", messages=[{"role": "user", "content": QUESTION}],
                                       temperature=0)
    assert r.choices[0].message.content == text
    assert r.usage.completion_tokens == stats.generated_tokens
    stream = client.chat.completions.create(model="tiny-pmod", messages=[{"role": "user", "content": QUESTION}],
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-pmod", messages=[{"role": "user", "content": QUESTION}],
                                       temperature=-1)
    assert "temperature" in str(e.value)


# ----------------------------------------------------------------------------- images
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=28,
              patch_size=14, num_channels=3, layer_norm_eps=1e-5, hidden_act="quick_gelu", projection_dim=16)


@pytest.fixture(scope="module")
def vision_server(tmp_path_factory):
    """A tiny LLaVA-NeXT p-MoD model (anyres tiles of 28 px: 4 + up to 20 image tokens)."""
    config = tiny_config(vision_config=dict(VISION), mm_projector_type="mlp2x_gelu", mm_hidden_size=32,
                         image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad",
                         image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]])
    path = write_checkpoint(tmp_path_factory.mktemp("vision"), config, random_tensors(config, seed=0),
                            name="tiny-vision")
    write_tiny_tokenizer(path, config.vocab_size)
    httpd, thread = make_server(path, dtype="float32", max_tokens=16, log=Log())
    yield httpd
    httpd.close()
    thread.join(5)


def _data_url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _image_chat(httpd, url, text="what is it ?", **params):
    return chat(httpd, [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}], **params)


def test_image_request_equals_session(vision_server, tmp_path):
    png = _png(40, 24)
    text, stats = direct(vision_server, [Message("user", "<image>\nwhat is it ?", 1)], [png], max_tokens=16)
    assert stats.image_tokens > 4  # the base tile's 4 rows are not routed, the high-res ones are
    status, _, body = _image_chat(vision_server, _data_url(png))
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == text
    assert body["usage"]["prompt_tokens"] == stats.prompt_tokens
    # the same image from a file, as a file: URL and as a path; and streamed
    f = tmp_path / "img.png"
    f.write_bytes(png)
    for url in (f.as_uri(), str(f)):
        assert _image_chat(vision_server, url)[2]["choices"][0]["message"]["content"] == text
    chunks, _ = sse(vision_server, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _data_url(png)}}, {"type": "text", "text": "what is it ?"}]}]})
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text
    # the image matters
    other, _ = direct(vision_server, [Message("user", "<image>\nwhat is it ?", 1)], [_png(24, 40)], max_tokens=16)
    assert other != text


def test_image_errors(vision_server):
    huge = io.BytesIO()  # 64.8 Mpixels, over pmod.image's cap: refused from the header, never decoded
    from PIL import Image

    Image.new("1", (8100, 8000)).save(huge, format="PNG")
    for url, contains in [(_data_url(huge.getvalue()), "pixel"),
                          (_data_url(b"not an image at all"), "not an image"),
                          (_data_url(_png(8, 8)[:60]), "truncated")]:
        status, _, out = _image_chat(vision_server, url)
        assert_error(status, out, 400, "messages", contains)
    assert_error(*_image_chat(vision_server, "data:text/plain;base64,aGVsbG8=")[::2], 400,
                 "messages[0].content[0].image_url", "not an image")
    assert _image_chat(vision_server, _data_url(_png(30, 30)), max_tokens=2)[0] == 200


# ----------------------------------------------------------------------------- the command
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_cli_serves_and_stops_on_ctrl_c(text_model):
    proc = subprocess.Popen(
        [sys.executable, "-m", "pmod", "server", "--model", str(text_model), "--port", "0", "--dtype", "float32",
         "--max-tokens", "4"], stderr=subprocess.PIPE, text=True, cwd=str(Path(__file__).resolve().parents[1]),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # not inherited as ignored
    try:
        seen = []
        while not (seen and "serving" in seen[-1]) and len(seen) < 20:  # skip any warning lines
            seen.append(proc.stderr.readline())
            if not seen[-1]:
                break
        line = seen[-1]
        assert "serving tiny-pmod" in line, "".join(seen) + proc.stderr.read()
        url = re.search(r"http://(\S+):(\d+)/v1", line)
        conn = http.client.HTTPConnection(url[1], int(url[2]), timeout=30)
        conn.request("POST", "/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}]}))
        out = json.loads(conn.getresponse().read())
        conn.close()
        assert out["usage"]["completion_tokens"] <= 4, out
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=20)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "POST /v1/chat/completions 200" in err and "stopping" in err, err


# ----------------------------------------------------------------------------- unit checks
def test_parse_maps_parts_to_markers(tmp_path):
    png = tmp_path / "a.png"
    png.write_bytes(_png(4, 4))
    data = "data:image/png;base64," + base64.b64encode(_png(4, 4)).decode()
    body = {"messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data}},
                                     {"type": "text", "text": "what is it?"}]},
        {"role": "assistant", "content": None},
        {"role": "user", "content": [{"type": "text", "text": "and"},
                                     {"type": "image_url", "image_url": {"url": png.as_uri()}},
                                     {"type": "image_url", "image_url": {"url": str(png)}}]}],
        "stop": "x", "stream": True, "stream_options": {"include_usage": True}}
    r = parse_chat_request(body, Defaults(max_tokens=7, temp=0.5))
    assert r.system == "be brief"
    assert [(m.role, m.text, m.n_images) for m in r.messages] == [
        ("user", "<image>\nwhat is it?", 1), ("assistant", "", 0), ("user", "and\n<image>\n<image>", 2)]
    assert r.images == [_png(4, 4), str(png), str(png)]
    assert (r.max_tokens, r.temp, r.top_p, r.stop, r.stream, r.include_usage) == (7, 0.5, 1.0, ["x"], True, True)
    many = [{"type": "image_url", "image_url": {"url": str(png)}}] * 33
    with pytest.raises(RequestError, match="33 images"):
        parse_chat_request({"messages": [{"role": "user", "content": many}]}, Defaults())
    with pytest.raises(RequestError, match="over the 10-byte limit"):
        parse_chat_request({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": str(png)}}]}]}, Defaults(), max_image_bytes=10)


def test_make_server_checks(tmp_path, text_model):
    with pytest.raises(PmodError, match="not found"):
        make_server(tmp_path / "nope")
    with pytest.raises(PmodError, match="max-tokens"):
        make_server(text_model, max_tokens=0)
    with pytest.raises(PmodError, match="port"):
        make_server(text_model, port=70000)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        with pytest.raises(PmodError, match="cannot listen"):
            make_server(text_model, port=busy.getsockname()[1], dtype="float32", log=Log())
    finally:
        busy.close()


# ----------------------------------------------------------------------------- helpers
def _png(w: int, h: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(w * 1000 + h)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _recv_all(s: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            chunk = s.recv(65536)
        except OSError:
            break
        if not chunk:
            break
        data += chunk
    return data
