"""What a server keeps between requests and how it runs them together: the conversation (prefix)
cache, the vision-feature cache and continuous batching, each against a fresh run of the same
request (greedy, float32: token for token)."""

from __future__ import annotations

import base64
import io
import json
import threading
import urllib.request

import pytest

pytest.importorskip("mlx.core")

from builders import random_tensors, tiny_config, write_checkpoint  # noqa: E402
from tiny_tokenizer import write_tiny_tokenizer  # noqa: E402

from pmod.app.caches import ByteLRU, ImageUnit, PromptCache, Saved, exact_cut  # noqa: E402
from pmod.app.generate import Sampler, SamplerArgs  # noqa: E402
from pmod.app.models import resolve_model  # noqa: E402
from pmod.app.serve import make_server  # noqa: E402
from pmod.app.session import Reply, open_session  # noqa: E402
from pmod.engine import Context  # noqa: E402
from pmod.prompt import Message  # noqa: E402

MODEL = resolve_model(None)  # the embedded model: it has a vision tower
CACHES = dict(prompt_cache_bytes=64 << 20, vision_cache_bytes=64 << 20)


def _samples(n=2):
    from pmod.tasks import shapes

    return shapes.make_samples("demo", n, seed=0, questions_per_image=3)


def _ask(session, messages, images, max_tokens=8) -> Reply:
    reply = Reply()
    for _ in session.complete(messages, images, max_tokens=max_tokens, sampler=Sampler(SamplerArgs()), reply=reply):
        pass
    return reply


def _converse(session, turns) -> list[Reply]:
    """An OpenAI client's chat: every request re-sends the whole conversation with its images."""
    messages, images, replies = [], [], []
    for text, imgs in turns:
        messages.append(Message("user", text, len(imgs)))
        images += imgs
        replies.append(_ask(session, messages, list(images)))
        messages.append(Message("assistant", replies[-1].text))
    return replies


@pytest.fixture(scope="module")
def sessions():
    return open_session(MODEL, dtype="float32", **CACHES), open_session(MODEL, dtype="float32")


def test_a_chat_resumes_every_turn_and_answers_as_a_fresh_session(sessions):
    cached, fresh = sessions
    s = _samples(1)[0]
    turns = [(q, [s.image] if i == 0 else []) for i, (_, q, _) in enumerate(s.qa)] + [("and the rest ?", [])]
    got, want = _converse(cached, turns), _converse(fresh, turns)
    assert [r.text for r in got] == [r.text for r in want]
    assert [r.stats.kv_lengths for r in got] == [r.stats.kv_lengths for r in want]
    assert got[0].stats.resumed_tokens == 0
    for r, w in zip(got[1:], want[1:]):  # every later turn prefills only what is new
        full = w.stats.prompt_tokens
        assert r.stats.resumed_tokens + r.stats.prompt_tokens == full and r.stats.prompt_tokens < full / 4
    assert cached.vision_cache.hits == 0  # the image reached the tower once; later turns resumed past it


def test_a_new_image_in_a_later_turn_is_routed_with_the_first(sessions):
    """Turn 2 adds an image: a fresh run routes both images together, so the cache may resume only
    before the first image (a saved context routed it alone), and the answer is still the fresh one."""
    cached, fresh = sessions
    a, b = _samples(2)
    turns = [(a.qa[0][1], [a.image]), (b.qa[0][1], [b.image])]
    got, want = _converse(cached, turns), _converse(fresh, turns)
    assert [r.text for r in got] == [r.text for r in want]
    assert [r.stats.kv_lengths for r in got] == [r.stats.kv_lengths for r in want]
    units, _ = cached._units(cached.render([Message("user", a.qa[0][1], 1)]), [a.image])
    first_image = next(i for i, u in enumerate(units) if isinstance(u, ImageUnit))
    assert 0 < got[1].stats.resumed_tokens <= first_image
    assert cached.vision_cache.hits >= 1  # image a's features came from the cache


