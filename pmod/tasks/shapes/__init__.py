"""A synthetic visual-question task: coloured shapes on light backgrounds, drawn with Pillow.

Used to train small p-MoD models from scratch, by ``pmod demo``, and to build LoRA
finetuning sets for what a model has not seen (a new colour name, shape or question
type). Everything the task knows is a table: ``COLOURS`` / ``EXTRA_COLOURS`` (name -> base
RGB, each drawn with a bounded hue/saturation/brightness jitter), ``SHAPES`` /
``EXTRA_SHAPES``, ``TEMPLATES`` (several phrasings per question) and ``QUESTION_TYPES`` /
``EXTRA_QUESTION_TYPES``. The default task uses the base tables; a caller picks subsets or
adds the extras by name (``colours=``, ``shapes=``, ``types=``).

Beside it in this package: ``demo`` (``pmod demo``), ``train`` (the embedded model from
scratch, in MLX, with ``labels``, ``batches`` and ``losses``) and ``evaluate`` (its accuracy
table); ``scripts/train_default_model.py`` and ``scripts/eval_default_model.py`` run them.

A sample is one image and a few (qtype, question, answer) triples. Every question is
unambiguous for its image: referents are unique ("the star" only when there is one star),
left/right and top/bottom are asked only when the object is clearly off the middle,
relations only when the two objects are clearly apart. Answers are one lowercase word.

Determinism: sample ``i`` of ``(split, seed)`` comes from its own generator,
``SeedSequence(seed, spawn_key=(hash(split), i))``, so it depends on nothing else (the
first ``n`` samples of a longer list are the same) and splits draw disjoint streams.
Changing a subset option changes the samples.

    >>> s = make_samples("train", 2, seed=0)
    >>> s[0].image.size, s[0].qa[0]
    ((96, 96), ('shape', 'what is the shape of the purple object?', 'diamond'))
"""

from __future__ import annotations

import colorsys
import hashlib
import itertools
import math
import re
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw

from pmod.errors import PmodError

# ------------------------------------------------------------------------------ tables


@dataclass(frozen=True)
class Colour:
    """A colour name and how it is drawn: the base RGB's hue moves by up to ``hue``
    degrees, saturation and brightness scale by a factor in ``[1 - sat, 1]`` and
    ``[1 - val, 1]`` (shades and tints of the base, never another colour's hue)."""

    name: str
    rgb: tuple
    hue: float = 5.0
    sat: float = 0.25
    val: float = 0.2

    def sample(self, rng: np.random.Generator) -> tuple:
        h, s, v = colorsys.rgb_to_hsv(*(c / 255.0 for c in self.rgb))
        h = (h + rng.uniform(-self.hue, self.hue) / 360.0) % 1.0
        s = s * rng.uniform(1.0 - self.sat, 1.0)
        v = v * rng.uniform(1.0 - self.val, 1.0)
        return tuple(int(round(c * 255)) for c in colorsys.hsv_to_rgb(h, s, v))


_BASE_COLOURS = (
    Colour("red", (225, 25, 25)),
    Colour("orange", (255, 125, 0), hue=4, sat=0.15, val=0.1),
    Colour("yellow", (245, 220, 10), hue=3, sat=0.15, val=0.08),
    Colour("green", (30, 170, 50)),
    Colour("blue", (30, 80, 225)),
    Colour("purple", (145, 45, 195)),
)
_EXTRA_COLOURS = (
    Colour("pink", (255, 105, 185), hue=4, sat=0.15, val=0.05),
    Colour("cyan", (0, 200, 215), hue=4, sat=0.15, val=0.1),
    Colour("brown", (130, 70, 25), hue=4, sat=0.15, val=0.15),
    Colour("grey", (125, 125, 125), hue=0, sat=0, val=0.15),
    Colour("black", (25, 25, 25), hue=0, sat=0.2, val=0.3),
)
#: The default colours: name -> base RGB.
COLOURS: dict = {c.name: c.rgb for c in _BASE_COLOURS}
#: Colours known but not in the default task (for finetuning on new names).
EXTRA_COLOURS: dict = {c.name: c.rgb for c in _EXTRA_COLOURS}
_COLOUR_SPECS: dict = {c.name: c for c in _BASE_COLOURS + _EXTRA_COLOURS}


