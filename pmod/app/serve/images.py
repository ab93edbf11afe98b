"""Image URLs in a chat request: the bytes of a ``data:`` URL or the path of a local file.

The server makes no network requests, so http(s) URLs are refused with a message saying what
to send instead; a file must be given by an absolute path (``file:///abs/path`` or ``/abs/path``)
and stay under the body limit, as a data URL would.
"""

from __future__ import annotations

import base64
import binascii
import os
import urllib.parse

from pmod.app.serve.errors import RequestError, short


def image_source(url, where: str, max_bytes: int):
    """A data: URL's bytes or a local file's absolute path; anything else is a RequestError."""
    if not isinstance(url, str) or not url:
        raise RequestError(f"{where} must be an object with a 'url' string", where)
    head = url[:16].lower()
    if head.startswith("data:"):
        meta, sep, data = url.partition(",")
        parts = meta[5:].lower().split(";")
        if not sep or "base64" not in parts[1:]:
            raise RequestError(f"{where}: a data URL must be base64 (data:image/png;base64,...)", where)
        if parts[0] and not parts[0].startswith("image/"):
            raise RequestError(f"{where}: data URL type {short(parts[0])} is not an image", where)
        try:
            raw = base64.b64decode("".join(data.split()), validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(f"{where}: the data URL is not valid base64", where) from None
        if not raw:
            raise RequestError(f"{where}: the data URL holds no image bytes", where)
        return raw
    if head.startswith(("http://", "https://")):
        raise RequestError(f"{where}: remote image URLs are not fetched (the server makes no network "
                           "requests): send the image as a base64 data: URL or a local file path", where)
    if head.startswith("file:"):
        parsed = urllib.parse.urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise RequestError(f"{where}: file URL host {short(parsed.netloc)} is not local", where)
        path = urllib.parse.unquote(parsed.path)
    elif url.startswith("/"):
        path = url
    else:
        scheme = url.split(":", 1)[0] if ":" in url else ""
        raise RequestError(f"{where}: unsupported image URL{' scheme ' + repr(scheme) if scheme else ''}: "
                           "use data:image/...;base64,..., file:///abs/path or /abs/path", where)
    if not os.path.isabs(path):
        raise RequestError(f"{where}: image file paths must be absolute, got {short(path)}", where)
    if not os.path.isfile(path):
        raise RequestError(f"{where}: image file {short(path)} not found (or not a file)", where)
    size = os.path.getsize(path)
    if size > max_bytes:
        raise RequestError(f"{where}: image file {short(path)} is {size} bytes, over the {max_bytes}-byte limit",
                           where)
    return path
