"""TensorRT optimisation profiles of the exported graphs, computed from the export manifest.

Every dynamic dimension of an exported graph's inputs is named in the manifest
(docs/EXPORT.md); this module gives each name a ``(min, opt, max)`` per graph, from the
declared context ``T`` (``max_context``), the vision maximum ``N`` (``max_vision_tokens``),
per-layer capacities ``C_l = kept_count(N, r_l)`` and each TopK stage's share ``K_ls`` of it:

========== ========= ================================ ======================================
graph      profile   dimension                        min / opt / max
========== ========= ================================ ======================================
embed      tokens    ``tokens`` (a text segment)      1 / min(T, OPT_TEXT) / T
vision     image     ``tiles``, ``image_tokens``      1 / M / M, M of the largest image
prefill,   first     ``text_len`` (unrouted tokens)   0 / min(T-1, OPT_TEXT) / T-1
prefill_B            ``vision_len`` (prefill only)    1 / N / N
                     ``keep_l_s`` (prefill only)      0 / K_ls / K_ls
                     ``past_len_l``                   0 / 0 / 0
           later     as ``first``, and ``past_len_l`` 0 / min(T-1, OPT_HISTORY + C_l) / T-1
decode     step      ``text_len``                     1 / 1 / 1
                     ``past_len_l``                   0 / min(T-1, OPT_HISTORY + C_l) / T-1
decode     chunk     ``text_len``                     1 / min(T, OPT_TEXT) / T
                     ``past_len_l``                   0 / 0 / T-1
========== ========= ================================ ======================================

Why these ranges: a prefill chunk holds ``n >= 1`` routed vision tokens (else it goes to the
decode graph), so its text and every layer's past are at most ``T - 1``; an all-vision
chunk has ``text_len = 0``, and a MoD layer may keep no token of a small image, so those
start at 0. ``first`` serves a prompt on an empty cache (the common case: kernels tuned for
no history), ``later`` a chunk on top of earlier turns.

Memory does not follow the profile maxima: no profile can say that text, vision and history
*together* stay within ``T``, and the corner where text and history both reach ``T - 1``
would be a ``T x 2T`` score tensor per head (8.7 GB in float32 at LLaVA-NeXT-7B). The
runtime therefore creates its contexts with user-managed memory and gives each run what
TensorRT says the current shapes need (``update_device_memory_size_for_shapes``; the build
turns on runtime activation resizing where TensorRT has it).

Per-layer KV lengths. A MoD layer holds fewer tokens than a dense one (``text + k_l`` vision
tokens against ``text + n``), so the decode step profile tunes each layer for its own
length: ``OPT_HISTORY`` text tokens plus the ``C_l`` vision tokens it keeps of one full
image. The *maximum* cannot be lowered per layer: a text-only context of ``T`` tokens fills
every layer, MoD or not, so each past range ends at ``T - 1``.

Each graph's profiles are tried in order and the first that accepts a call's shapes is used
(:func:`select_profile`): decode ``step`` (one token, the hot path) before ``chunk`` (text
chunks of any length), prefill ``first`` before ``later``.
"""

from __future__ import annotations

from dataclasses import dataclass

from pmod.errors import PmodError
from pmod.static.contract import is_bucket, keep_names, layer_stages, stage_sizes

#: Prompt text tokens the prefill, text-chunk and embed profiles are tuned for.
OPT_TEXT = 64
#: Text tokens (prompt + answer so far) a layer holds in the decode profile it is tuned for.
OPT_HISTORY = 256