def _star(points: int, inner: float):
    def pts(s):
        out = []
        for k in range(2 * points):
            r = s * (0.56 if k % 2 == 0 else 0.56 * inner)
            a = math.pi * k / points - math.pi / 2
            out.append((r * math.cos(a), r * math.sin(a)))
        return out
    return pts


def _regular(n: int, r: float, phase: float = 0.0):
    def pts(s):
        return [(s * r * math.cos(2 * math.pi * k / n + phase),
                 s * r * math.sin(2 * math.pi * k / n + phase)) for k in range(n)]
    return pts


@dataclass(frozen=True)
class Shape:
    """A shape name, its plural, its outline for size ``s`` (vertices around (0, 0), the
    shape spanning about ``s`` pixels; ``None`` = a circle of diameter ``s``) and how far
    it may be rotated (degrees either way)."""

    name: str
    plural: str
    outline: Optional[Callable] = None
    turn: float = 0.0


_BASE_SHAPES = (
    Shape("circle", "circles", None),
    Shape("square", "squares", lambda s: [(-.43 * s, -.43 * s), (.43 * s, -.43 * s),
                                          (.43 * s, .43 * s), (-.43 * s, .43 * s)], turn=8),
    Shape("triangle", "triangles", lambda s: [(0, -.52 * s), (.52 * s, .42 * s),
                                              (-.52 * s, .42 * s)], turn=8),
    Shape("star", "stars", _star(5, 0.45), turn=12),
    Shape("diamond", "diamonds", lambda s: [(0, -.54 * s), (.38 * s, 0), (0, .54 * s),
                                            (-.38 * s, 0)], turn=6),
)
_EXTRA_SHAPES = (
    Shape("hexagon", "hexagons", _regular(6, 0.5), turn=10),
    Shape("cross", "crosses", lambda s: [(x * s, y * s) for x, y in (
        (-.16, -.5), (.16, -.5), (.16, -.16), (.5, -.16), (.5, .16), (.16, .16), (.16, .5),
        (-.16, .5), (-.16, .16), (-.5, .16), (-.5, -.16), (-.16, -.16))], turn=8),
)
#: The default shapes: name -> plural.
SHAPES: dict = {s.name: s.plural for s in _BASE_SHAPES}
#: Shapes known but not in the default task.
EXTRA_SHAPES: dict = {s.name: s.plural for s in _EXTRA_SHAPES}
_SHAPE_SPECS: dict = {s.name: s for s in _BASE_SHAPES + _EXTRA_SHAPES}

#: Count answers.
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six")

#: Question types of the default task, and those known but left out of it.
QUESTION_TYPES = ("colour", "shape", "count", "position", "existence")
EXTRA_QUESTION_TYPES = ("relation",)

#: Phrasings per question form. ``{ref}`` is a unique description of one object ("star",
#: "red star", "red object"); ``{a}`` is "a"/"an" for the ``{desc}`` that follows.
TEMPLATES: dict = {
    "colour": ("what colour is the {ref}?", "what is the colour of the {ref}?",
               "which colour is the {ref}?", "tell me the colour of the {ref}."),
    "shape": ("what shape is the {ref}?", "what is the shape of the {ref}?",
              "which shape is the {ref}?", "what kind of shape is the {ref}?"),
    "count_all": ("how many objects are there?", "how many shapes are in the image?",
                  "how many objects can you see?", "count the objects."),
    "count_shape": ("how many {plural} are there?", "how many {plural} are in the image?",
                    "how many {plural} can you see?", "count the {plural}."),
    "count_colour": ("how many {colour} objects are there?",
                     "how many {colour} shapes are in the image?",
                     "how many {colour} objects can you see?", "count the {colour} objects."),
    "position_x": ("is the {ref} on the left or the right?",
                   "is the {ref} on the right or the left?",
                   "which side is the {ref} on, left or right?",
                   "is the {ref} in the left or right half of the image?"),
    "position_y": ("is the {ref} at the top or the bottom?",
                   "is the {ref} at the bottom or the top?",
                   "is the {ref} near the top or the bottom of the image?",
                   "is the {ref} in the top or bottom half of the image?"),
    "existence": ("is there {a} {desc}?", "is there {a} {desc} in the image?",
                  "does the image contain {a} {desc}?", "can you see {a} {desc}?"),
    "relation_x": ("is the {ref} to the left or the right of the {ref2}?",
                   "is the {ref} left or right of the {ref2}?"),
    "relation_y": ("is the {ref} above or below the {ref2}?",
                   "is the {ref} below or above the {ref2}?"),
}

