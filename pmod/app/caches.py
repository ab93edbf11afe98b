"""What a session keeps between requests: image features, and the KV state of recent conversations.

Both are LRUs bounded in bytes (:class:`ByteLRU`); a limit of 0 turns one off.

* :class:`VisionCache`: the projected features of an image, by a hash of its preprocessed pixels,
  so a chat that re-sends its image every turn runs the vision tower once; and the preprocessed
  image, by a hash of its encoded bytes, so it is not decoded and resized again either.
* :class:`PromptCache`: saved engine contexts (``pmod.engine.Context``), each with the prompt
  it holds as units (:class:`Unit`: text tokens and whole image blocks). A new prompt resumes from the
  longest exact prefix a saved context has (:meth:`PromptCache.lookup`) and prefills only the rest.

Exactness (the answer with the cache is the answer without it): a MoD layer routes the vision
tokens of one prefill call together, keeping the top ``k`` of all of them, so the KV state of a
prefix equals a fresh run of that prefix only where the prefix's vision tokens were routed as one
group that ends inside it. Without a cache the whole prompt is one prefill, routing all its
images together; resuming at ``L`` then prefilling the rest is exact iff the prefix holds no vision
token, or the rest holds none and the prefix's vision tokens were routed as one group within
``[0, L)``. An image block is one unit, so a cut never splits one.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from pmod.engine import Context
from pmod.errors import BadSetting

DEFAULT_PROMPT_CACHE_BYTES = 1 << 30
DEFAULT_VISION_CACHE_BYTES = 256 << 20


def check_bytes(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadSetting(f"{{{name}}} must be a whole number of bytes >= 0 (0 turns the cache off), got {value!r}", name)
    return value


class ByteLRU:
    """Values with a size in bytes; the least recently used leave once the total passes ``limit``.
    A value larger than the limit is not kept. ``peak`` is the most bytes ever held."""

    def __init__(self, limit: int):
        self.limit = limit
        self.items: OrderedDict = OrderedDict()  # key -> (value, nbytes)
        self.bytes = self.peak = self.hits = self.misses = 0

    def get(self, key):
        if key not in self.items:
            self.misses += 1
            return None
        self.hits += 1
        self.items.move_to_end(key)
        return self.items[key][0]

    def put(self, key, value, nbytes: int) -> None:
        self.discard(key)
        if nbytes > self.limit:
            return
        while self.items and self.bytes + nbytes > self.limit:
            self.discard(next(iter(self.items)))
        self.items[key] = (value, nbytes)
        self.bytes += nbytes
        self.peak = max(self.peak, self.bytes)

    def discard(self, key) -> None:
        if key in self.items:
            self.bytes -= self.items.pop(key)[1]

    def clear(self) -> None:
        self.items.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self.items)


def image_key(image) -> str:
    """A hash of a preprocessed image (``pmod.image.ImageInput``): its pixels and packing plan."""
    h = hashlib.sha256()
    for a in (image.pixel_values, image.plan):
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.data)
    h.update(str(image.base_tokens).encode())
    return h.hexdigest()


def source_key(source) -> tuple | None:
    """What identifies an encoded image without decoding it: a hash of its bytes (a data URL's,
    or a local file's contents); None for anything else (a PIL image, an array: those are
    prepared each time)."""
    if isinstance(source, (str, os.PathLike)):
        try:
            with open(source, "rb") as f:
                source = f.read()
        except OSError:
            return None  # preprocessing says what is wrong with it
    if isinstance(source, (bytes, bytearray)):
        return ("encoded", hashlib.sha256(source).hexdigest())
    return None


class VisionCache(ByteLRU):
    """Projected image features by :func:`image_key`, and the preprocessed images of encoded
    sources by :func:`source_key`, under one byte limit."""

    def prepared(self, source, prepare):
        """``prepare(source)`` (the decoded, preprocessed ``pmod.image.ImageInput``), reused for the
        same encoded bytes, sent or in a file: an image a client re-sends every turn is
        neither decoded nor resized again (LLaVA-NeXT's any-resolution tiles are the costly part)."""
        key = source_key(source)
        if key is None:
            return prepare(source)
        image = self.get(key)
        if image is None:
            image = prepare(source)
            self.put(key, image, int(np.asarray(image.pixel_values).nbytes + np.asarray(image.plan).nbytes))
        return image

    def features(self, image, encode) -> np.ndarray:
        """``image``'s features, from the cache or from ``encode(image)`` (then kept)."""
        key = image_key(image)
        feats = self.get(key)
        if feats is None:
            feats = encode(image)
            self.put(key, feats, feats.nbytes)
        return feats


@dataclass(frozen=True)
class ImageUnit:
    """One image's token block in a prompt: routed as a whole, never cut."""

    key: str
    tokens: int


Unit = int | ImageUnit  # a text token id, or an image block


def unit_tokens(units) -> int:
    return sum(u.tokens if isinstance(u, ImageUnit) else 1 for u in units)


@dataclass(eq=False)
class Saved:
    """A saved context and what it holds: ``units`` (its tokens in order) and ``groups``, the
    position ranges ``(start, end)`` of the vision tokens each prefill call routed together."""

    units: tuple
    context: Context
    groups: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class Resume:
    """Where a prompt resumes: the saved entry, the cut position and how many units it covers."""

    saved: Saved
    position: int
    units: int


def exact_cut(groups: list[tuple[int, int]], cut: int, rest_has_vision: bool) -> bool:
    """Whether resuming at ``cut`` then prefilling the rest equals one fresh prefill (module docstring)."""
    before = [g for g in groups if g[0] < cut]
    if not before:
        return True
    return not rest_has_vision and len(before) == 1 and before[0][1] <= cut


class PromptCache(ByteLRU):
    """Saved contexts (:class:`Saved`), by their units; bytes are the contexts' KV bytes."""

    def lookup(self, units: list) -> Resume | None:
        """The longest exact prefix of ``units`` a saved context holds, leaving at least one token
        to prefill (the next logits come from it); None when none is worth resuming."""
        best = None
        for key, (saved, _) in self.items.items():
            n = _common(saved.units, units)
            while n > 0:
                cut = unit_tokens(units[:n])
                rest = units[n:]
                if rest and exact_cut(saved.groups, cut, any(isinstance(u, ImageUnit) for u in rest)):
                    break
                n -= 1
            if n and (best is None or n > best.units):
                best = Resume(saved, unit_tokens(units[:n]), n)
        if best is None:
            self.misses += 1
            return None
        self.hits += 1
        self.items.move_to_end(best.saved.units)
        return best

    def save(self, saved: Saved) -> None:
        """Keep ``saved``; a saved context whose units it extends is dropped (this one holds it all)."""
        for key in [k for k in self.items if len(k) <= len(saved.units) and saved.units[:len(k)] == k]:
            self.discard(key)
        self.put(saved.units, saved, saved.context.nbytes)


def _common(a: tuple, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
