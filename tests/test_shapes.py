"""The synthetic shapes VQA task (pmod.tasks.shapes): determinism, answers checked against the
scene by an independent reading of each question, balance, pixels, tables and subsets."""

from __future__ import annotations

import collections
import colorsys
import itertools
import math
import re

import numpy as np
import pytest

from pmod.tasks import shapes
from pmod.errors import PmodError
from pmod.tasks.shapes import (COLOURS, EXTRA_COLOURS, EXTRA_QUESTION_TYPES, EXTRA_SHAPES, NUMBERS,
                         QUESTION_TYPES, SHAPES, Obj, Scene, ask, draw_scene, make_samples,
                         referent, render, sample_rng, vocabulary)

ALL_COLOURS = {**COLOURS, **EXTRA_COLOURS}
ALL_SHAPES = {**SHAPES, **EXTRA_SHAPES}
PLURAL = {p: s for s, p in ALL_SHAPES.items()}


@pytest.fixture(scope="module")
def train():
    return make_samples("train", 400, seed=0)


# ------------------------------------------------------------- an independent reader
def resolve(ref: str, scene: Scene) -> list:
    """The objects a description names: 'red star', 'star', 'red object', 'object'."""
    words = ref.split()
    if words == ["object"]:
        return list(scene.objects)
    if len(words) == 2 and words[1] == "object":
        return [o for o in scene.objects if o.colour == words[0]]
    if len(words) == 2:
        return [o for o in scene.objects if (o.colour, o.shape) == tuple(words)]
    assert len(words) == 1 and words[0] in ALL_SHAPES, ref
    return [o for o in scene.objects if o.shape == words[0]]


def the(ref: str, scene: Scene) -> Obj:
    found = resolve(ref, scene)
    assert len(found) == 1, f"{ref!r} is ambiguous or absent in {scene.describe()}"
    return found[0]


REF = r"the (?P<ref>[a-z ]+?)"


def expected(qtype: str, q: str, scene: Scene) -> str:
    """The answer to ``q`` worked out from the scene alone (raises if unparsed)."""
    W = scene.size
    if qtype == "colour":
        m = re.search(r"colou?r (?:is|of|does) " + REF + r"(?: have)?[?.]$", q)
        return the(m["ref"], scene).colour
    if qtype == "shape":
        m = re.search(r"shape (?:is|of) " + REF + r"\?$", q)
        return the(m["ref"], scene).shape
    if qtype == "count":
        m = re.search(r"(?:how many|count the) (?P<what>[a-z ]+?)(?: are| can|\.)", q)
        what = m["what"].split()
        if what in (["objects"], ["shapes"]):
            n = len(scene.objects)
        elif len(what) == 1:
            n = sum(o.shape == PLURAL[what[0]] for o in scene.objects)
        else:
            assert what[1] in ("objects", "shapes")
            n = sum(o.colour == what[0] for o in scene.objects)
        return NUMBERS[n]
    if qtype == "position":
        m = re.search(r"(?:is|side is) " + REF + r" (?:on|at|near|in)", q)
        o = the(m["ref"], scene)
        if "left" in q:
            assert abs(o.cx - W / 2) >= shapes.POSITION_GAP * W
            return "left" if o.cx < W / 2 else "right"
        assert abs(o.cy - W / 2) >= shapes.POSITION_GAP * W
        return "top" if o.cy < W / 2 else "bottom"
    if qtype == "existence":
        m = re.search(r"(?:there|contain|see) an? (?P<desc>[a-z ]+?)(?: in the image)?\?$", q)
        return "yes" if resolve(m["desc"], scene) else "no"
    if qtype == "relation":
        m = re.search(REF + r" (?:to the |)(?:left|above|below).* the (?P<ref2>[a-z ]+)\?$",
                      q)
        a, b = the(m["ref"], scene), the(m["ref2"], scene)
        if "left" in q:
            assert abs(a.cx - b.cx) >= shapes.RELATION_GAP * W
            return "left" if a.cx < b.cx else "right"
        assert abs(a.cy - b.cy) >= shapes.RELATION_GAP * W
        return "above" if a.cy < b.cy else "below"
    raise AssertionError(qtype)