#: Position questions need the object's centre this far (fraction of the image) off the
#: middle; relation questions need the two centres this far apart along the axis.
POSITION_GAP = 0.13
RELATION_GAP = 0.2


# ------------------------------------------------------------------------------ scenes


@dataclass(frozen=True)
class Obj:
    """One object: shape and colour names, the drawn RGB, centre (pixels), size
    (pixels spanned) and rotation (degrees)."""

    shape: str
    colour: str
    rgb: tuple
    cx: float
    cy: float
    size: float
    angle: float = 0.0

    @property
    def radius(self) -> float:
        """A radius that covers the drawn shape at any rotation."""
        return 0.62 * self.size


@dataclass(frozen=True)
class Scene:
    """Objects on a background: ``background`` is ``(rgb_from, rgb_to, angle_degrees)``, a
    linear gradient along that direction (solid when the two colours are equal)."""

    objects: tuple
    background: tuple
    size: int = 96

    def describe(self) -> str:
        return "; ".join(f"{o.colour} {o.shape} at ({o.cx:.0f}, {o.cy:.0f}) size {o.size:.0f}"
                         for o in self.objects)


@dataclass
class Sample:
    image: Image.Image
    qa: list
    scene: Scene = field(repr=False, default=None)


ColourArg = Union[None, Sequence[str], Mapping[str, tuple]]


def _colour_specs(colours: ColourArg) -> list:
    if colours is None:
        return list(_BASE_COLOURS)
    if isinstance(colours, str):
        colours = [colours]
    if isinstance(colours, Mapping):
        specs = []
        for name, rgb in colours.items():
            if isinstance(rgb, Colour):
                specs.append(rgb)
            elif name in _COLOUR_SPECS and tuple(rgb) == _COLOUR_SPECS[name].rgb:
                specs.append(_COLOUR_SPECS[name])
            else:
                specs.append(Colour(name, tuple(int(c) for c in rgb)))
    else:
        specs = []
        for c in colours:
            if isinstance(c, Colour):
                specs.append(c)
            elif c in _COLOUR_SPECS:
                specs.append(_COLOUR_SPECS[c])
            else:
                raise PmodError(f"unknown colour {c!r}; known: {', '.join(_COLOUR_SPECS)} "
                                "(or pass a mapping name -> RGB)")
    if not specs:
        raise PmodError("no colours to draw from")
    return specs


def _shape_specs(shapes) -> list:
    if shapes is None:
        return list(_BASE_SHAPES)
    if isinstance(shapes, str):
        shapes = [shapes]
    specs = []
    for s in shapes:
        if isinstance(s, Shape):
            specs.append(s)
        elif s in _SHAPE_SPECS:
            specs.append(_SHAPE_SPECS[s])
        else:
            raise PmodError(f"unknown shape {s!r}; known: {', '.join(_SHAPE_SPECS)}")
    if not specs:
        raise PmodError("no shapes to draw from")
    return specs


def _background(rng: np.random.Generator, object_rgbs: Sequence[tuple]) -> tuple:
    """Light, nearly grey colours, kept far (RGB distance) from every object colour."""
    def light():
        for _ in range(20):
            rgb = tuple(int(round(c * 255)) for c in colorsys.hsv_to_rgb(
                rng.uniform(0, 1), rng.uniform(0.0, 0.12), rng.uniform(0.86, 1.0)))
            if all(sum((a - b) ** 2 for a, b in zip(rgb, o)) > 90 ** 2 for o in object_rgbs):
                return rgb
        return (245, 245, 245)
    a = light()
    b = light() if rng.uniform() < 0.5 else a
    return a, b, float(rng.uniform(0, 360))