def test_a_diverging_request_reuses_only_the_exact_prefix(sessions):
    cached, fresh = sessions
    s = _samples(1)[0]
    q1, q2 = s.qa[0][1], s.qa[1][1]
    _ask(cached, [Message("user", q1, 1)], [s.image])
    edited = [Message("user", q2, 1)]  # the same image, another question after it
    got, want = _ask(cached, edited, [s.image]), _ask(fresh, edited, [s.image])
    assert got.text == want.text and got.stats.kv_lengths == want.stats.kv_lengths
    u1, _ = cached._units(cached.render([Message("user", q1, 1)]), [s.image])
    u2, _ = cached._units(cached.render(edited), [s.image])
    common = next(i for i, (x, y) in enumerate(zip(u1, u2)) if x != y)
    prefix = sum(u.tokens if isinstance(u, ImageUnit) else 1 for u in u2[:common])
    assert got.stats.resumed_tokens == prefix  # through the image (routed alone in both), not a token more


def test_a_resent_encoded_image_is_not_decoded_again(sessions, tmp_path, monkeypatch):
    """Data-URL bytes and files are preprocessed once per content (the answers stay the fresh
    ones); a file rewritten in place with another picture is prepared again."""
    import pmod.image

    cached, fresh = sessions
    calls = []
    real = pmod.image.preprocess
    monkeypatch.setattr(pmod.image, "preprocess", lambda src, *a, **k: calls.append(src) or real(src, *a, **k))
    a, b, c = _samples(3)
    raw = io.BytesIO()
    a.image.save(raw, format="PNG")
    path = tmp_path / "img.png"
    b.image.save(path)
    for src in (raw.getvalue(), str(path)):
        calls.clear()
        turns = [(a.qa[0][1], [src]), ("and then ?", [])]
        got = _converse(cached, turns)
        assert len(calls) == 1  # turn 2 re-sent the same image: taken from the cache
        assert [r.text for r in got] == [r.text for r in _converse(fresh, turns)]
    c.image.save(path)  # another picture under the same name
    calls.clear()
    msg = [Message("user", a.qa[0][1], 1)]
    assert _ask(cached, msg, [str(path)]).text == _ask(fresh, msg, [str(path)]).text and len(calls) == 2


def test_caches_stay_within_their_byte_limits():
    session = open_session(MODEL, dtype="float32", prompt_cache_bytes=1_500_000, vision_cache_bytes=160_000)  # ~2 of each
    samples = _samples(4)
    for s in samples:
        _ask(session, [Message("user", s.qa[0][1], 1)], [s.image], max_tokens=4)
        pc, vc = session.prompt_cache, session.vision_cache
        assert pc.bytes <= pc.limit and vc.bytes <= vc.limit
        assert pc.bytes == sum(n for _, n in pc.items.values())
    assert pc.peak <= pc.limit and vc.peak <= vc.limit and 0 < len(pc) < len(samples)  # evicted, not grown


def test_byte_lru_evicts_the_least_recently_used():
    lru = ByteLRU(10)
    for k in "abc":
        lru.put(k, k, 4)  # c pushes a out
    assert list(lru.items) == ["b", "c"] and lru.bytes == 8
    lru.get("b")
    lru.put("d", "d", 4)  # c is now the oldest
    assert list(lru.items) == ["b", "d"]
    lru.put("e", "e", 11)  # larger than the limit: not kept, nothing evicted
    assert list(lru.items) == ["b", "d"] and lru.peak == 8


def test_exact_cuts_follow_the_routing_groups():
    assert exact_cut([], 5, rest_has_vision=True)
    assert exact_cut([(3, 9)], 3, rest_has_vision=True)  # the image lies after the cut: dropped
    assert exact_cut([(3, 9)], 12, rest_has_vision=False)
    assert not exact_cut([(3, 9)], 12, rest_has_vision=True)  # a fresh run routes both images together
    assert not exact_cut([(3, 9)], 6, rest_has_vision=False)  # inside the block
    assert not exact_cut([(3, 9), (12, 20)], 25, rest_has_vision=False)  # two groups: not one fresh prefill
    cache = PromptCache(1 << 20)
    img = ImageUnit("k", 4)
    cache.save(Saved((1, 2, img, 3, 4), Context(8, [], 100), [(2, 6)]))
    hit = cache.lookup([1, 2, img, 3, 9, 9])
    assert hit.units == 4 and hit.position == 7
    assert cache.lookup([1, 2, img, 3, ImageUnit("j", 2)]).units == 2  # before the image only
    cache.save(Saved((1, 2, img, 3, 4, 5), Context(9, [], 120), [(2, 6)]))
    assert len(cache) == 1 and cache.bytes == 120  # the longer context holds the shorter one