# ------------------------------------------------------------- determinism
def pixels(samples):
    return [np.asarray(s.image) for s in samples]


def test_same_seed_same_samples():
    a, b = make_samples("train", 20, seed=3), make_samples("train", 20, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(pixels(a), pixels(b)))
    assert [s.qa for s in a] == [s.qa for s in b]
    # a sample depends only on (split, seed, index): shorter lists are prefixes
    c = make_samples("train", 5, seed=3)
    assert [s.qa for s in c] == [s.qa for s in a[:5]]
    assert all(np.array_equal(x, y) for x, y in zip(pixels(c), pixels(a)))
    d = next(shapes.iter_samples("train", seed=3, start=7))
    assert np.array_equal(np.asarray(d.image), np.asarray(a[7].image)) and d.qa == a[7].qa


@pytest.mark.parametrize("split, seed", [("valid", 3), ("test", 3), ("train", 4)])
def test_other_split_or_seed_differs(split, seed):
    base = make_samples("train", 20, seed=3)
    alt = make_samples(split, 20, seed=seed)
    same = sum(np.array_equal(x, y) for x, y in zip(pixels(base), pixels(alt)))
    assert same == 0
    assert [s.qa for s in base] != [s.qa for s in alt]


def test_splits_use_disjoint_streams():
    keys = {shapes._split_key(s) for s in ("train", "valid", "test")}
    assert len(keys) == 3
    r = [sample_rng(s, 0).integers(1 << 62) for s in ("train", "valid", "test")]
    assert len(set(r)) == 3


# ------------------------------------------------------------- images
def test_images_size_and_mode(train):
    for s in train[:50]:
        assert s.image.mode == "RGB" and s.image.size == (96, 96)
        assert s.scene.size == 96 and 1 <= len(s.scene.objects) <= 4
    small = make_samples("train", 5, size=64)
    assert all(s.image.size == (64, 64) for s in small)
    assert all(max(o.size for o in s.scene.objects) <= 34 * 64 / 96 + 1e-6 for s in small)


def test_objects_inside_and_apart(train):
    for s in train:
        objs = s.scene.objects
        for o in objs:
            assert 16 * 0.99 <= o.size <= 34 and o.radius < o.cx < 96 - o.radius
            assert o.radius < o.cy < 96 - o.radius
        for a, b in itertools.combinations(objs, 2):
            assert math.hypot(a.cx - b.cx, a.cy - b.cy) >= a.radius + b.radius


def test_object_centre_pixels_have_its_colour(train):
    for s in train[:150]:
        arr = np.asarray(s.image, dtype=np.float32)
        for o in s.scene.objects:
            x, y = int(round(o.cx)), int(round(o.cy))
            patch = arr[y - 1:y + 2, x - 1:x + 2].reshape(-1, 3).mean(0)
            assert np.abs(patch - np.array(o.rgb)).max() < 12, (o, patch)


def test_background_far_from_objects(train):
    for s in train:
        a, b, _ = s.scene.background
        for bg in (a, b):
            h, sat, v = colorsys.rgb_to_hsv(*(c / 255 for c in bg))
            assert sat <= 0.13 and v >= 0.85
            for o in s.scene.objects:
                assert math.dist(bg, o.rgb) > 90
        # the corners are background (no object reaches them): on the gradient a..b
        arr = np.asarray(s.image, dtype=np.float64)
        a_, b_ = np.array(a, float), np.array(b, float)
        for px in (arr[0, 0], arr[0, -1], arr[-1, 0], arr[-1, -1]):
            t = np.clip((px - a_) @ (b_ - a_) / max((b_ - a_) @ (b_ - a_), 1e-9), 0, 1)
            assert np.linalg.norm(px - (a_ + t * (b_ - a_))) < 25