def draw_scene(rng: np.random.Generator, size: int = 96, colours: ColourArg = None,
               shapes=None, max_objects: int = 4, min_objects: int = 1,
               sizes: Optional[tuple] = None, margin: float = 3.0,
               repeat: float = 0.3) -> Scene:
    """A random scene of ``min_objects..max_objects`` non-overlapping objects.

    ``sizes`` is the (min, max) object size in pixels (default 16..34 scaled by
    ``size / 96``); ``margin`` the least gap between two objects' covering circles.
    With probability ``repeat`` an object reuses an earlier object's shape, and
    independently its colour, so that scenes often hold two stars or two red objects."""
    size = int(size)
    if size < 32:
        raise PmodError(f"image size {size} is too small; use 32 or more")
    if not 1 <= min_objects <= max_objects <= len(NUMBERS) - 1:
        raise PmodError(f"need 1 <= min_objects <= max_objects <= {len(NUMBERS) - 1}, "
                        f"got {min_objects}, {max_objects}")
    cspecs, sspecs = _colour_specs(colours), _shape_specs(shapes)
    lo, hi = sizes if sizes is not None else (16 * size / 96, 34 * size / 96)
    if not 4 <= lo <= hi:
        raise PmodError(f"object sizes must satisfy 4 <= min <= max, got {lo}, {hi}")
    n = int(rng.integers(min_objects, max_objects + 1))
    for _ in range(50):
        objs = []
        for _k in range(n):
            if objs and rng.uniform() < repeat:
                sspec = _SHAPE_SPECS.get(objs[int(rng.integers(len(objs)))].shape)
                sspec = sspec if sspec in sspecs else sspecs[int(rng.integers(len(sspecs)))]
            else:
                sspec = sspecs[int(rng.integers(len(sspecs)))]
            if objs and rng.uniform() < repeat:
                name = objs[int(rng.integers(len(objs)))].colour
                cspec = next(c for c in cspecs if c.name == name)
            else:
                cspec = cspecs[int(rng.integers(len(cspecs)))]
            s = float(rng.uniform(lo, hi))
            placed = None
            for attempt in range(60):
                if attempt and attempt % 20 == 0:
                    s = max(lo, s * 0.85)
                r = 0.62 * s
                cx = float(rng.uniform(r + 1, size - r - 1))
                cy = float(rng.uniform(r + 1, size - r - 1))
                if all(math.hypot(cx - o.cx, cy - o.cy) >= r + o.radius + margin for o in objs):
                    placed = (cx, cy)
                    break
            if placed is None:
                break
            angle = float(rng.uniform(-sspec.turn, sspec.turn))
            objs.append(Obj(sspec.name, cspec.name, cspec.sample(rng), placed[0], placed[1],
                            s, angle))
        if len(objs) == n:
            return Scene(tuple(objs), _background(rng, [o.rgb for o in objs]), size)
    raise PmodError(f"cannot place {n} objects of size {lo:.0f}..{hi:.0f} without overlap "
                    f"in a {size}x{size} image; use fewer or smaller objects")


_SUPERSAMPLE = 2
_NOISE_BANK: Optional[np.ndarray] = None


def _noise_bank() -> np.ndarray:
    """2**20 fixed standard normals; an image's noise is a window at a random offset
    (about 0.3 ms an image cheaper than fresh draws, and as random for this purpose)."""
    global _NOISE_BANK
    if _NOISE_BANK is None:
        _NOISE_BANK = np.random.default_rng(20240607).standard_normal(1 << 20, np.float32)
    return _NOISE_BANK


def _gradient(background: tuple, size: int) -> Image.Image:
    a, b, angle = background
    if tuple(a) == tuple(b):
        return Image.new("RGB", (size, size), tuple(a))
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    t = np.arange(size, dtype=np.float32) / max(size - 1, 1) - 0.5
    th = math.radians(angle)
    d = math.cos(th) * t[None, :] + math.sin(th) * t[:, None]
    d = (d - d.min()) / max(float(d.max() - d.min()), 1e-6)
    return Image.fromarray((a + (b - a) * d[..., None] + 0.5).astype(np.uint8), "RGB")


