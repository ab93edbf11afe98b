"""The dense scene labels the shapes generator knows for free, for the embedded model's training.

The embedded model's vision tower is pretrained on these before it learns to answer
(``pmod.tasks.shapes.train``): per patch, the colour and shape of the object covering it,
its side of the image and whether an object's centre lies in it (``patch_labels``); per
image, how many objects of each colour, shape and pair there are and the side of each one
that is unique (``scene_labels``). numpy only.
"""

from __future__ import annotations

import numpy as np

from pmod.tasks import shapes

IMAGE_SIZE, PATCH = 96, 8  # 12 x 12 = 144 vision tokens per image
GRID = IMAGE_SIZE // PATCH
COLOUR_NAMES, SHAPE_NAMES = list(shapes.COLOURS), list(shapes.SHAPES)


def side(scene: shapes.Scene, c: float) -> int:
    """1 left/top, 2 right/bottom, 3 too close to the middle to say (as the position questions judge it)."""
    half, gap = scene.size / 2, shapes.POSITION_GAP * scene.size
    return 3 if abs(c - half) < gap else 1 if c < half else 2


#: What the scene labels describe: every colour, every shape and every (colour, shape) pair.
KINDS = ([(c, None) for c in COLOUR_NAMES] + [(None, k) for k in SHAPE_NAMES]
         + [(c, k) for c in COLOUR_NAMES for k in SHAPE_NAMES])
MAX_COUNT = len(shapes.NUMBERS) - 1


def scene_labels(scene: shapes.Scene) -> np.ndarray:
    """``[1 + 3 * len(KINDS)]`` int32, the facts the questions ask about, for heads on the
    mean of the patch features: how many objects; per kind (a colour, a shape or a pair),
    how many objects of it, and the side across and down (as in ``patch_labels``) of the
    only one, 0 when there is not exactly one."""
    objs = scene.objects
    counts, across, down = [], [], []
    for colour, kind in KINDS:
        match = [o for o in objs if colour in (None, o.colour) and kind in (None, o.shape)]
        counts.append(len(match))
        across.append(side(scene, match[0].cx) if len(match) == 1 else 0)
        down.append(side(scene, match[0].cy) if len(match) == 1 else 0)
    return np.array([len(objs)] + counts + across + down, np.int32)


def patch_cover(scene: shapes.Scene) -> np.ndarray:
    """``[GRID*GRID, n_objects]``: the fraction of each patch (tower order) each object covers."""
    m = shapes.label_map(scene).reshape(GRID, PATCH, GRID, PATCH).transpose(0, 2, 1, 3).reshape(GRID * GRID, -1)
    return np.stack([(m == i + 1).mean(axis=1) for i in range(len(scene.objects))], axis=1)


def patch_labels(scene: shapes.Scene) -> np.ndarray:
    """``[5, GRID*GRID]`` int32, patches in the tower's row-major order. For the object
    covering at least a fifth of the patch (0 = background everywhere): its colour and
    shape class (1 + index in ``shapes.COLOURS`` / ``shapes.SHAPES``), and which side of
    the image its centre is on across and down (1 left/top, 2 right/bottom, 3 too close to
    the middle to say, as the position questions judge it); and 1 where an object's centre lies."""
    cover = patch_cover(scene)
    best, has = cover.argmax(axis=1), cover.max(axis=1) >= 0.2
    per_object = np.array([[COLOUR_NAMES.index(o.colour) + 1, SHAPE_NAMES.index(o.shape) + 1,
                            side(scene, o.cx), side(scene, o.cy)] for o in scene.objects])
    labels = np.where(has[:, None], per_object[best], 0).T
    centre = np.zeros(GRID * GRID, np.int32)
    for o in scene.objects:
        centre[min(int(o.cy) // PATCH, GRID - 1) * GRID + min(int(o.cx) // PATCH, GRID - 1)] = 1
    return np.concatenate([labels[:2], centre[None], labels[2:]]).astype(np.int32)