def test_colour_jitter_is_bounded_and_separable():
    """Every drawn shade lies within its table bounds and is nearer its own base hue
    than any other colour of the default set (so 'red' covers a range of reds only)."""
    rng = np.random.default_rng(0)
    hues = {n: colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] * 360 for n, rgb in COLOURS.items()}

    def hue_gap(a, b):
        return abs((a - b + 180) % 360 - 180)
    drawn = {n: [shapes._COLOUR_SPECS[n].sample(rng) for _ in range(500)] for n in COLOURS}
    for name, rgbs in drawn.items():
        spec = shapes._COLOUR_SPECS[name]
        for rgb in rgbs:
            h = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] * 360
            assert hue_gap(h, hues[name]) <= spec.hue + 1.5
            assert min(hues, key=lambda n: hue_gap(h, hues[n])) == name
    for a, b in itertools.combinations(COLOURS, 2):
        d = min(math.dist(x, y) for x in drawn[a][:200] for y in drawn[b][:200])
        assert d > 40, (a, b, d)


# ------------------------------------------------------------- questions
def test_answers_follow_from_the_scene(train):
    n = 0
    for s in train:
        assert 1 <= len(s.qa) <= 3
        assert len({q for _, q, _ in s.qa}) == len(s.qa)
        for qtype, q, a in s.qa:
            assert a == expected(qtype, q, s.scene), (q, a, s.scene.describe())
            assert re.fullmatch(r"[a-z]+", a) and q == q.lower()
            n += 1
    assert n >= 3 * len(train) * 0.95


def test_referent_is_the_object_the_question_names(train):
    """Checked against the independent reader: the ref each question form puts after its verb."""
    forms = {"colour": r"colou?r (?:is|of) " + REF + r"[?.]$", "shape": r"shape (?:is|of) " + REF + r"\?$",
             "position": r"(?:is|side is) " + REF + r" (?:on|at|near|in)"}
    named = collections.Counter()
    for s in train:
        for qtype, q, _ in s.qa:
            i = referent(s.scene, q)
            if qtype in forms:
                assert s.scene.objects[i] is the(re.search(forms[qtype], q)["ref"], s.scene), q
                named[qtype] += 1
            else:
                assert i is None, q
    assert min(named.values()) > 100, named


def test_extra_types_colours_shapes_follow_from_the_scene():
    samples = make_samples("lora", 200, seed=1, types=QUESTION_TYPES + EXTRA_QUESTION_TYPES,
                           colours=list(ALL_COLOURS), shapes=list(ALL_SHAPES))
    seen = collections.Counter()
    for s in samples:
        for qtype, q, a in s.qa:
            assert a == expected(qtype, q, s.scene), (q, a, s.scene.describe())
            seen[qtype] += 1
        for o in s.scene.objects:
            seen[o.colour] += 1
            seen[o.shape] += 1
    for key in list(ALL_COLOURS) + list(ALL_SHAPES) + list(QUESTION_TYPES) + ["relation"]:
        assert seen[key] > 0, key


def test_every_type_colour_shape_and_answer_appears(train):
    qtypes = collections.Counter(t for s in train for t, _, _ in s.qa)
    answers = collections.defaultdict(set)
    for s in train:
        for t, _, a in s.qa:
            answers[t].add(a)
    assert set(qtypes) == set(QUESTION_TYPES)
    assert min(qtypes.values()) > 0.1 * sum(qtypes.values())
    assert answers["colour"] == set(COLOURS)
    assert answers["shape"] == set(SHAPES)
    assert answers["count"] == set(NUMBERS[:5])
    assert answers["position"] == {"left", "right", "top", "bottom"}
    assert answers["existence"] == {"yes", "no"}
    drawn = collections.Counter(o.colour for s in train for o in s.scene.objects)
    assert set(drawn) == set(COLOURS)
    assert {o.shape for s in train for o in s.scene.objects} == set(SHAPES)


def test_existence_balanced_and_count_spread():
    rng = np.random.default_rng(5)
    ex = collections.Counter()
    cnt = collections.Counter()
    for _ in range(500):
        scene = draw_scene(rng)
        ex[ask(scene, rng, "existence")[2]] += 1
        cnt[ask(scene, rng, "count")[2]] += 1
    assert 0.42 <= ex["yes"] / 500 <= 0.58, ex
    assert min(cnt[w] for w in NUMBERS[:5]) >= 0.08 * 500, cnt