def _draw(draw: ImageDraw.ImageDraw, o: Obj, scale: float, fill) -> None:
    spec = _SHAPE_SPECS.get(o.shape)
    cx, cy, s = o.cx * scale, o.cy * scale, o.size * scale
    if spec is None or spec.outline is None:
        r = s / 2
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        return
    th = math.radians(o.angle)
    c, si = math.cos(th), math.sin(th)
    draw.polygon([(cx + x * c - y * si, cy + x * si + y * c) for x, y in spec.outline(s)], fill=fill)


def label_map(scene: Scene) -> np.ndarray:
    """``[size, size]`` uint8: at each pixel the index + 1 of the object drawn there, 0 on
    the background (the scene's ground truth per pixel, e.g. for dense auxiliary labels)."""
    img = Image.new("L", (scene.size, scene.size), 0)
    draw = ImageDraw.Draw(img)
    for i, o in enumerate(scene.objects):
        _draw(draw, o, 1, i + 1)
    return np.asarray(img)


def render(scene: Scene, rng: Optional[np.random.Generator] = None, noise: float = 6.0
           ) -> Image.Image:
    """The scene as an RGB image: background, anti-aliased shapes (drawn at 2x and
    reduced) and gaussian pixel noise of a random sigma in ``[0, noise]`` (0-255 scale;
    none when ``rng`` is None)."""
    ss = _SUPERSAMPLE
    img = _gradient(scene.background, scene.size)
    img = img.resize((scene.size * ss, scene.size * ss), Image.BILINEAR)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        _draw(draw, o, ss, o.rgb)
    img = img.reduce(ss)
    if rng is None or noise <= 0:
        return img
    sigma = float(rng.uniform(0.0, noise))
    arr = np.asarray(img, dtype=np.float32)
    bank = _noise_bank()
    if arr.size > bank.size:
        z = rng.standard_normal(arr.shape, dtype=np.float32)
    else:
        o = int(rng.integers(0, bank.size - arr.size + 1))
        z = bank[o:o + arr.size].reshape(arr.shape)
    arr = arr + z * sigma
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "RGB")


# ------------------------------------------------------------------------------ questions


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _refs(scene: Scene, use_colour: bool = True, use_shape: bool = True) -> list:
    """Per object, the descriptions that pick it out alone (may be empty)."""
    objs = scene.objects
    shapes = [o.shape for o in objs]
    colours = [o.colour for o in objs]
    pairs = list(zip(colours, shapes))
    out = []
    for o in objs:
        refs = []
        if use_shape and shapes.count(o.shape) == 1:
            refs.append(o.shape)
        if use_colour and colours.count(o.colour) == 1:
            refs.append(f"{o.colour} object")
        if use_colour and use_shape and pairs.count((o.colour, o.shape)) == 1:
            refs.append(f"{o.colour} {o.shape}")
        if len(objs) == 1 and not (use_colour and use_shape):
            refs.append("object")
        out.append(refs)
    return out


def referent(scene: Scene, question: str) -> Optional[int]:
    """The index of the one object ``question`` names ("the red star", "the star", "the red
    object", as the colour, shape and position questions do), or None (counts, existence)."""
    named = [_refs(scene, **flags) for flags in ({}, {"use_colour": False}, {"use_shape": False})]
    for i, refs in enumerate(zip(*named)):
        if any(re.search(rf"\bthe {ref}\b", question) for ref in itertools.chain(*refs)):
            return i
    return None


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _ask_colour(scene, rng, ctx):
    cands = [(o, r) for o, refs in zip(scene.objects, _refs(scene, use_colour=False))
             for r in refs]
    if not cands:
        return None
    o, ref = _pick(rng, cands)
    return _pick(rng, ctx["templates"]["colour"]).format(ref=ref), o.colour


def _ask_shape(scene, rng, ctx):
    cands = [(o, r) for o, refs in zip(scene.objects, _refs(scene, use_shape=False))
             for r in refs]
    if not cands:
        return None
    o, ref = _pick(rng, cands)
    return _pick(rng, ctx["templates"]["shape"]).format(ref=ref), o.shape


