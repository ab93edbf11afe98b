"""The OpenAI chat-completions schema as this server speaks it: requests in, responses out.

:func:`parse_chat_request` checks a ``/v1/chat/completions`` body into a :class:`ChatRequest`
before it queues, naming the bad field in a :class:`~pmod.app.serve.errors.RequestError`; the
builders below write the ``chat.completion``, ``chat.completion.chunk`` and ``model`` objects.
Nothing here touches a socket or the model.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from pmod import prompt
from pmod.app.serve.errors import RequestError, short
from pmod.app.serve.images import image_source
from pmod.errors import PmodError

MAX_BODY_BYTES = 32 * 1024 * 1024  # a request body (base64 images included)
MAX_STOP = 16
MAX_IMAGES = 32  # per request (each one is decoded, up to pmod.image's pixel cap)


# ================================================================== requests
@dataclass
class ChatRequest:
    messages: list[prompt.Message]
    images: list  # bytes (data URLs) or absolute paths, in marker order
    system: str | None
    max_tokens: int
    temp: float
    top_p: float
    seed: int | None
    stop: list[str]
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False  # vLLM's extension: decode max_tokens whatever (load generators)


@dataclass
class Defaults:
    """The server's sampling defaults, for the fields a request leaves out."""

    max_tokens: int = 256
    temp: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


def parse_json(raw: bytes) -> Any:
    """A request body as JSON; ``NaN`` and ``Infinity`` are refused (they are not JSON numbers)."""
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        raise RequestError(f"the request body is not valid JSON ({e})".split("\n")[0]) from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(body: dict, key: str, default: float) -> float:
    v = body.get(key)
    if v is None:
        return default
    try:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    except OverflowError:
        ok = False
    if not ok:
        raise RequestError(f"'{key}' must be a number, got {short(v)}", key)
    return float(v)


def parse_chat_request(body: Any, defaults: Defaults, max_image_bytes: int = MAX_BODY_BYTES) -> ChatRequest:
    """Check a ``/v1/chat/completions`` body; raise :class:`RequestError` naming the bad field.

    Fields are checked in a fixed order (model, sampling and limits, streaming, then the
    messages), so a body with several bad fields always gets the same error.
    """
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError(f"'model' must be a string, got {short(model)}", "model")
    max_tokens = _max_tokens(body, defaults.max_tokens)
    temp = _number(body, "temperature", defaults.temp)
    if temp < 0:
        raise RequestError(f"'temperature' must be >= 0, got {temp:g}", "temperature")
    top_p = _number(body, "top_p", defaults.top_p)
    if not 0 < top_p <= 1:
        raise RequestError(f"'top_p' must be in (0, 1], got {top_p:g}", "top_p")
    seed = body.get("seed", defaults.seed)
    if seed is None:
        seed = defaults.seed
    if seed is not None and (not is_int(seed) or seed < 0):
        raise RequestError(f"'seed' must be an integer >= 0, got {short(seed)}", "seed")
    n = body.get("n")
    if n is not None and n != 1:
        raise RequestError(f"'n' must be 1 (one choice per request), got {short(n)}", "n")
    stop = _stop(body)
    stream, include_usage = _stream(body)
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise RequestError(f"'ignore_eos' must be true or false, got {short(ignore_eos)}", "ignore_eos")
    messages, images, system = _conversation(body.get("messages"), max_image_bytes)
    return ChatRequest(messages=messages, images=images, system=system,
                       max_tokens=max_tokens, temp=temp, top_p=top_p, seed=seed, stop=stop,
                       stream=stream, include_usage=include_usage, ignore_eos=ignore_eos)


def _max_tokens(body: dict, default: int) -> int:
    """``max_completion_tokens`` (the current name) or else ``max_tokens`` (the older one)."""
    for key in ("max_completion_tokens", "max_tokens"):
        v = body.get(key)
        if v is None:
            continue
        if not is_int(v) or v < 1:
            raise RequestError(f"'{key}' must be an integer >= 1, got {short(v)}", key)
        return v
    return default


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise RequestError(f"'stop' must be a string or a list of strings, got {short(stop)}", "stop")
    if len(stop) > MAX_STOP:
        raise RequestError(f"'stop' has {len(stop)} strings, more than {MAX_STOP}", "stop")
    return [s for s in stop if s]


