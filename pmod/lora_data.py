"""LoRA finetuning without a runtime: the JSONL data (read, checked, batched) and the run's settings.

One row per line, the format the official LLaVA / p-MoD training reads::

    {"image": "images/0001.png",
     "conversations": [{"from": "human", "value": "<image>\\nwhat colour is the star?"},
                       {"from": "gpt", "value": "pink"}]}

``image`` (a path, or a list of paths, relative to the JSONL file) is optional: a row
without it is text-only. Roles are ``human``/``user``, ``gpt``/``assistant`` and an
optional leading ``system`` (it replaces the default system line). Turns alternate, user
first, and the last one is the assistant's; there may be several. Every image has its
``<image>`` marker in the user messages. The text is rendered and tokenized by
``pmod.prompt.tokenize_dialogue``, the template inference uses, and the loss goes on
the assistant tokens only.

A row that breaks a rule (bad JSON, unknown role, no ``<image>`` for an image, a missing
or unreadable image, an empty answer, longer than ``max_position_embeddings``, ...) is
reported as ``FILE:LINE: reason`` (lines counted from 1); ``on_bad_row="fail"`` then
raises, ``"skip"`` leaves it out. Nothing is dropped without a report.

Batches hold rows with equal (image tokens, routed vision tokens), so every row of a
batch is routed alike by the MoD layers (text-only rows: (0, 0)). The order of the
batches of epoch ``e`` is a function of ``(seed, e)`` only, so a resumed run sees the
batches an uninterrupted one would.

``TrainArgs`` / ``LoraSettings`` are the flags of ``pmod lora`` and what an adapter
changes; they are stored in ``adapter_config.json`` and read back by ``--resume``.

numpy and Pillow only (no runtime): any backend's trainer can use it.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from pmod import prompt
from pmod.errors import BadSetting, PmodError

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
ON_BAD_ROW = ("fail", "skip")
VALID_FRACTION = 0.1  # held out of a single .jsonl file
MAX_VALID_ROWS = 256
IMAGE_CACHE_BYTES = 1 << 30  # preprocessed pixels kept in memory up to this size


class BadRow(Exception):
    """A row that breaks a rule; the message is the reason (the caller adds FILE:LINE)."""


@dataclass
class Row:
    """One checked conversation: token ids (``None`` at image slots), loss mask, images."""

    source: str  # "FILE:LINE"
    tokens: list
    loss_mask: np.ndarray
    image_paths: list
    image_tokens: int
    routed_tokens: int
    _images: list | None = field(default=None, repr=False)  # cached pmod.image.ImageInput

    @property
    def key(self) -> tuple[int, int]:
        """Rows with the same key can share a batch."""
        return self.image_tokens, self.routed_tokens

    @property
    def length(self) -> int:
        return len(self.tokens) - len(self.image_paths) + self.image_tokens

    @property
    def loss_tokens(self) -> int:
        return int(self.loss_mask.sum())


@dataclass
class Data:
    train: list
    valid: list
    sources: list  # description lines (files read, rows kept / skipped, split)
    bad: list = field(default_factory=list)  # "FILE:LINE: reason" of skipped rows


# ------------------------------------------------------------------------------ one row
def parse_row(obj, base_dir: Path) -> tuple[list, str, list]:
    """``(messages, system, image_paths)`` of one decoded JSON row, or ``BadRow``."""
    if not isinstance(obj, dict):
        raise BadRow(f"a row must be a JSON object, got {type(obj).__name__}")
    conv = obj.get("conversations")
    if conv is None:
        raise BadRow("no 'conversations' list")
    if not isinstance(conv, list) or not conv:
        raise BadRow("'conversations' must be a non-empty list of {\"from\", \"value\"} turns")
    images = obj.get("image", obj.get("images"))
    if images is None:
        images = []
    elif isinstance(images, str):
        images = [images]
    elif not (isinstance(images, list) and all(isinstance(i, str) for i in images)):
        raise BadRow("'image' must be a path or a list of paths")
    if any(not i.strip() for i in images):
        raise BadRow("'image' holds an empty path")
    paths = [(base_dir / i) if not Path(i).is_absolute() else Path(i) for i in images]

    system, messages = prompt.SYSTEM, []
    for t, turn in enumerate(conv, 1):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise BadRow(f"turn {t} must be an object with 'from' and 'value'")
        role, value = ROLES.get(turn["from"]) if isinstance(turn["from"], str) else None, turn["value"]
        if role is None:
            raise BadRow(f"turn {t}: unknown role {turn['from']!r}; use human/user, gpt/assistant "
                         "(or system first)")
        if not isinstance(value, str):
            raise BadRow(f"turn {t}: 'value' must be a string")
        if role == "system":
            if t != 1:
                raise BadRow(f"turn {t}: a system message may only come first")
            system = value
            continue
        expected = "user" if not messages or messages[-1].role == "assistant" else "assistant"
        if role != expected:
            raise BadRow(f"turn {t}: expected a {'human' if expected == 'user' else 'gpt'} turn, got "
                         f"{turn['from']!r} (turns alternate, human first)")
        if not value.strip():
            raise BadRow(f"turn {t}: empty {'answer' if role == 'assistant' else 'message'}")
        n = value.count(prompt.IMAGE)
        if role == "assistant" and n:
            raise BadRow(f"turn {t}: an answer cannot hold {prompt.IMAGE}")
        messages.append(prompt.Message(role, value, n))
    if not messages:
        raise BadRow("no human / gpt turns")
    if messages[-1].role != "assistant":
        raise BadRow("the last turn must be the gpt answer")
    markers = sum(m.n_images for m in messages)
    if markers != len(paths):
        if not markers:
            raise BadRow(f"the row has {len(paths)} image(s) but no {prompt.IMAGE} marker: "
                         f"put '{prompt.IMAGE}\\n' in the human message")
        raise BadRow(f"{markers} {prompt.IMAGE} marker(s) for {len(paths)} image(s)")
    return messages, system, paths


def check_row(obj, base_dir: Path, source: str, tokenizer, config, processor=None,
              keep_images: bool = True) -> Row:
    """A fully checked :class:`Row` (template applied, images decoded), or ``BadRow``."""
    from pmod.image import preprocess

    messages, system, paths = parse_row(obj, base_dir)
    if paths and config.vision_config is None:
        raise BadRow("the row has an image but the model has no vision tower")
    try:
        tokens, mask = prompt.tokenize_dialogue(tokenizer, messages, system=system)
    except PmodError as e:
        raise BadRow(str(e)) from None
    inputs = []
    for p in paths:
        if not p.is_file():
            raise BadRow(f"image {p} not found")
        try:
            inputs.append(preprocess(p, config, processor))
        except PmodError as e:
            raise BadRow(str(e)) from None
    if not mask.any():
        raise BadRow("the answer is empty after tokenization")
    token_type = config.mod_target_token_type
    row = Row(source, tokens, mask, paths, sum(i.num_tokens for i in inputs),
              sum(int(i.routed_mask(token_type).sum()) for i in inputs), inputs if keep_images else None)
    limit = config.max_position_embeddings
    if row.length > limit:
        raise BadRow(f"{row.length} tokens ({row.image_tokens} of them image tokens) exceed the "
                     f"model's context of {limit} (max_position_embeddings)")
    return row


def row_images(row: Row, config, processor=None) -> list:
    """The row's preprocessed images (cached, or preprocessed again)."""
    if row._images is not None:
        return row._images
    from pmod.image import preprocess

    return [preprocess(p, config, processor) for p in row.image_paths]


