"""How the server refuses a request: :class:`RequestError`, an HTTP status with an OpenAI error body.

Raised anywhere while a request is handled, before or after it queues; the handler turns it into
the response (or, once a stream has begun, into its last event) and the server keeps serving.
"""

from __future__ import annotations


class RequestError(Exception):
    """A request the server refuses: HTTP status + OpenAI error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def shutting_down() -> RequestError:
    return RequestError("the server is shutting down", status=503, type="server_error")


def internal_error(e: Exception) -> RequestError:
    """A 500 naming the exception in one line (the traceback goes to the log, not the client)."""
    return RequestError(f"internal error: {type(e).__name__}: {e}".split("\n")[0], status=500, type="server_error")


def short(v, limit: int = 80) -> str:
    """``repr(v)`` cut to ``limit`` characters, for error messages that quote a client's value."""
    r = repr(v)
    return r if len(r) <= limit else r[:limit - 3] + "..."