def _stream(body: dict) -> tuple[bool, bool]:
    """``(stream, stream_options.include_usage)``."""
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise RequestError(f"'stream' must be true or false, got {short(stream)}", "stream")
    include_usage = False
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise RequestError("'stream_options' must be an object", "stream_options")
        include_usage = opts.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise RequestError("'stream_options.include_usage' must be true or false",
                               "stream_options.include_usage")
    return stream, include_usage


def _conversation(raw, max_image_bytes: int) -> tuple[list[prompt.Message], list, str | None]:
    """``(messages, images, system)``: the user/assistant turns, their images, the joined system text."""
    if not isinstance(raw, list) or not raw:
        raise RequestError("'messages' must be a non-empty list of {role, content} objects", "messages")
    messages, images, system = [], [], []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(f"{where} must be an object with 'role' and 'content'", where)
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise RequestError(f"{where}.role {short(role)} is not supported: use system, user or assistant",
                               f"{where}.role")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""  # e.g. a tool-call turn: no text to replay
        text, imgs = _parse_content(content, f"{where}.content", max_image_bytes)
        if role != "user" and (imgs or prompt.IMAGE in text):
            raise RequestError(f"{where}: only user messages can hold images", f"{where}.content")
        if role in ("system", "developer"):
            system.append(text)
        else:
            messages.append(prompt.Message(role, text, len(imgs)))
            images.extend(imgs)
    if len(images) > MAX_IMAGES:
        raise RequestError(f"the request has {len(images)} images, more than {MAX_IMAGES}", "messages")
    if not messages or messages[-1].role != "user":
        raise RequestError("'messages' must end with a user message", "messages")
    try:  # marker counts and roles, before the request queues
        prompt.render(messages)
    except PmodError as e:
        raise RequestError(str(e), "messages") from None
    return messages, images, "\n".join(system) if system else None


def _parse_content(content, where: str, max_image_bytes: int) -> tuple[str, list]:
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise RequestError(f"{where} must be a string or a list of content parts", where)
    pieces, images = [], []
    for j, part in enumerate(content):
        pw = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("text", "input_text"):
            text = part.get("text")
            if not isinstance(text, str):
                raise RequestError(f"{pw}.text must be a string", f"{pw}.text")
            pieces.append(text)
        elif kind in ("image_url", "input_image"):
            url = part.get("image_url")
            if isinstance(url, dict):
                url = url.get("url")
            images.append(image_source(url, f"{pw}.image_url", max_image_bytes))
            pieces.append(prompt.IMAGE)
        else:
            raise RequestError(f"{pw} must be a {{'type': 'text'}} or {{'type': 'image_url'}} part, "
                               f"got type {short(kind)}", pw)
    return "\n".join(pieces), images


# ================================================================== responses
def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def model_card(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "pmod"}


def finish_and_usage(stats) -> tuple[str, dict]:
    """A reply's OpenAI ``finish_reason`` (a full context counts as ``length``) and ``usage``."""
    finish = "length" if stats.finish_reason in ("length", "context") else "stop"
    prompt = stats.prompt_tokens + stats.resumed_tokens  # the whole prompt, however much was cached
    usage = {"prompt_tokens": prompt, "completion_tokens": stats.generated_tokens,
             "total_tokens": prompt + stats.generated_tokens}
    if stats.resumed_tokens:
        usage["prompt_tokens_details"] = {"cached_tokens": stats.resumed_tokens}  # OpenAI's field
    return finish, usage


def completion(model_id: str, text: str, finish: str, usage: dict) -> dict:
    """The ``chat.completion`` object of a reply that was not streamed."""
    return {
        "id": completion_id(), "object": "chat.completion", "created": int(time.time()),
        "model": model_id, "system_fingerprint": None,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "logprobs": None, "finish_reason": finish}],
        "usage": usage,
    }


@dataclass
class Chunks:
    """The ``chat.completion.chunk`` objects of one streamed reply; they share its id and time.

    With ``include_usage`` every chunk carries ``"usage": null`` and :meth:`usage` makes the
    last one, with no choices, as OpenAI sends it.
    """

    model_id: str
    include_usage: bool
    id: str = field(default_factory=completion_id)
    created: int = field(default_factory=lambda: int(time.time()))

    def delta(self, delta: dict, finish: str | None = None) -> dict:
        c = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
             "model": self.model_id, "system_fingerprint": None,
             "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if self.include_usage:
            c["usage"] = None
        return c

    def usage(self, usage: dict) -> dict:
        c = self.delta({})
        c["choices"], c["usage"] = [], usage
        return c