# ------------------------------------------------------------------------------ files
def read_jsonl(path, tokenizer, config, processor=None, on_bad_row: str = "fail",
               report: Callable[[str], None] | None = None, cache_bytes: int = IMAGE_CACHE_BYTES
               ) -> tuple[list, list]:
    """``(rows, bad)``: every good row of ``path`` and ``"FILE:LINE: reason"`` of the bad ones.

    Each bad row is passed to ``report`` (default: printed to stderr) as it is found;
    with ``on_bad_row="fail"`` a ``PmodError`` follows once the whole file is read.
    Blank lines are not rows.
    """
    if on_bad_row not in ON_BAD_ROW:
        raise PmodError(f"on_bad_row must be one of {', '.join(ON_BAD_ROW)}, got {on_bad_row!r}")
    path = Path(path)
    report = report or (lambda line: print(line, file=sys.stderr))
    if not path.is_file():
        raise PmodError(f"data file {path} not found")
    rows, bad = [], []
    cached = 0
    base = path.parent
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise PmodError(f"cannot read data file {path} ({e.strerror or e})") from None
    with f:
        for n, line in enumerate(_lines(f, path), 1):
            if not line.strip():
                continue
            source = f"{path}:{n}"
            try:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise BadRow(f"bad JSON ({e.msg} at column {e.colno})") from None
                row = check_row(obj, base, source, tokenizer, config, processor, keep_images=cached < cache_bytes)
            except BadRow as e:
                bad.append(f"{source}: {e}")
                report(bad[-1])
                continue
            if row._images:
                cached += sum(i.pixel_values.nbytes for i in row._images)
            rows.append(row)
    if bad and on_bad_row == "fail":
        more = f" (and {len(bad) - 1} more, listed above)" if len(bad) > 1 else ""
        raise BadSetting(f"bad row {bad[0]}{more}; fix the data or pass {{on_bad_row}} skip", "on_bad_row")
    return rows, bad


