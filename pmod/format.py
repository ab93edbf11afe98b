"""The pmod checkpoint directory: one format that every runtime loads.

A directory holds ``config.json`` (the full :class:`PmodConfig` plus
``pmod_format_version``), the weights as ``model.safetensors`` or shards
``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``, and the
tokenizer files copied as they came. Tensor names are uniform: a MoD layer is named
like a dense layer plus ``router.weight`` / ``router.bias``. See docs/FORMAT.md.

Loading validates everything and raises one ``PmodError`` naming the tensor or file;
writing goes to a temporary directory that is renamed into place, so a failed or
interrupted write leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from pmod.config import FORMAT_VERSION, PmodConfig
from pmod.errors import PmodError
from pmod.quantization import PACKED, packed_weights, quantize_shapes, require_float
from pmod.safetensors_io import float32_to_bf16_bits, read_header, read_tensors, to_float32, write_file
from pmod.schedule import layer_ratios

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "generation_config.json", "chat_template.json", "chat_template.jinja",
    "preprocessor_config.json", "processor_config.json",
)
FLOAT_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
SHARD_BYTES = 2 * 1024**3


def expected_tensors(config: PmodConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name of a model with this config, and its shape (a quantized linear:
    its packed weight, scales and biases, ``pmod.quantization``)."""
    c = config
    H, I, V, D = c.hidden_size, c.intermediate_size, c.vocab_size, c.head_dim
    q, kv = c.num_attention_heads * D, c.num_key_value_heads * D
    t = {"language_model.embed_tokens.weight": (V, H), "language_model.norm.weight": (H,)}
    if not c.tie_word_embeddings:
        t["language_model.lm_head.weight"] = (V, H)
    for i, ratio in enumerate(layer_ratios(c)):
        p = f"language_model.layers.{i}."
        t[p + "input_layernorm.weight"] = (H,)
        t[p + "post_attention_layernorm.weight"] = (H,)
        for name, shape, bias in (("q_proj", (q, H), c.qkv_bias), ("k_proj", (kv, H), c.qkv_bias),
                                  ("v_proj", (kv, H), c.qkv_bias), ("o_proj", (H, q), c.o_bias)):
            t[p + f"self_attn.{name}.weight"] = shape
            if bias:
                t[p + f"self_attn.{name}.bias"] = shape[:1]
        for name, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
            t[p + f"mlp.{name}.weight"] = shape
            if c.mlp_bias:
                t[p + f"mlp.{name}.bias"] = shape[:1]
        if ratio is not None:
            t[p + "router.weight"] = (1, H)
            if c.mod_bias_enabled:
                t[p + "router.bias"] = (1,)
    t.update(multimodal_tensors(c))
    t.update(vision_tensors(c))
    return quantize_shapes(c, t)


