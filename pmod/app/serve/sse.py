"""Server-sent events on one HTTP response: ``data: <json>`` events, as OpenAI streams a reply.

On HTTP/1.1 the events are chunk-framed, so the connection can be kept alive after the stream;
an HTTP/1.0 client has no chunked encoding, so its stream ends when the connection closes.
"""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler


class EventStream:
    """Sends the event-stream headers at once; then :meth:`event` per object and :meth:`end` once."""

    def __init__(self, handler: BaseHTTPRequestHandler):
        self.wfile = handler.wfile
        self.chunked = handler.request_version != "HTTP/1.0"
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream; charset=utf-8")
        handler.send_header("Cache-Control", "no-cache")
        if self.chunked:
            handler.send_header("Transfer-Encoding", "chunked")
        else:
            handler.close_connection = True
            handler.send_header("Connection", "close")
        handler.end_headers()

    def event(self, obj: dict) -> None:
        self._send(b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n")

    def end(self) -> None:
        """OpenAI's closing ``data: [DONE]`` event, then the end of a chunked body."""
        self._send(b"data: [DONE]\n\n")
        if self.chunked:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

    def _send(self, data: bytes) -> None:
        if self.chunked:
            data = f"{len(data):x}\r\n".encode() + data + b"\r\n"
        self.wfile.write(data)
        self.wfile.flush()