def test_ambiguous_scene_has_no_colour_question():
    two_stars = Scene((Obj("star", "red", (220, 20, 20), 20, 20, 20),
                       Obj("star", "blue", (20, 20, 220), 70, 70, 20)),
                      ((250, 250, 250),) * 2 + (0.0,))
    rng = np.random.default_rng(0)
    with pytest.raises(PmodError, match="no unambiguous colour question"):
        ask(two_stars, rng, "colour")
    # shape questions name the star by its (unique) colour
    for _ in range(20):
        _, q, a = ask(two_stars, rng, "shape")
        assert a == "star" and ("red" in q or "blue" in q)
    # both stars are red: no shape question either, and no position question through them
    red = Scene((two_stars.objects[0], Obj("star", "red", (220, 20, 20), 70, 70, 20)),
                two_stars.background)
    with pytest.raises(PmodError):
        ask(red, rng, "shape")
    with pytest.raises(PmodError):
        ask(red, rng, "position")


def test_position_only_when_clearly_off_middle():
    bg = ((250, 250, 250),) * 2 + (0.0,)
    centred = Scene((Obj("circle", "red", (220, 20, 20), 50, 45, 20),), bg)
    with pytest.raises(PmodError):
        ask(centred, np.random.default_rng(0), "position")
    left = Scene((Obj("circle", "red", (220, 20, 20), 20, 48, 20),), bg)
    rng = np.random.default_rng(0)
    for _ in range(10):
        _, q, a = ask(left, rng, "position")
        assert "left" in q and a == "left"


def test_vocabulary_covers_everything():
    vocab = set(vocabulary())
    samples = make_samples("vocab", 150, seed=2, types=QUESTION_TYPES + EXTRA_QUESTION_TYPES,
                           colours=list(ALL_COLOURS), shapes=list(ALL_SHAPES))
    words = {w for s in samples for _, q, a in s.qa for w in re.findall(r"[a-z]+", f"{q} {a}")}
    assert words <= vocab, words - vocab
    assert set(ALL_COLOURS) | set(ALL_SHAPES) | set(NUMBERS) <= vocab
    small = set(vocabulary(colours=["red"], shapes=["star"], types=["colour"]))
    assert "red" in small and "blue" not in small and "yes" not in small


# ------------------------------------------------------------- subsets and errors
def test_subsets_are_respected():
    samples = make_samples("train", 60, colours=["red", "pink"], shapes=["hexagon", "circle"],
                           types=["colour", "existence"], max_objects=2)
    for s in samples:
        assert {o.colour for o in s.scene.objects} <= {"red", "pink"}
        assert {o.shape for o in s.scene.objects} <= {"hexagon", "circle"}
        assert 1 <= len(s.scene.objects) <= 2
        for t, q, a in s.qa:
            assert t in ("colour", "existence")
            assert not (set(re.findall(r"[a-z]+", q)) & (set(COLOURS) - {"red"}))
    custom = make_samples("train", 10, colours={"teal": (0, 128, 128)})
    assert {o.colour for s in custom for o in s.scene.objects} == {"teal"}


def test_render_without_rng_is_noise_free():
    rng = np.random.default_rng(1)
    scene = draw_scene(rng)
    a, b = np.asarray(render(scene)), np.asarray(render(scene))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, np.asarray(render(scene, np.random.default_rng(2))))


@pytest.mark.parametrize("call, match", [
    (lambda: make_samples("train", 1, colours=["mauve"]), "unknown colour"),
    (lambda: make_samples("train", 1, shapes=["blob"]), "unknown shape"),
    (lambda: make_samples("train", 1, types=["size"]), "unknown question type"),
    (lambda: make_samples("", 1), "split"),
    (lambda: make_samples("train", 1, max_objects=9), "max_objects"),
    (lambda: make_samples("train", 1, size=16), "too small"),
    (lambda: make_samples("train", 1, min_objects=6, max_objects=6, sizes=(40, 40)),
     "cannot place"),
])
def test_errors_are_one_line(call, match):
    with pytest.raises(PmodError, match=match) as e:
        call()
    assert "\n" not in str(e.value)


def test_two_hundred_samples_generate():
    samples = make_samples("test", 200, seed=9)
    assert len(samples) == 200 and all(s.qa for s in samples)


def test_grid_lays_out_samples(train):
    sheet = shapes.grid(train[:6], cols=3)
    assert sheet.mode == "RGB" and sheet.size[0] > 3 * 192