# ----------------------------------------------------------------------------- batching
@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    config = tiny_config()
    path = write_checkpoint(tmp_path_factory.mktemp("serving"), config, random_tensors(config, seed=0), name="tiny")
    write_tiny_tokenizer(path, config.vocab_size)
    return path


def _post(url, body, timeout=60):
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _concurrently(url, bodies, delays):
    out = [None] * len(bodies)

    def one(i):
        threading.Event().wait(delays[i])
        out[i] = _post(url, bodies[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def test_batched_requests_answer_as_each_alone(text_model):
    """Four requests of different lengths and max_tokens: they join while others decode and leave
    at their own ends; each answer equals the same request on a one-at-a-time server."""
    words = "the red circle is left of a blue square and the green one".split()
    bodies = [dict(messages=[{"role": "user", "content": " ".join(words[:n])}], max_tokens=m, temperature=0)
              for n, m in ((3, 24), (9, 6), (5, 16), (12, 10))]
    serial, _ = make_server(text_model, port=0, dtype="float32", max_batch=1, prompt_cache_bytes=0, log=io.StringIO())
    try:
        want = [_post(serial.url, b) for b in bodies]
    finally:
        serial.close()
    log = io.StringIO()
    httpd, _ = make_server(text_model, port=0, dtype="float32", max_batch=4, prompt_cache_bytes=0, log=log)
    try:
        got = _concurrently(httpd.url, bodies, [0, 0, 0.3, 0.6])
        assert httpd._batcher.peak >= 2  # they did decode together
    finally:
        httpd.close()
    for g, w in zip(got, want):
        assert g["choices"][0]["message"] == w["choices"][0]["message"]
        assert g["usage"] == w["usage"] and g["choices"][0]["finish_reason"] == w["choices"][0]["finish_reason"]


def _png(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_batched_image_requests_answer_as_each_alone():
    """Requests with different images (MoD caches of other lengths per row and layer) batched."""
    samples = _samples(3)
    bodies = [dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _png(s.image)}},
                                                          {"type": "text", "text": s.qa[i][1]}]}],
                   max_tokens=6 + 2 * i, temperature=0) for i, s in enumerate(samples)]
    serial, _ = make_server(MODEL, port=0, dtype="float32", max_batch=1, log=io.StringIO())
    try:
        want = [_post(serial.url, b) for b in bodies]
    finally:
        serial.close()
    httpd, _ = make_server(MODEL, port=0, dtype="float32", max_batch=3, log=io.StringIO())
    try:
        got = _concurrently(httpd.url, bodies, [0, 0.05, 0.1])
    finally:
        httpd.close()
    assert [g["choices"][0]["message"]["content"] for g in got] == [w["choices"][0]["message"]["content"] for w in want]


def test_start_up_says_how_requests_run(text_model):
    httpd, _ = make_server(text_model, port=0, dtype="float32", max_batch=4, start=False, log=io.StringIO())
    try:
        lines = httpd.describe()
    finally:
        httpd.close()
    assert lines[0] == "batching: up to 4 requests decode together"
    assert lines[1].startswith("conversation cache: up to 1024 MiB")