def _lines(f, path: Path) -> Iterator[str]:
    try:
        yield from f
    except UnicodeDecodeError as e:
        raise PmodError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def load_data(data, tokenizer, config, processor=None, *, on_bad_row: str = "fail", seed: int = 0,
              need_valid: bool = True, report: Callable[[str], None] | None = None) -> Data:
    """Training and validation rows from ``data``: a ``.jsonl`` file (a seeded share of its rows
    is held out for validation) or a directory with ``train.jsonl`` and optional ``valid.jsonl``
    (held out from train.jsonl when absent)."""
    data = Path(data)
    kw = dict(tokenizer=tokenizer, config=config, processor=processor, on_bad_row=on_bad_row, report=report)
    if data.is_dir():
        train_file = data / "train.jsonl"
        if not train_file.is_file():
            raise PmodError(f"data directory {data} has no train.jsonl (and optional valid.jsonl)")
        files = [train_file] + ([data / "valid.jsonl"] if need_valid and (data / "valid.jsonl").is_file() else [])
    elif data.is_file():
        files = [data]
    else:
        raise PmodError(f"data {data} not found: pass a .jsonl file or a directory with train.jsonl")
    train, bad = read_jsonl(files[0], **kw)
    valid, sources = [], []
    if len(files) > 1:
        valid, bad2 = read_jsonl(files[1], **kw)
        bad += bad2
        if not valid:
            raise PmodError(f"{files[1]} has no usable rows")
    elif need_valid:
        train, valid = holdout(train, seed)
    if not train:
        raise PmodError(f"{files[0]} has no usable rows to train on")
    for f in files:
        sources.append(f"{f}")
    held = "" if len(files) > 1 or not valid else f" (held out of {files[0].name}, seed {seed})"
    sources.append(f"{len(train)} training rows, {len(valid)} validation rows{held}"
                   + (f"; {len(bad)} bad rows skipped" if bad else ""))
    return Data(train, valid, sources, bad)


