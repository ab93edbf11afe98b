"""Training pieces shared by from-scratch training and LoRA finetuning.

An example is a LLaVA conversation (``pmod.prompt.tokenize_dialogue``: the same template
and tokenization as inference) plus its images (``pmod.image.preprocess``). A batch
holds rows with the same number of image tokens and routed vision tokens, so the MoD
layers route every row the same way (see ``language.Routing``); rows are right-padded.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from pmod import prompt
from pmod.errors import PmodError


@dataclass
class Example:
    tokens: list  # ids, None at image slots
    loss_mask: np.ndarray  # bool per token
    images: list  # pmod.image.ImageInput, one per slot

    @property
    def image_tokens(self) -> int:
        return sum(i.num_tokens for i in self.images)

    def length(self) -> int:
        return len(self.tokens) - len(self.images) + self.image_tokens


def make_example(tokenizer, messages: list[prompt.Message], images=(), config=None, processor=None) -> Example:
    from pmod.image import preprocess

    tokens, mask = prompt.tokenize_dialogue(tokenizer, messages)
    inputs = [preprocess(img, config, processor) for img in images]
    if tokens.count(None) != len(inputs):
        raise PmodError(f"{tokens.count(None)} <image> slots for {len(inputs)} images")
    return Example(tokens, mask, inputs)


@dataclass
class Batch:
    ids: mx.array  # [B, T] (0 at image tokens and padding)
    targets: mx.array  # [B, T] next token
    weights: mx.array  # [B, T] 1 where the next token is an assistant token
    vision_mask: np.ndarray  # [B, T] routed vision tokens (host: routing is planned there)
    image_pos: mx.array | None  # [B, n_img] sequence position of each image token
    image_rows: mx.array | None  # [B, n_img] row in concat(all tiles' features, newline)
    pixel_values: mx.array | None  # [n_tiles, 3, S, S]
    n_tokens: int  # real (unpadded) tokens


def collate(examples: list[Example], token_type: str = "vision_hr", pad_id: int = 0) -> Batch:
    if len({e.image_tokens for e in examples}) != 1:
        raise PmodError("a batch needs rows with the same number of image tokens")
    T = max(e.length() for e in examples)
    B = len(examples)
    ids = np.full((B, T), pad_id, np.int32)
    loss = np.zeros((B, T), bool)
    vision = np.zeros((B, T), bool)
    image_pos, image_rows, tiles = [], [], []
    row_base = 0  # rows of earlier tiles in the concatenated feature matrix
    n_feature_rows = sum(i.pixel_values.shape[0] * i.tokens_per_tile for e in examples for i in e.images)
    for b, e in enumerate(examples):
        t, it, pos, rows = 0, iter(e.images), [], []
        for tok, m in zip(e.tokens, e.loss_mask):
            if tok is None:
                img = next(it)
                n = img.num_tokens
                pos.extend(range(t, t + n))
                rows.extend(img.feature_index(offset=row_base, newline_row=n_feature_rows))
                vision[b, t:t + n] = img.routed_mask(token_type)
                tiles.append(img.pixel_values)
                row_base += img.pixel_values.shape[0] * img.tokens_per_tile
                t += n
            else:
                ids[b, t], loss[b, t] = tok, m
                t += 1
        image_pos.append(pos)
        image_rows.append(rows)
    if len({int(v.sum()) for v in vision}) != 1:
        raise PmodError("a batch needs rows with the same number of routed vision tokens")
    targets = np.zeros_like(ids)
    targets[:, :-1] = ids[:, 1:]
    weights = np.zeros((B, T), np.float32)
    weights[:, :-1] = loss[:, 1:]
    has_images = bool(tiles)
    return Batch(
        ids=mx.array(ids), targets=mx.array(targets), weights=mx.array(weights), vision_mask=vision,
        image_pos=mx.array(np.asarray(image_pos, np.int32)) if has_images else None,
        image_rows=mx.array(np.asarray(image_rows, np.int32)) if has_images else None,
        pixel_values=mx.array(np.concatenate(tiles)) if has_images else None,
        n_tokens=sum(e.length() for e in examples),
    )


def input_embeddings(model, batch: Batch, features: mx.array | None = None) -> mx.array:
    """Token embeddings with the packed image features written at the image positions;
    ``features`` are the projected tile features ``[n_tiles, P*P, H]`` when the caller has
    them already (default: ``model.encode_images`` of the batch's pixels)."""
    lm = model.language_model
    x = lm.embed_tokens(batch.ids)
    if batch.pixel_values is None:
        return x
    feats = model.encode_images(batch.pixel_values.astype(x.dtype)) if features is None else features
    rows = [feats.reshape(-1, feats.shape[-1]).astype(x.dtype)]
    if "image_newline" in model:
        rows.append(model.image_newline[None].astype(x.dtype))
    packed = mx.concatenate(rows)[batch.image_rows]  # [B, n_img, H]
    return mx.put_along_axis(x, batch.image_pos[..., None], packed, axis=1)


def answer_loss(logits: mx.array, batch: Batch) -> mx.array:
    """Mean cross-entropy over the assistant tokens."""
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), batch.targets, reduction="none")
    return (ce * batch.weights).sum() / mx.maximum(batch.weights.sum(), 1.0)


def loss_fn(model, batch: Batch) -> mx.array:
    """Mean cross-entropy over the assistant tokens."""
    logits = model.language_model(inputs_embeds=input_embeddings(model, batch), vision_mask=batch.vision_mask)
    return answer_loss(logits, batch)


def answer_rows_right(model, batch: Batch) -> np.ndarray:
    """Per row, whether its every reply token is the argmax (teacher-forced; with one reply
    per row this is greedy exact match)."""
    logits = model.language_model(inputs_embeds=input_embeddings(model, batch), vision_mask=batch.vision_mask)
    right = (mx.argmax(logits, axis=-1) == batch.targets) | (batch.weights == 0)
    return np.array(mx.all(right, axis=1))
