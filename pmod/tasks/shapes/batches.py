"""Training batches of the shapes task for the embedded model, as MLX arrays.

``vision_batch`` (stage 1: images, patch and scene labels), ``qa_batch`` (stage 2: one
multi-turn conversation per image, collated by ``pmod_mlx.train``, with its labels and its
``Binding``: where each answer should look). MLX work: imports ``mlx`` and ``pmod_mlx``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

import pmod_mlx  # noqa: F401  (fast BLAS before mlx)
import mlx.core as mx

from pmod import prompt
from pmod.image import preprocess
from pmod.tasks import shapes
from pmod.tasks.shapes.labels import GRID, patch_cover, patch_labels, scene_labels
from pmod_mlx.train import collate, make_example


@dataclass
class Binding:
    """Where a batch's answers should look: per row and question turn, the position that
    predicts the reply's first token, whether the question names one object, and its patches."""

    query: mx.array  # [B, Q] int32
    named: mx.array  # [B, Q] float32
    patches: mx.array  # [B, Q, GRID*GRID] float32


def binding(samples: list, batch) -> Binding:
    """The ``Binding`` of ``batch``, collated from ``samples`` (one conversation each; a turn
    whose question names no object, a count or existence, is left out of the loss)."""
    weights = np.array(batch.weights)
    starts = [np.flatnonzero(np.diff(np.concatenate([[0.0], w])) > 0) for w in weights]
    Q = max(len(s.qa) for s in samples)
    query, named = np.zeros((len(samples), Q), np.int32), np.zeros((len(samples), Q), np.float32)
    patches = np.zeros((len(samples), Q, GRID * GRID), np.float32)
    for b, (s, turns) in enumerate(zip(samples, starts)):
        assert len(turns) == len(s.qa), "one reply per question"
        cover = patch_cover(s.scene)
        for j, (_, question, _) in enumerate(s.qa):
            query[b, j] = turns[j]
            i = shapes.referent(s.scene, question)
            if i is not None:
                named[b, j] = 1.0
                patches[b, j] = cover[:, i] >= min(0.2, cover[:, i].max())
    return Binding(mx.array(query), mx.array(named), mx.array(patches))


def vision_batch(config, processor, start: int, n: int, seed: int):
    pixels, labels, scene = [], [], []
    for s in itertools.islice(shapes.iter_samples("train-vision", seed=seed, start=start, questions_per_image=1), n):
        pixels.append(preprocess(s.image, config, processor).pixel_values)
        labels.append(patch_labels(s.scene))
        scene.append(scene_labels(s.scene))
    return mx.array(np.concatenate(pixels)), mx.array(np.stack(labels)), mx.array(np.stack(scene))


def qa_messages(sample: shapes.Sample, prefix: str = "", image: bool = True) -> list[prompt.Message]:
    """A sample's questions as one conversation; the image (or ``prefix``) goes with the first."""
    msgs = []
    for i, (_, q, a) in enumerate(sample.qa):
        msgs += [prompt.Message("user", prefix + q if i == 0 else q, int(i == 0 and image)),
                 prompt.Message("assistant", a)]
    return msgs


def qa_batch(tokenizer, config, processor, split: str, start: int, n: int, seed: int, qpi: int):
    samples = list(itertools.islice(shapes.iter_samples(split, seed=seed, start=start, questions_per_image=qpi), n))
    batch = collate([make_example(tokenizer, qa_messages(s), [s.image], config, processor) for s in samples],
                    config.mod_target_token_type)
    return (batch, mx.array(np.stack([patch_labels(s.scene) for s in samples])),
            mx.array(np.stack([scene_labels(s.scene) for s in samples])), binding(samples, batch))