def _ask_count(scene, rng, ctx):
    """Picks the answer first (among the answers this scene offers, bigger ones weighed
    up), then a question with that answer, so counts are not dominated by 'one' and
    'zero'."""
    objs = scene.objects
    cands = [("count_all", {}, len(objs))]
    for s in ctx["shapes"]:
        cands.append(("count_shape", {"plural": s.plural},
                      sum(o.shape == s.name for o in objs)))
    for c in ctx["colours"]:
        cands.append(("count_colour", {"colour": c.name},
                      sum(o.colour == c.name for o in objs)))
    answers = sorted({n for _, _, n in cands})
    # scenes offer big counts less often ('zero' always, 'four' in about 1 of 4 default
    # scenes): weigh them up (1 + n^2 / 2) so that the answers come out roughly even
    w = np.array([1.0 + n * n / 2.0 for n in answers])
    want = answers[int(rng.choice(len(answers), p=w / w.sum()))]
    # within an answer, weight the three forms evenly
    forms = sorted({f for f, _, n in cands if n == want})
    form = _pick(rng, forms)
    key, fill, n = _pick(rng, [c for c in cands if c[2] == want and c[0] == form])
    return _pick(rng, ctx["templates"][key]).format(**fill), NUMBERS[n]


def _ask_position(scene, rng, ctx):
    W = scene.size
    cands = []
    for o, refs in zip(scene.objects, _refs(scene)):
        for ref in refs:
            if abs(o.cx - W / 2) >= POSITION_GAP * W:
                cands.append(("position_x", ref, "left" if o.cx < W / 2 else "right"))
            if abs(o.cy - W / 2) >= POSITION_GAP * W:
                cands.append(("position_y", ref, "top" if o.cy < W / 2 else "bottom"))
    if not cands:
        return None
    axes = sorted({c[0] for c in cands})
    axis = _pick(rng, axes)
    key, ref, ans = _pick(rng, [c for c in cands if c[0] == axis])
    return _pick(rng, ctx["templates"][key]).format(ref=ref), ans


def _ask_relation(scene, rng, ctx):
    W = scene.size
    refs = _refs(scene)
    cands = []
    for (i, a), (j, b) in itertools.permutations(enumerate(scene.objects), 2):
        for ra in refs[i]:
            for rb in refs[j]:
                if ra == rb:
                    continue
                if abs(a.cx - b.cx) >= RELATION_GAP * W:
                    cands.append(("relation_x", ra, rb, "left" if a.cx < b.cx else "right"))
                if abs(a.cy - b.cy) >= RELATION_GAP * W:
                    cands.append(("relation_y", ra, rb, "above" if a.cy < b.cy else "below"))
    if not cands:
        return None
    axis = _pick(rng, sorted({c[0] for c in cands}))
    key, ra, rb, ans = _pick(rng, [c for c in cands if c[0] == axis])
    return _pick(rng, ctx["templates"][key]).format(ref=ra, ref2=rb), ans


def _ask_existence(scene, rng, ctx):
    """Yes and no with equal odds; a 'no' names a colour/shape pair that is absent, half
    the time one sharing its colour or shape with an object that is there."""
    objs = scene.objects
    present = {(o.colour, o.shape) for o in objs}
    colours = [c.name for c in ctx["colours"]]
    shapes = [s.name for s in ctx["shapes"]]
    form = _pick(rng, ("pair", "pair", "pair", "pair", "shape", "colour"))
    if form == "pair":
        yes = sorted(present)
        no = [(c, s) for c in colours for s in shapes if (c, s) not in present]
        near = [p for p in no if any(p[0] == q[0] or p[1] == q[1] for q in present)]
        if near and rng.uniform() < 0.5:
            no = near
        text = lambda p: f"{p[0]} {p[1]}"  # noqa: E731
    elif form == "shape":
        yes = sorted({o.shape for o in objs})
        no = [s for s in shapes if s not in yes]
        text = lambda p: p  # noqa: E731
    else:
        yes = sorted({o.colour for o in objs})
        no = [c for c in colours if c not in yes]
        text = lambda p: f"{p} object"  # noqa: E731
    answer = "yes" if (not no or rng.uniform() < 0.5) else "no"
    desc = text(_pick(rng, yes if answer == "yes" else no))
    return (_pick(rng, ctx["templates"]["existence"]).format(a=_article(desc), desc=desc),
            answer)