def test_onnx_chat_resumes_and_answers_as_a_fresh_session(tmp_path):
    """ONNX Runtime on the CPU resumes too (its KV buffers are host arrays): the same chat, cached
    and fresh, through an export of the embedded model."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("torch")
    from pmod_export.onnx_export import export_onnx

    onnx_dir = export_onnx(MODEL, tmp_path / "onnx")
    cached, fresh = open_session(onnx_dir, backend="onnx", **CACHES), open_session(onnx_dir, backend="onnx")
    assert cached.prompt_cache is not None and not cached.engine.batches
    s = _samples(1)[0]
    turns = [(s.qa[0][1], [s.image]), (s.qa[1][1], []), (s.qa[2][1], [])]
    got, want = _converse(cached, turns), _converse(fresh, turns)
    assert [r.text for r in got] == [r.text for r in want]
    assert [r.stats.kv_lengths for r in got] == [r.stats.kv_lengths for r in want]
    assert all(r.stats.resumed_tokens > 0 for r in got[1:])


# ----------------------------------------------------------------------------- faults
def _stream_first_piece(url, body):
    """Open a streamed request, read up to its first content piece, and leave (the socket closed)."""
    import http.client
    from urllib.parse import urlparse

    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("POST", "/v1/chat/completions", body=json.dumps({**body, "stream": True}),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    while True:
        line = resp.readline().decode()
        if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
            break
    conn.sock.shutdown(2)
    conn.close()


def test_faults_leave_the_batch_going(text_model):
    """A client gone mid-stream frees its row at once; a prompt over the context gets its error;
    a burst beyond the queue gets 503s; the requests decoding meanwhile finish as if alone."""
    import urllib.error

    long_run = dict(messages=[{"role": "user", "content": "the red circle"}], max_tokens=60, temperature=0)
    serial, _ = make_server(text_model, port=0, dtype="float32", max_batch=1, prompt_cache_bytes=0, log=io.StringIO())
    try:
        want = _post(serial.url, long_run)
    finally:
        serial.close()
    httpd, _ = make_server(text_model, port=0, dtype="float32", max_batch=4, max_queue=3, prompt_cache_bytes=0,
                           log=io.StringIO())
    try:
        result = {}
        t = threading.Thread(target=lambda: result.update(r=_post(httpd.url, long_run)))
        t.start()
        _stream_first_piece(httpd.url, {**long_run, "max_tokens": 200})
        too_long = dict(messages=[{"role": "user", "content": "circle " * 5000}], max_tokens=4)
        with pytest.raises(urllib.error.HTTPError) as e:
            _post(httpd.url, too_long)
        assert e.value.code == 400 and "prompt too long" in json.loads(e.value.read())["error"]["message"]
        codes = []

        def burst():
            try:
                _post(httpd.url, long_run)
                codes.append(200)
            except urllib.error.HTTPError as err:
                codes.append(err.code)

        threads = [threading.Thread(target=burst) for _ in range(6)]
        for b in threads:
            b.start()
        for b in threads:
            b.join(120)
        t.join(120)
        assert 503 in codes and 200 in codes
        deadline = threading.Event()
        for _ in range(100):  # the gone client's row left (it would run 200 tokens otherwise)
            if not httpd._batcher.rows and httpd._pending == 0:
                break
            deadline.wait(0.05)
        assert not httpd._batcher.rows and httpd._pending == 0
    finally:
        httpd.close()
    assert result["r"]["choices"][0]["message"] == want["choices"][0]["message"]


def test_load_generator_runs(text_model, tmp_path, capsys):
    """``scripts/serve_bench.py`` end to end, small: both servers, the chat and the load."""
    from pmod.app.bench.serving import main

    out = tmp_path / "serve.json"
    assert main(["--model", str(text_model), "--dtype", "float32", "--clients", "3", "--requests", "1",
                 "--max-tokens", "4", "--chat-tokens", "2", "--context-sentences", "3", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [r["turn"] for r in doc["chat"]["on"] if "turn" in r] == [1, 2, 3, 4, 5]
    assert all(r["cached_tokens"] > 0 for r in doc["chat"]["on"][1:5])
    assert all(r["cached_tokens"] == 0 for r in doc["chat"]["off"][:5])
    for name in ("serial", "batched"):
        assert doc["load"][name]["tokens"] == 3 * 4  # ignore_eos: every reply max_tokens long
    assert "aggregate tokens/s" in capsys.readouterr().out
    assert main(["--clients", "0"]) == 2
