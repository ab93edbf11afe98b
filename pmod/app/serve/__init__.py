"""``pmod server``: a local OpenAI-compatible chat server over one :class:`~pmod.app.session.Session`.

Endpoints (the mlx-lm / mlx-vlm server conventions):

- ``POST /v1/chat/completions``: OpenAI chat completions, streamed as server-sent events
  (``chat.completion.chunk`` objects, then ``data: [DONE]``) when ``stream`` is true.
  ``content`` is a string or a list of ``text`` and ``image_url`` parts; an image part becomes
  an ``<image>`` marker at its place and the parts are joined with newlines, so
  ``[image, text]`` is ``"<image>\\n" + text`` as in official LLaVA. Image URLs are
  ``data:image/...;base64,...``, ``file:///abs/path`` or ``/abs/path``; http(s) URLs are refused
  (the server makes no network requests). ``system`` (or ``developer``) messages replace the
  default system line. ``model`` is not checked: one model is served.
- ``GET /v1/models`` (and ``/v1/models/<id>``): the served model, id = its directory name.
- ``GET /health``: ``{"status": "ok"}``.

Every model call runs on one compute thread (MLX state stays on one thread). Where the engine
batches (``Engine.batches``: MLX), up to ``--max-batch`` requests decode together (continuous
batching: a request joins after its prefill, between decode steps, and leaves when it ends);
elsewhere requests run one at a time, in arrival order, and other clients wait in the queue.
A conversation cache (``--prompt-cache-bytes``) resumes a request that extends a recent one
from its KV state, and a vision-feature cache (``--vision-cache-bytes``) skips the vision tower
for an image seen recently (:mod:`pmod.app.caches`). Bad requests get HTTP 400 with an
OpenAI error body (``{"error": {"message", "type", "param", "code"}}``) and the server keeps
serving; bodies over the limit get 413; internal errors 500 (traceback on stderr). A client
that goes away stops its generation. One line per request is logged to stderr.

Only the standard library serves HTTP; no runtime is imported until the model is opened.

Layout: :mod:`~pmod.app.serve.openai` checks requests and builds responses (images in
:mod:`~pmod.app.serve.images`, refusals in :mod:`~pmod.app.serve.errors`);
:mod:`~pmod.app.serve.handler` serves HTTP; :mod:`~pmod.app.serve.server` admits jobs to the
compute thread of :mod:`~pmod.app.serve.compute`; this module opens the model and starts serving.
"""

from __future__ import annotations

import threading
from pathlib import Path

from pmod.app.generate import SamplerArgs
from pmod.app.serve.compute import Compute
from pmod.app.serve.openai import MAX_BODY_BYTES, Defaults, is_int
from pmod.app.caches import DEFAULT_PROMPT_CACHE_BYTES, DEFAULT_VISION_CACHE_BYTES, check_bytes
from pmod.app.serve.server import DEFAULT_MAX_BATCH, MAX_QUEUE, ChatServer, ChatServer6
from pmod.errors import PmodError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def model_id_of(model_dir) -> str:
    return Path(model_dir).resolve().name