_ASKERS = {
    "colour": _ask_colour,
    "shape": _ask_shape,
    "count": _ask_count,
    "position": _ask_position,
    "existence": _ask_existence,
    "relation": _ask_relation,
}


def _context(colours, shapes, templates) -> dict:
    t = dict(TEMPLATES)
    if templates:
        t.update({k: tuple(v) for k, v in templates.items()})
    return {"colours": _colour_specs(colours), "shapes": _shape_specs(shapes), "templates": t}


def _check_types(types) -> tuple:
    types = (types,) if isinstance(types, str) else tuple(types)
    bad = [t for t in types if t not in _ASKERS]
    if bad or not types:
        raise PmodError(f"unknown question type {bad[0] if bad else '(none)'!r}; "
                        f"known: {', '.join(_ASKERS)}")
    return types


def ask(scene: Scene, rng: np.random.Generator, qtype: Optional[str] = None,
        types: Sequence[str] = QUESTION_TYPES, colours: ColourArg = None, shapes=None,
        templates: Optional[Mapping] = None, _ctx: Optional[dict] = None) -> tuple:
    """One question about ``scene``: ``(qtype, question, answer)``.

    ``qtype`` None picks uniformly among ``types`` that have a question for this scene.
    ``colours`` / ``shapes`` are the names a question may mention (negative existence and
    zero counts draw from them; default: the base tables). ``templates`` overrides
    entries of ``TEMPLATES``. A type with no valid question for the scene is an error."""
    ctx = _ctx or _context(colours, shapes, templates)
    if qtype is not None:
        _check_types(qtype)
        got = _ASKERS[qtype](scene, rng, ctx)
        if got is None:
            raise PmodError(f"no unambiguous {qtype} question fits this scene "
                            f"({scene.describe()})")
        return (qtype, *got)
    order = list(_check_types(types))
    rng.shuffle(order)
    for t in order:
        got = _ASKERS[t](scene, rng, ctx)
        if got is not None:
            return (t, *got)
    raise PmodError(f"no question of types {', '.join(types)} fits this scene")


# ------------------------------------------------------------------------------ samples


def _split_key(split: str) -> int:
    if not isinstance(split, str) or not split:
        raise PmodError(f"split must be a non-empty name like 'train', got {split!r}")
    return int.from_bytes(hashlib.blake2b(split.encode(), digest_size=8).digest(), "little")


def sample_rng(split: str, index: int, seed: int = 0) -> np.random.Generator:
    """The generator of sample ``index`` of ``(split, seed)``."""
    ss = np.random.SeedSequence(int(seed), spawn_key=(_split_key(split), int(index)))
    return np.random.Generator(np.random.PCG64(ss))


def iter_samples(split: str, seed: int = 0, start: int = 0, questions_per_image: int = 3,
                 size: int = 96, colours: ColourArg = None, shapes=None,
                 types: Sequence[str] = QUESTION_TYPES, max_objects: int = 4,
                 min_objects: int = 1, sizes: Optional[tuple] = None, noise: float = 6.0,
                 templates: Optional[Mapping] = None) -> Iterator[Sample]:
    """Samples ``start, start + 1, ...`` of ``(split, seed)``, without end.

    Each image gets up to ``questions_per_image`` different questions, of different
    types while there are types left that fit the scene."""
    types = _check_types(types)
    ctx = _context(colours, shapes, templates)
    if questions_per_image < 1:
        raise PmodError(f"questions_per_image must be >= 1, got {questions_per_image}")
    for i in itertools.count(int(start)):
        rng = sample_rng(split, i, seed)
        scene = draw_scene(rng, size=size, colours=ctx["colours"], shapes=ctx["shapes"],
                           max_objects=max_objects, min_objects=min_objects, sizes=sizes)
        image = render(scene, rng, noise=noise)
        qa, seen = [], set()
        order = list(types)
        rng.shuffle(order)
        tries, budget = 0, 4 * questions_per_image + len(order)
        while len(qa) < questions_per_image and tries < budget:
            tries += 1
            t = order.pop(0) if order else _pick(rng, types)
            got = _ASKERS[t](scene, rng, ctx)
            if got is None or got[0] in seen:
                continue
            seen.add(got[0])
            qa.append((t, *got))
        if not qa:  # cannot happen with count or existence among the types
            qa.append(ask(scene, rng, types=types, _ctx=ctx))
        yield Sample(image, qa, scene)


