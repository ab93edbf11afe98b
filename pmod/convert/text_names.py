"""The text decoder's tensor names, per text model family: source names <-> pmod names.

Every source layout hands the text model's tensors over under the names its family's
``<Family>ForCausalLM`` gives them (``model.embed_tokens.weight``,
``model.layers.N.self_attn.q_proj.weight``, ``model.norm.weight``, ``lm_head.weight``):
the official LLaVA layout saves them so, a llava-hf layout first strips its
``language_model.`` nesting. pmod names them ``language_model.*`` (docs/FORMAT.md).
:data:`TEXT_NAMES` holds one :class:`TextNames` per family, keyed like
``PmodConfig.text_model_type`` (``pmod.architectures``): a second text architecture adds
one entry there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Collection, NamedTuple

from pmod.config import PmodConfig
from pmod.errors import PmodError

LM_HEAD = "language_model.lm_head.weight"


class TextTensor(NamedTuple):
    """A source tensor of the text model, read."""

    pmod: str | None       # its pmod name; None when pmod drops it
    layer: int | None      # the decoder layer it belongs to (None: embeddings, norm, head)
    wrapped: bool = False  # named through p-MoD's MoD-layer wrapper


@dataclass(frozen=True)
class TextNames:
    """One family's tensor names, both ways.

    ``read(name, mod_wrapper)``: the :class:`TextTensor` of a ``<Family>ForCausalLM``
    tensor name, None when ``name`` is no text-model tensor of this family.
    ``mod_wrapper``: the source may name MoD layers through p-MoD's wrapper (the official
    code; llava-hf models are dense and never do).
    ``source_name(pmod, wrapped)``: the inverse (for messages), layers in ``wrapped``
    named through the wrapper; None when ``pmod`` is no text-model name.
    """

    read: Callable[[str, bool], TextTensor | None]
    source_name: Callable[[str, Collection[int]], str | None]


# ----------------------------------------------------------------------------------- LLaMA
# pmod's own text-model names are LLaMA's, so the LLaMA mapping is a change of prefix.
_LLAMA_TOP = {
    "model.embed_tokens.weight": "language_model.embed_tokens.weight",
    "model.norm.weight": "language_model.norm.weight",
    "lm_head.weight": LM_HEAD,
}
_LLAMA_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_PMOD_LAYER_RE = re.compile(r"^language_model\.layers\.(\d+)\.(.+)$")
# The official code wraps each MoD layer: ``model.layers.N.decoder_layer.<part>`` holds the
# LLaMA layer, ``model.layers.N.router.router.<p>`` its router (pmod: ``router.<p>``).
_WRAPPED_LAYER = "decoder_layer."
_WRAPPED_ROUTER = "router.router."


def read_llama_tensor(name: str, mod_wrapper: bool) -> TextTensor | None:
    """A ``LlamaForCausalLM`` tensor ``name`` as pmod reads it (see :class:`TextNames`)."""
    if name in _LLAMA_TOP:
        return TextTensor(_LLAMA_TOP[name], None)
    m = _LLAMA_LAYER_RE.match(name)
    if m is None:
        return None
    idx, part = int(m.group(1)), m.group(2)
    if mod_wrapper:
        if part.startswith(_WRAPPED_LAYER):
            return TextTensor(f"language_model.layers.{idx}.{part[len(_WRAPPED_LAYER):]}", idx, True)
        if part.startswith(_WRAPPED_ROUTER):
            return TextTensor(f"language_model.layers.{idx}.router.{part[len(_WRAPPED_ROUTER):]}", idx, True)
        if part.startswith("router."):
            return None  # routers exist only inside the wrapper
    return TextTensor(f"language_model.layers.{idx}.{part}", idx)


def llama_source_name(pmod: str, wrapped: Collection[int]) -> str | None:
    """The ``LlamaForCausalLM`` name of a pmod text-model tensor (see :class:`TextNames`)."""
    for k, v in _LLAMA_TOP.items():
        if v == pmod:
            return k
    m = _PMOD_LAYER_RE.match(pmod)
    if m is None:
        return None
    idx, part = int(m.group(1)), m.group(2)
    if idx not in wrapped:
        return f"model.layers.{idx}.{part}"
    if part.startswith("router."):
        return f"model.layers.{idx}.{_WRAPPED_ROUTER}{part[len('router.'):]}"
    return f"model.layers.{idx}.{_WRAPPED_LAYER}{part}"


#: The text model families pmod convert reads, by ``PmodConfig.text_model_type``.
TEXT_NAMES: dict[str, TextNames] = {"llama": TextNames(read_llama_tensor, llama_source_name)}


# ------------------------------------------------------------------------------ for layouts
def text_names(config: PmodConfig) -> TextNames:
    """The tensor names of ``config``'s text model family."""
    names = TEXT_NAMES.get(config.text_model_type)
    if names is None:
        raise PmodError(f"pmod convert has no tensor names for text model {config.text_model_type!r}: "
                        f"it reads {', '.join(sorted(TEXT_NAMES))}")
    return names


def read_text_tensor(name: str, config: PmodConfig, mod_wrapper: bool = False) -> TextTensor | None:
    """``name`` (as ``<Family>ForCausalLM`` saves it) read as a tensor of ``config``'s text model;
    None when it is none."""
    t = text_names(config).read(name, mod_wrapper)
    if t is not None and t.pmod == LM_HEAD and config.tie_word_embeddings:
        return t._replace(pmod=None)  # tied: the embeddings are the output projection
    return t


def recomputed_buffer(name: str) -> bool:
    """A buffer older transformers saved with the weights (RoPE's ``inv_freq``): pmod recomputes
    it from ``rope_theta`` and drops it."""
    return name.endswith("rotary_emb.inv_freq")