def make_server(model_dir, host: str = DEFAULT_HOST, port: int = 0, backend: str = "mlx",
                dtype: str | None = None, *, max_tokens: int = 256, temp: float = 0.0, top_p: float = 1.0,
                seed: int | None = None, max_body: int = MAX_BODY_BYTES, max_queue: int = MAX_QUEUE,
                session=None, log=None, start: bool = True, adapter_path=None, chat_template: bool = False,
                retention: float | None = None, prompt_cache_bytes: int = DEFAULT_PROMPT_CACHE_BYTES,
                vision_cache_bytes: int = DEFAULT_VISION_CACHE_BYTES,
                max_batch: int = DEFAULT_MAX_BATCH) -> tuple[ChatServer, threading.Thread | None]:
    """Open the model and bind ``host:port`` (0 picks a free port); serve in a daemon thread.

    Returns ``(httpd, thread)``; ``httpd.url`` is the base URL, ``httpd.close()`` stops it.
    ``session``: a factory ``() -> Session`` run on the compute thread instead of opening
    ``model_dir`` (the model is always created on that thread). ``start=False`` returns the
    server unstarted (thread None), for :func:`serve`.
    """
    defaults = Defaults(max_tokens, temp, top_p, seed)
    if not is_int(max_tokens) or max_tokens < 1:
        raise PmodError(f"--max-tokens must be >= 1, got {max_tokens}")
    SamplerArgs(temp, top_p, seed)  # checks the defaults
    if seed is not None and seed < 0:
        raise PmodError(f"--seed must be >= 0, got {seed}")
    check_bytes(prompt_cache_bytes, "prompt_cache_bytes")  # the CLI words them --prompt-cache-bytes ...
    check_bytes(vision_cache_bytes, "vision_cache_bytes")
    if not is_int(max_batch) or max_batch < 1:
        raise PmodError(f"--max-batch must be >= 1, got {max_batch}")
    if not (is_int(port) and 0 <= port <= 65535):
        raise PmodError(f"--port must be in 0..65535, got {port}")
    if not model_dir or not Path(model_dir).is_dir():
        raise PmodError(f"model directory {model_dir} not found: pass a pmod checkpoint directory")

    def open_it():
        if session is not None:
            return session()
        from pmod.app.session import open_session

        kwargs = {"adapter_path": adapter_path} if adapter_path else {}
        return open_session(model_dir, backend=backend, dtype=dtype, chat_template=chat_template,
                            retention=retention, prompt_cache_bytes=prompt_cache_bytes,
                            vision_cache_bytes=vision_cache_bytes, **kwargs)

    sess = Compute.get().call(open_it)
    cls = ChatServer6 if ":" in host else ChatServer
    try:
        httpd = cls((host, port), sess, model_id_of(model_dir), defaults, max_body=max_body,
                    max_queue=max_queue, log=log, max_batch=max_batch)
    except OSError as e:
        raise PmodError(f"cannot listen on {host}:{port} ({e.strerror or e}): pick another --port or --host") \
            from None
    if not start:
        return httpd, None
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1},
                              name="pmod-server", daemon=True)
    thread.start()
    return httpd, thread


def serve(model_dir, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, backend: str = "mlx",
          dtype: str | None = None, **kwargs) -> None:
    """Serve until interrupted (Ctrl-C)."""
    httpd, _ = make_server(model_dir, host, port, backend, dtype, start=False, **kwargs)
    if host not in LOOPBACK:
        httpd.log(f"warning: listening on {host}, not loopback: anyone who can reach it can use the "
                  "model (no authentication)")
    httpd.log(f"serving {httpd.model_id} ({backend}) at {httpd.url}/v1 (Ctrl-C stops)")
    for line in httpd.describe():
        httpd.log(line)
    try:
        httpd.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        httpd.log("stopping")
    finally:
        httpd.close()


def run_server(args) -> None:
    """``pmod server``: args has ``model, host, port, backend, dtype`` (+ ``max_tokens, temp, top_p, seed``)."""
    serve(args.model, host=getattr(args, "host", DEFAULT_HOST), port=getattr(args, "port", DEFAULT_PORT),
          backend=getattr(args, "backend", "mlx"), dtype=getattr(args, "dtype", None),
          max_tokens=getattr(args, "max_tokens", 256), temp=getattr(args, "temp", 0.0),
          top_p=getattr(args, "top_p", 1.0), seed=getattr(args, "seed", None),
          adapter_path=getattr(args, "adapter_path", None), chat_template=getattr(args, "chat_template", False),
          retention=getattr(args, "retention", None),
          prompt_cache_bytes=getattr(args, "prompt_cache_bytes", DEFAULT_PROMPT_CACHE_BYTES),
          vision_cache_bytes=getattr(args, "vision_cache_bytes", DEFAULT_VISION_CACHE_BYTES),
          max_batch=getattr(args, "max_batch", DEFAULT_MAX_BATCH))