def make_samples(split: str, n: int, seed: int = 0, questions_per_image: int = 3,
                 **subset) -> list:
    """The first ``n`` samples of ``(split, seed)``; ``subset`` as for ``iter_samples``
    (``size``, ``colours``, ``shapes``, ``types``, ``max_objects``, ``min_objects``,
    ``sizes``, ``noise``, ``templates``)."""
    if n < 0:
        raise PmodError(f"n must be >= 0, got {n}")
    return list(itertools.islice(iter_samples(split, seed, 0, questions_per_image, **subset),
                                 int(n)))


def vocabulary(colours: ColourArg = "all", shapes="all", types: Sequence[str] = "all",
               templates: Optional[Mapping] = None) -> list:
    """Every word a question or answer can hold (lowercase, sorted; punctuation ``?``
    ``.`` ``,`` left out). ``"all"`` covers the extra tables too, so a tokenizer trained
    on this list serves later finetuning on them."""
    cs = list(_COLOUR_SPECS.values()) if colours == "all" else _colour_specs(colours)
    ss = list(_SHAPE_SPECS.values()) if shapes == "all" else _shape_specs(shapes)
    ts = tuple(_ASKERS) if types == "all" else _check_types(types)
    t = dict(TEMPLATES)
    if templates:
        t.update(templates)
    keys = [k for k in t if k.split("_")[0] in ts]
    words = set(NUMBERS) if "count" in ts else set()
    words |= {"yes", "no"} if "existence" in ts else set()
    words |= {"left", "right", "top", "bottom"} if "position" in ts else set()
    words |= {"left", "right", "above", "below"} if "relation" in ts else set()
    words |= {"object"}
    for c in cs:
        words |= set(re.findall(r"[a-z]+", c.name.lower()))
    for s in ss:
        words |= set(re.findall(r"[a-z]+", f"{s.name} {s.plural}".lower()))
    for k in keys:
        for tmpl in t[k]:
            words |= set(re.findall(r"[a-z]+", re.sub(r"\{[a-z0-9]+\}", " ", tmpl)))
    if "existence" in ts:
        words |= {"a", "an"}
    return sorted(words)


# ------------------------------------------------------------------------------ viewing


def grid(samples: Sequence[Sample], cols: int = 4, scale: int = 2, captions: bool = True
         ) -> Image.Image:
    """A contact sheet: each image enlarged ``scale`` times, its questions and answers
    under it (Pillow's default font)."""
    from PIL import ImageFont
    if not samples:
        raise PmodError("no samples to lay out")
    font = ImageFont.load_default()
    w = max(s.image.size[0] for s in samples) * scale
    h = max(s.image.size[1] for s in samples) * scale
    nq = max(len(s.qa) for s in samples) if captions else 0
    line = 12
    cell_w = w
    if captions:
        cell_w = max([w] + [int(font.getlength(f"{q} {a}")) + 4
                            for smp in samples for _t, q, a in smp.qa])
    cell_h = h + nq * line + 6
    rows = -(-len(samples) // cols)
    sheet = Image.new("RGB", (cols * (cell_w + 6) + 6, rows * (cell_h + 6) + 6), "white")
    d = ImageDraw.Draw(sheet)
    for k, s in enumerate(samples):
        x = 6 + (k % cols) * (cell_w + 6)
        y = 6 + (k // cols) * (cell_h + 6)
        sheet.paste(s.image.resize((s.image.size[0] * scale, s.image.size[1] * scale),
                                   Image.NEAREST), (x, y))
        if captions:
            for j, (_t, q, a) in enumerate(s.qa):
                d.text((x, y + h + 2 + j * line), f"{q} {a}", fill="black", font=font)
    return sheet