@dataclass
class Profile:
    """One optimisation profile: input name -> ``(min, opt, max)`` shapes (dynamic inputs only)."""

    name: str
    shapes: dict[str, tuple[list[int], list[int], list[int]]]

    def to_dict(self) -> dict:
        return {"name": self.name,
                "shapes": {k: {"min": list(a), "opt": list(b), "max": list(c)} for k, (a, b, c) in self.shapes.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "Profile":
        return cls(name=str(d["name"]), shapes={str(k): ([int(x) for x in v["min"]], [int(x) for x in v["opt"]],
                                                         [int(x) for x in v["max"]])
                                                for k, v in d["shapes"].items()})

    def accepts(self, shapes: dict[str, tuple]) -> bool:
        """Whether every input of ``shapes`` this profile ranges over lies within its min..max."""
        for name, (lo, _, hi) in self.shapes.items():
            s = shapes.get(name)
            if s is None or len(s) != len(lo) or any(not a <= x <= b for a, x, b in zip(lo, s, hi)):
                return False
        return True


def select_profile(profiles: list[Profile], shapes: dict[str, tuple]) -> int | None:
    """Index of the first profile that accepts ``shapes`` (None: none does)."""
    return next((i for i, p in enumerate(profiles) if p.accepts(shapes)), None)


def vision_limits(config) -> tuple[int, int]:
    """``(tiles, image_tokens)`` of the largest single image the model takes (vision graph maxima).

    LLaVA-1.5: one tile and its plan. LLaVA-NeXT anyres: for each grid pinpoint, the base tile
    plus the grid, and the uncropped packed map (``spatial_unpad`` only removes rows or
    columns, so an image of the pinpoint's own aspect gives the most tokens).
    """
    from pmod.image import anyres_plan, layout, pack_plan, patches_per_side, grid_pinpoints

    tile = config.vision_config.image_size
    if layout(config) != "anyres":
        return 1, int(pack_plan((tile, tile), config).shape[0])
    P = patches_per_side(config)
    tiles = tokens = 0
    for w, h in grid_pinpoints(config):
        grid = (w // tile, h // tile)
        tiles = max(tiles, 1 + grid[0] * grid[1])
        tokens = max(tokens, int(anyres_plan((w, h), grid, P).shape[0]))
    return tiles, tokens


def _clip(lo: int, opt: int, hi: int) -> tuple[int, int, int]:
    return lo, max(lo, min(opt, hi)), hi


def dimension_ranges(export, graph: str, profile: str) -> dict[str, tuple[int, int, int]]:
    """``name -> (min, opt, max)`` of the dynamic dimensions of ``graph`` in ``profile``
    (``export``: a :class:`pmod.static.manifest.Manifest`)."""
    T, caps = export.max_context, export.capacities
    L = len(caps)
    if graph == "embed":
        return {"tokens": _clip(1, OPT_TEXT, T)}
    if graph == "vision":
        tiles, tokens = vision_limits(export.pmod_config)
        return {"tiles": (1, tiles, tiles), "image_tokens": (1, tokens, tokens)}
    history = {f"past_len_{l}": _clip(0, OPT_HISTORY + caps[l], T - 1) for l in range(L)}
    if graph == "prefill" or is_bucket(graph):
        if profile not in ("first", "later"):
            raise PmodError(f"no optimisation profile '{profile}' for graph '{graph}'")
        dims = {"text_len": _clip(0, OPT_TEXT, T - 1)}
        if graph == "prefill":
            N = export.max_vision_tokens
            dims["vision_len"] = (1, N, N)
            for l, stages in enumerate(layer_stages(export.pmod_config, N, export.retention)):
                for name, k in zip(keep_names(l, stages or 0), stage_sizes(caps[l], stages or 0)):
                    dims[name] = (0, k, k)
        past = {f"past_len_{l}": (0, 0, 0) for l in range(L)} if profile == "first" else history
        return {**dims, **past}
    if graph == "decode" and profile == "step":
        return {"text_len": (1, 1, 1), **history}
    if graph == "decode" and profile == "chunk":
        return {"text_len": _clip(1, OPT_TEXT, T), **{f"past_len_{l}": (0, 0, T - 1) for l in range(L)}}
    raise PmodError(f"no optimisation profile '{profile}' for graph '{graph}'")


def profile_names(graph: str) -> tuple[str, ...]:
    """``graph``'s profiles, most specific first (:func:`select_profile` takes the first that fits)."""
    if graph == "prefill" or is_bucket(graph):
        return ("first", "later")
    return {"embed": ("tokens",), "vision": ("image",), "decode": ("step", "chunk")}[graph]


def graph_profiles(export, graph: str) -> list[Profile]:
    """The optimisation profiles of one exported graph (``export``: its manifest)."""
    spec = export.graphs[graph]
    out = []
    for name in profile_names(graph):
        dims = dimension_ranges(export, graph, name)
        shapes = {}
        for t in spec.inputs:
            if all(isinstance(d, int) for d in t.shape):
                continue  # static: nothing to range over
            bounds = []
            for d in t.shape:
                if isinstance(d, int):
                    bounds.append((d, d, d))
                elif d in dims:
                    bounds.append(dims[d])
                else:
                    raise PmodError(f"input '{t.name}' of the {graph} graph has a dimension '{d}' that pmod_trt does "
                                    "not know how to range; export with this pmod's 'pmod export onnx'")
            shapes[t.name] = tuple([b[i] for b in bounds] for i in range(3))
        out.append(Profile(name, shapes))
    return out


def all_profiles(export) -> dict[str, list[Profile]]:
    """``graph -> profiles`` for every graph of the export."""
    return {g: graph_profiles(export, g) for g in export.graphs}