def holdout(rows: list, seed: int, fraction: float = VALID_FRACTION, cap: int = MAX_VALID_ROWS
            ) -> tuple[list, list]:
    """``(train, valid)``: a seeded ``fraction`` of the rows (at least 1, at most ``cap``) held out."""
    if len(rows) < 2:
        return rows, []
    n = min(cap, max(1, round(len(rows) * fraction)))
    order = np.random.default_rng([int(seed), 0x7661]).permutation(len(rows))
    held = set(order[:n].tolist())
    return ([r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held])


# ------------------------------------------------------------------------------ batches
def epoch_batches(rows: list, batch_size: int, seed: int, epoch: int) -> list:
    """The batches (lists of row indices) of one epoch, in order: each key group shuffled and
    cut into batches of ``batch_size`` (a group's last batch may be smaller), then the
    batches shuffled. A function of ``(seed, epoch)`` only."""
    if batch_size < 1:
        raise PmodError(f"batch size must be >= 1, got {batch_size}")
    rng = np.random.default_rng([int(seed), int(epoch)])
    groups: dict = {}
    for i, r in enumerate(rows):
        groups.setdefault(r.key, []).append(i)
    batches = []
    for key in sorted(groups):
        idx = np.asarray(groups[key])[rng.permutation(len(groups[key]))].tolist()
        batches += [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def iterate_batches(rows: list, batch_size: int, seed: int, start: int = 0) -> Iterator[tuple[int, list]]:
    """``(step, row indices)`` for steps ``start, start + 1, ...`` without end (epoch after epoch)."""
    step, epoch = 0, 0
    while True:
        batches = epoch_batches(rows, batch_size, seed, epoch)
        if not batches:
            raise PmodError("no rows to batch")
        if step + len(batches) <= start:  # a whole epoch before the resume point
            step += len(batches)
            epoch += 1
            continue
        for b in batches:
            if step >= start:
                yield step, b
            step += 1
        epoch += 1


def eval_batches(rows: list, batch_size: int, limit: int = -1) -> list:
    """Validation batches in a fixed order (grouped by key); ``limit`` -1 = all."""
    groups: dict = {}
    for i, r in enumerate(rows):
        groups.setdefault(r.key, []).append(i)
    batches = [g[i:i + batch_size] for _, g in sorted(groups.items()) for i in range(0, len(g), batch_size)]
    return batches if limit is None or limit < 0 else batches[:limit]


# ------------------------------------------------------------------------------ settings
#: short name -> module path inside a decoder layer
TARGETS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
           "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
DEFAULT_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
#: targets outside the decoder layers (not adapted by default): short name -> module path in the model
MODEL_TARGETS = {"lm_head": "language_model.lm_head"}


@dataclass
class LoraSettings:
    """What an adapter changes (stored in ``adapter_config.json``)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple = DEFAULT_TARGETS
    num_layers: int = -1  # the last N decoder layers; -1 = all
    train_routers: bool = True
    train_projector: bool = False

    def __post_init__(self):
        self.target_modules = tuple(parse_targets(self.target_modules))
        if not (isinstance(self.rank, int) and self.rank >= 1):
            raise BadSetting(f"{{rank}} must be a positive integer, got {self.rank}", "rank")
        if not 0.0 <= self.dropout < 1.0:
            raise BadSetting(f"{{dropout}} must be in [0, 1), got {self.dropout}", "dropout")
        if not isinstance(self.num_layers, int) or (self.num_layers < 1 and self.num_layers != -1):
            raise BadSetting(f"{{num_layers}} must be >= 1 or -1 (all), got {self.num_layers}", "num_layers")

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    def layer_indices(self, n_layers: int) -> list[int]:
        if self.num_layers == -1 or self.num_layers >= n_layers:
            return list(range(n_layers))
        return list(range(n_layers - self.num_layers, n_layers))


def parse_targets(targets) -> list[str]:
    """``"q,k,v"`` or a list of short names (``q``) or module names (``q_proj``, ``self_attn.q_proj``)."""
    if isinstance(targets, str):
        targets = [t for t in targets.replace(" ", "").split(",") if t]
    out = []
    by_path = {v: k for k, v in TARGETS.items()}
    by_leaf = {v.split(".")[1]: k for k, v in TARGETS.items()}
    for t in targets:
        short = t if t in TARGETS or t in MODEL_TARGETS else by_path.get(t, by_leaf.get(t))
        if short is None:
            raise PmodError(f"unknown target module {t!r}: choose from {', '.join([*TARGETS, *MODEL_TARGETS])} "
                            "(or their names q_proj, ..., down_proj)")
        if short not in out:
            out.append(short)
    if not out:
        raise BadSetting("{target_modules} is empty", "target_modules")
    return out



@dataclass
class TrainArgs:
    """A run's settings (the CLI flags); stored in ``adapter_config.json`` for ``--resume``."""

    model: str = ""
    data: str = ""
    adapter_path: str = ""
    iters: int = 600
    batch_size: int = 8
    learning_rate: float = 1e-3
    warmup: int = 30
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str = ",".join(DEFAULT_TARGETS)
    num_layers: int = -1
    train_routers: bool = True
    train_projector: bool = False
    grad_checkpoint: bool = False
    val_batches: int = 25
    steps_per_eval: int = 200
    save_every: int = 100
    steps_per_report: int = 10
    seed: int = 0
    on_bad_row: str = "fail"
    dtype: str = "float32"
    max_grad_norm: float = 1.0

    def lora_settings(self) -> LoraSettings:
        return LoraSettings(rank=self.rank, alpha=self.alpha, dropout=self.dropout,
                            target_modules=self.target_modules, num_layers=self.num_layers,
                            train_routers=self.train_routers, train_projector=self.train_projector)


#: settings that fix the trajectory: a resumed run must keep them
RESUME_FIXED = ("model", "data", "batch_size", "learning_rate", "warmup", "rank", "alpha", "dropout", "target_modules",
                "num_layers", "train_routers", "train_projector", "seed", "dtype", "max_grad_norm")


def resolve_args(given: dict, resume: bool) -> TrainArgs:
    """Defaults, or on ``resume`` the saved run's settings, overridden by the flags ``given``
    (``None`` = not given). Changing a trajectory setting on resume is an error."""
    given = {k: v for k, v in given.items() if v is not None}
    if "adapter_path" not in given:
        raise BadSetting("{adapter_path} is required", "adapter_path")
    if not resume:
        for k in ("model", "data"):
            if k not in given:
                raise BadSetting(f"{{{k}}} is required", k)
        return TrainArgs(**given)
    from pmod.fuse import CONFIG_FILE, read_adapter_config

    saved = read_adapter_config(given["adapter_path"]).get("training")
    if not isinstance(saved, dict):
        raise PmodError(f"{given['adapter_path']}/{CONFIG_FILE} has no training settings to resume from")
    known = {f.name for f in fields(TrainArgs)}
    merged = {k: v for k, v in saved.items() if k in known}
    if isinstance(merged.get("target_modules"), list):
        merged["target_modules"] = ",".join(merged["target_modules"])
    for k, v in given.items():
        if k in RESUME_FIXED and k in merged and _norm(k, v) != _norm(k, merged[k]):
            raise BadSetting(f"{{resume}}: {{{k}}} {v} differs from the interrupted run's {merged[k]}; a resumed "
                             "run keeps its settings (start a new {adapter_path} instead)", "resume", k, "adapter_path")
        merged[k] = v
    return TrainArgs(**merged)


def _norm(key, v):
    if key == "target_modules":
        return tuple(parse_targets(v))
    if key in ("data", "model"):
        return str(Path(v).resolve())
    return v


def learning_rate(args: TrainArgs, step: int) -> float:
    """Linear warm-up, then cosine decay to 10% at ``iters``."""
    if step < args.warmup:
        return args.learning_rate * (step + 1) / args.warmup
    span = max(1, args.iters - args.warmup)
    done = min(1.0, (step - args.warmup) / span)
    return args.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done)))
