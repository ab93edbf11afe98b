"""A load generator for ``pmod server``: ``python scripts/serve_bench.py`` (localhost only, bounded).

It starts servers in this process on a free 127.0.0.1 port and measures, over HTTP with
streaming, what a client sees:

* ``chat``: a 5-turn conversation whose first turn carries an image (on a model with a vision
  tower; a long text otherwise, ``--context-sentences``), each request re-sending the whole conversation as an OpenAI
  client does: time to first token per turn (a one-token request's latency, taken before the
  turn's reply), with the caches on and off (each server warmed by one request first, its
  caches then emptied).
* ``load``: ``--clients`` concurrent clients, ``--requests`` each, ``--max-tokens`` per reply, on
  a batching server and on a one-at-a-time one (``--max-batch 1``): aggregate tokens/s and
  p50/p95 request latency.
* the caches' peak bytes against their limits.

Every request has a timeout, the runs a request count; the servers close when it ends.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import statistics
import sys
import threading
import time
from pathlib import Path

from pmod.errors import PmodError

TURNS = ["what is in the picture ?", "what colour is the circle ?", "how many shapes are there ?",
         "is the square left of the circle ?", "and the triangle ?"]


def _stream(url: str, body: dict, timeout: float) -> tuple[float, float, str, dict]:
    """POST a streamed chat request: (seconds to the first content piece, total seconds, text, usage)."""
    host, port = url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    t0 = time.perf_counter()
    try:
        conn.request("POST", "/v1/chat/completions", headers={"Content-Type": "application/json"},
                     body=json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}}))
        resp = conn.getresponse()
        if resp.status != 200:
            raise PmodError(f"the server answered {resp.status}: {resp.read()[:200].decode(errors='replace')}")
        first, text, usage = None, "", {}
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for choice in chunk["choices"]:
                piece = choice["delta"].get("content")
                if piece:
                    first = first if first is not None else time.perf_counter() - t0
                    text += piece
        return (first if first is not None else time.perf_counter() - t0), time.perf_counter() - t0, text, usage
    finally:
        conn.close()


def _image_url(model_dir) -> str | None:
    """A data URL of one shapes image when the model takes images, else None."""
    from pmod.format import read_config

    if read_config(model_dir).vision_config is None:
        return None
    from pmod.tasks import shapes

    buf = io.BytesIO()
    shapes.make_samples("demo", 1, seed=0)[0].image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _server(model, args, **kwargs):
    from pmod.app.serve import make_server

    httpd, _ = make_server(model, port=0, backend=args.backend, dtype=args.dtype, log=io.StringIO(), **kwargs)
    return httpd


def run_chat(model, args, caches: bool) -> list[dict]:
    """The 5-turn chat: per turn, time to first token and the tokens resumed from the cache."""
    off = {} if caches else dict(prompt_cache_bytes=0, vision_cache_bytes=0)
    httpd = _server(model, args, **off)
    image, messages, rows = _image_url(model), [], []
    try:
        # a running server is warm: one untimed request first, then the caches emptied
        _stream(httpd.url, dict(messages=[{"role": "user", "content": "hello"}], max_tokens=2), args.timeout)
        httpd.call(lambda s: [c.clear() for c in (s.prompt_cache, s.vision_cache) if c is not None])
        for i, question in enumerate(TURNS):
            if i:
                content = question
            elif image is None:  # a text-only model: a long first message stands in for the image
                content = " ".join(TURNS[j % len(TURNS)] for j in range(args.context_sentences)) + " " + question
            else:
                content = [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": question}]
            messages.append({"role": "user", "content": content})
            # time to the first token: the whole of a one-token request (its first piece may be
            # empty text, e.g. a random model's), then the turn's reply itself, untimed
            _, ttft, _, usage = _stream(httpd.url, dict(messages=messages, max_tokens=1), args.timeout)
            _, _, text, _ = _stream(httpd.url, dict(messages=messages, max_tokens=args.chat_tokens, temperature=0),
                                    args.timeout)
            messages.append({"role": "assistant", "content": text})
            rows.append(dict(turn=i + 1, ttft_s=ttft, prompt_tokens=usage.get("prompt_tokens"),
                             cached_tokens=(usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)))
        s = httpd.session
        rows.append(dict(caches={name: None if c is None else dict(limit=c.limit, peak=c.peak, bytes=c.bytes)
                                 for name, c in (("prompt", s.prompt_cache), ("vision", s.vision_cache))}))
    finally:
        httpd.close()
    return rows


def run_load(model, args, max_batch: int) -> dict:
    """``args.clients`` clients at once, ``args.requests`` requests each: throughput and latency."""
    httpd = _server(model, args, max_batch=max_batch, max_queue=max(64, args.clients * 2))
    image = _image_url(model)
    latencies, tokens, errors = [], [], []
    lock = threading.Lock()

    def client(c: int):
        for r in range(args.requests):
            text = f"{TURNS[(c + r) % len(TURNS)]} ({c}.{r})"
            content = text if image is None else [{"type": "image_url", "image_url": {"url": image}},
                                                  {"type": "text", "text": text}]
            try:
                body = dict(messages=[{"role": "user", "content": content}], max_tokens=args.max_tokens,
                            temperature=0, ignore_eos=True)  # every reply max_tokens long
                _, total, _, usage = _stream(httpd.url, body, args.timeout)
            except (OSError, PmodError) as e:
                with lock:
                    errors.append(str(e))
                continue
            with lock:
                latencies.append(total)
                tokens.append(usage.get("completion_tokens", 0))

    try:
        threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(args.clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(args.timeout * args.requests)
        wall = time.perf_counter() - t0
        peak = httpd._batcher.peak if httpd._batcher is not None else 1
    finally:
        httpd.close()
    if errors:
        raise PmodError(f"{len(errors)} request(s) failed, e.g. {errors[0]}")
    q = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else latencies * 19
    return dict(max_batch=max_batch, requests=len(latencies), tokens=sum(tokens), wall_s=wall,
                tok_s=sum(tokens) / wall, p50_s=statistics.median(latencies), p95_s=q[18], peak_batch=peak)


def format_report(doc: dict) -> str:
    lines = [f"# pmod server under load: {doc['model']} ({doc['backend']}), {doc['clients']} clients x "
             f"{doc['requests']} requests, {doc['max_tokens']} tokens each", "",
             "| turn | TTFT, caches on (ms) | TTFT, caches off (ms) | cached tokens | prompt tokens |",
             "|---:|---:|---:|---:|---:|"]
    on, off = doc["chat"]["on"], doc["chat"]["off"]
    for a, b in zip(on, off):
        if "turn" in a:
            lines.append(f"| {a['turn']} | {1e3 * a['ttft_s']:.0f} | {1e3 * b['ttft_s']:.0f} | {a['cached_tokens']} | "
                         f"{a['prompt_tokens']} |")
    first = on[0]["ttft_s"]
    later = max(a["ttft_s"] for a in on if "turn" in a and a["turn"] > 1)
    lines += ["", f"slowest of turns 2-5 with the caches: {100 * later / first:.0f}% of turn 1", "",
              "| server | requests | tokens | wall (s) | tokens/s | p50 (s) | p95 (s) | most decoding together |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in (("one at a time", doc["load"]["serial"]), (f"batched (up to {doc['max_batch']})", doc["load"]["batched"])):
        lines.append(f"| {name} | {r['requests']} | {r['tokens']} | {r['wall_s']:.1f} | {r['tok_s']:.1f} | "
                     f"{r['p50_s']:.2f} | {r['p95_s']:.2f} | {r['peak_batch']} |")
    ratio = doc["load"]["batched"]["tok_s"] / doc["load"]["serial"]["tok_s"]
    lines += ["", f"batched / one at a time: {ratio:.2f}x aggregate tokens/s", ""]
    for name, c in on[-1]["caches"].items():
        lines.append(f"{name} cache: " + ("off" if c is None else
                                           f"peak {c['peak'] / 2**20:.2f} MiB of {c['limit'] / 2**20:.0f} MiB"))
    return "\n".join(lines)


def main(argv=None) -> int:
    from pmod.app.bench.presets import RANDOM_PRESETS, preset_checkpoint

    p = argparse.ArgumentParser(prog="serve_bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a pmod checkpoint directory (default: the embedded model)")
    p.add_argument("--preset", choices=RANDOM_PRESETS, help="a random-weight preset instead (text only)")
    p.add_argument("--backend", default="mlx")
    p.add_argument("--dtype", default=None)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=2, help="requests per client")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--chat-tokens", type=int, default=16, help="reply tokens per chat turn")
    p.add_argument("--context-sentences", type=int, default=100,
                   help="a text-only model's first chat turn: this many sentences before the question")
    p.add_argument("--timeout", type=float, default=300, help="seconds per request")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    if min(args.clients, args.requests, args.max_tokens, args.max_batch, args.chat_tokens) < 1:
        print("serve_bench.py: error: --clients, --requests, --max-tokens, --max-batch, --chat-tokens must be >= 1",
              file=sys.stderr)
        return 2
    try:
        if args.preset:
            model = preset_checkpoint(args.preset, args.dtype)
            _tokenizer_for(model)
        else:
            from pmod.app.models import resolve_model

            model = resolve_model(args.model)
        doc = dict(model=str(model), backend=args.backend, clients=args.clients, requests=args.requests,
                   max_tokens=args.max_tokens, max_batch=args.max_batch,
                   chat=dict(on=run_chat(model, args, True), off=run_chat(model, args, False)),
                   load=dict(serial=run_load(model, args, 1), batched=run_load(model, args, args.max_batch)))
    except PmodError as e:
        print(f"serve_bench.py: error: {e}", file=sys.stderr)
        return 2
    print(format_report(doc))
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


def _tokenizer_for(model: Path) -> None:
    """A random preset has no tokenizer: give it the embedded model's (its vocabulary is larger)."""
    import shutil

    from pmod.app.models import resolve_model
    from pmod.format import TOKENIZER_FILES

    src = resolve_model(None)
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and not (model / name).is_file():
            shutil.copy2(src / name, model / name)