def vision_tensors(config: PmodConfig) -> dict[str, tuple[int, ...]]:
    """CLIP vision tower tensors, named as in ``transformers.CLIPVisionModel`` under ``vision_tower.``.

    Only what computing hidden state ``mm_vision_select_layer`` needs is stored: layers past
    it and ``post_layernorm`` are never run by LLaVA, so they are not part of the format.
    """
    v = config.vision_config
    if v is None:
        return {}
    D, I, size, patch, channels = v.hidden_size, v.intermediate_size, v.image_size, v.patch_size, v.num_channels
    n_pos = (size // patch) ** 2 + 1
    p = "vision_tower."
    t = {
        p + "embeddings.class_embedding": (D,),
        p + "embeddings.patch_embedding.weight": (D, channels, patch, patch),
        p + "embeddings.position_embedding.weight": (n_pos, D),
        p + "pre_layrnorm.weight": (D,), p + "pre_layrnorm.bias": (D,),
    }
    for i in range(vision_layers_used(config)):
        q = f"{p}encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            t[q + f"self_attn.{name}.weight"], t[q + f"self_attn.{name}.bias"] = (D, D), (D,)
        for name in ("layer_norm1", "layer_norm2"):
            t[q + f"{name}.weight"], t[q + f"{name}.bias"] = (D,), (D,)
        t[q + "mlp.fc1.weight"], t[q + "mlp.fc1.bias"] = (I, D), (I,)
        t[q + "mlp.fc2.weight"], t[q + "mlp.fc2.bias"] = (D, I), (D,)
    return t


def vision_layers_used(config: PmodConfig) -> int:
    """Encoder layers needed for hidden state ``mm_vision_select_layer`` (-2: all but the last)."""
    L = config.vision_config.num_hidden_layers
    sel = config.mm_vision_select_layer
    # hidden_states[0] is the embedding output, hidden_states[i] the output of layer i.
    n = sel if sel >= 0 else L + 1 + sel
    if not 0 <= n <= L:
        raise PmodError(f"config key 'mm_vision_select_layer' = {sel} is outside the tower's {L} layers")
    return n


def multimodal_tensors(config: PmodConfig) -> dict[str, tuple[int, ...]]:
    """Projector and ``image_newline`` tensors (the vision tower is added by the vision runtime)."""
    c = config
    t: dict[str, tuple[int, ...]] = {}
    if c.mm_projector_type is None:
        return t
    if c.mm_hidden_size is None:
        raise PmodError("config key 'mm_hidden_size' is required with 'mm_projector_type'")
    H = c.hidden_size
    if c.mm_projector_type == "linear":
        t["projector.linear_1.weight"], t["projector.linear_1.bias"] = (H, c.mm_hidden_size), (H,)
    elif c.mm_projector_type == "mlp2x_gelu":
        t["projector.linear_1.weight"], t["projector.linear_1.bias"] = (H, c.mm_hidden_size), (H,)
        t["projector.linear_2.weight"], t["projector.linear_2.bias"] = (H, H), (H,)
    else:
        raise PmodError(
            f"config key 'mm_projector_type' has unknown value {c.mm_projector_type!r}: "
            "expected 'linear' or 'mlp2x_gelu'")
    if "unpad" in (c.mm_patch_merge_type or ""):
        t["image_newline"] = (H,)
    return t


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, from its index if sharded."""
    index = path / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise PmodError(f"{index} is corrupt (no 'weight_map'); re-convert the checkpoint") from None
        files = sorted(set(weight_map.values()))
        for f in files:
            if not (path / f).exists():
                raise PmodError(f"{path / f} is missing (listed in {INDEX_FILE}); re-copy or re-convert the checkpoint")
        return [path / f for f in files]
    if (path / SINGLE_FILE).exists():
        return [path / SINGLE_FILE]
    raise PmodError(f"{path} holds no {SINGLE_FILE} or {INDEX_FILE}: not a pmod checkpoint directory")


def read_config(path: str | Path) -> PmodConfig:
    path = Path(path)
    if not path.is_dir():
        raise PmodError(f"model directory {path} does not exist")
    raw_path = path / "config.json"
    config = PmodConfig.from_file(path)
    version = config.extra.get("pmod_format_version")
    if version is None:
        raise PmodError(
            f"{raw_path} has no 'pmod_format_version': convert the checkpoint first (pmod convert SRC DST)")
    if version != FORMAT_VERSION:
        raise PmodError(
            f"{raw_path}: pmod format version {version} is not supported by this pmod "
            f"(expects {FORMAT_VERSION}); re-convert the checkpoint")
    return config


def validate(path: str | Path) -> tuple[PmodConfig, dict[str, tuple[Path, str]]]:
    """Check a checkpoint directory; return its config and ``{tensor: (file, dtype)}``."""
    path = Path(path)
    config = read_config(path)
    expected = expected_tensors(config)
    packed = packed_weights(config)
    found: dict[str, tuple[Path, str]] = {}
    for f in weight_files(path):
        for name, info in read_header(f).items():
            if name in found:
                raise PmodError(f"tensor '{name}' appears in two files ({found[name][0].name}, {f.name})")
            if name not in expected:
                raise PmodError(
                    f"unexpected tensor '{name}' in {f}: the checkpoint does not match its config.json "
                    "(layer count, MoD schedule, tie_word_embeddings?)")
            if tuple(info["shape"]) != expected[name]:
                raise PmodError(
                    f"tensor '{name}' in {f} has shape {tuple(info['shape'])}, expected {expected[name]} "
                    "from config.json")
            if name in packed and info["dtype"] != PACKED:
                raise PmodError(
                    f"tensor '{name}' in {f} has dtype {info['dtype']}; expected U32 (a packed quantized weight)")
            if name not in packed and info["dtype"] not in FLOAT_DTYPES.values():
                raise PmodError(
                    f"tensor '{name}' in {f} has dtype {info['dtype']}; expected F32, F16 or BF16")
            found[name] = (f, info["dtype"])
    missing = [n for n in expected if n not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise PmodError(f"tensor '{missing[0]}'{more} is missing from {path}; re-convert the checkpoint")
    return config, found


def load_numpy(path: str | Path, quantized: bool = False) -> tuple[PmodConfig, dict[str, np.ndarray]]:
    """Validate and load every tensor as float32 numpy (for numpy/torch consumers).

    A quantized checkpoint is refused unless ``quantized``; then its packed weights come
    back as they are stored (uint32).
    """
    config, found = validate(path)
    if not quantized:
        require_float(config, path, "pmod.format.load_numpy")
    out = {}
    by_file: dict[Path, list[str]] = {}
    for name, (f, _) in found.items():
        by_file.setdefault(f, []).append(name)
    for f, names in by_file.items():
        arrays = read_tensors(f, names)
        for name in names:
            out[name] = _widened(arrays[name], found[name][1])
    return config, out


def tensor_loaders(path: str | Path) -> tuple[PmodConfig, dict[str, tuple[Path, str]], dict]:
    """``(config, found, {name: loader})``: each loader reads one tensor (memory-mapped) as
    ``load_numpy`` would, so a large checkpoint can be rewritten one tensor at a time."""
    config, found = validate(path)
    maps = {f: read_tensors(f) for f in {f for f, _ in found.values()}}
    return config, found, {name: (lambda a=maps[f][name], st=st: _widened(a, st)) for name, (f, st) in found.items()}


def stored_dtype(found: dict[str, tuple[Path, str]]) -> str:
    """The float dtype holding most of a checkpoint's float tensors (its dtype on disk)."""
    names = {v: k for k, v in FLOAT_DTYPES.items()}
    kinds = [names[st] for _, st in found.values() if st in names]
    return max(set(kinds), key=kinds.count)


def _widened(arr: np.ndarray, st_dtype: str) -> np.ndarray:
    return np.asarray(arr) if st_dtype == PACKED else to_float32(arr, st_dtype)


def _encode(arr: np.ndarray, dtype: str) -> tuple[str, np.ndarray]:
    if dtype == PACKED:
        if np.asarray(arr).dtype != np.uint32:
            raise PmodError(f"a packed quantized weight must be uint32, got {np.asarray(arr).dtype}")
        return PACKED, np.asarray(arr)
    st = FLOAT_DTYPES[dtype]
    if st == "BF16":
        return st, float32_to_bf16_bits(np.asarray(arr, dtype=np.float32))
    return st, np.asarray(arr, dtype=np.float16 if st == "F16" else np.float32)


@contextmanager
def atomic_dir(dst: str | Path):
    """Yield a temporary directory that becomes ``dst`` only if the block succeeds."""
    dst = Path(dst)
    if dst.exists():
        raise PmodError(f"output {dst} already exists; remove it or choose another path")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_config(dst: Path, config: PmodConfig, dtype: str) -> None:
    """``dst/config.json`` of a checkpoint whose float tensors are ``dtype``."""
    cfg = config.to_dict()
    cfg["torch_dtype"] = dtype
    (Path(dst) / "config.json").write_text(json.dumps(cfg, indent=2))


def save_checkpoint(dst: str | Path, config: PmodConfig, tensors: dict[str, np.ndarray],
                    dtype: str = "float16", tokenizer_dir: str | Path | None = None,
                    shard_bytes: int = SHARD_BYTES, progress=None) -> Path:
    """Write a validated pmod checkpoint directory atomically.

    ``tensors`` maps pmod names to arrays (any float dtype; a callable returning the
    array is accepted too, so large checkpoints convert one tensor at a time). A quantized
    config's packed weights are uint32 arrays, written as they are; ``dtype`` is that of
    every other tensor.
    """
    if dtype not in FLOAT_DTYPES:
        raise PmodError(f"unknown dtype {dtype!r}: choose one of {', '.join(FLOAT_DTYPES)}")
    expected = expected_tensors(config)
    unexpected = [n for n in tensors if n not in expected]
    if unexpected:
        raise PmodError(f"tensor '{unexpected[0]}' does not belong to a model with this config")
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise PmodError(f"tensor '{missing[0]}' is missing; cannot write the checkpoint")
    packed = packed_weights(config)
    itemsize = 4 if dtype == "float32" else 2

    def nbytes_of(name: str) -> int:
        return (4 if name in packed else itemsize) * int(np.prod(expected[name]))

    shards: list[list[str]] = [[]]
    size = 0
    for name in expected:
        nbytes = nbytes_of(name)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    dst = Path(dst)
    with atomic_dir(dst) as tmp:
        files = [SINGLE_FILE] if len(shards) == 1 else [
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        weight_map = {}
        for fname, names in zip(files, shards):
            chunk = {}
            for name in names:
                arr = tensors[name]
                arr = arr() if callable(arr) else arr
                if tuple(arr.shape) != expected[name]:
                    raise PmodError(f"tensor '{name}' has shape {tuple(arr.shape)}, expected {expected[name]}")
                chunk[name] = _encode(arr, PACKED if name in packed else dtype)
                weight_map[name] = fname
                if progress is not None:
                    progress(name)
            write_file(tmp / fname, chunk)
        if len(files) > 1:
            total = sum(nbytes_of(n) for n in expected)
            (tmp / INDEX_FILE).write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        write_config(tmp, config, dtype)
        if tokenizer_dir is not None:
            copy_tokenizer(tokenizer_dir, tmp)
        validate(tmp)
    return dst


def copy_tokenizer(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer files present in ``src`` as they are."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied
