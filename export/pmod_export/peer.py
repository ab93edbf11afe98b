"""What a torch user runs today on the same weights: transformers' ``LlamaForCausalLM``.

``pmod.app.bench.peers`` (``scripts/torch_vs_transformers.py``) times the torch backend
against it in one process. It is the dense model (routers unused) with transformers' own
``sdpa`` attention and ``DynamicCache``; numpy in and out, like an engine.
"""

from __future__ import annotations

from . import torch_loader  # noqa: F401  (imports torch; before it, see there)

import inspect

import numpy as np
import torch

from pmod.convert.text_names import llama_source_name
from pmod.engine import Stopwatch
from pmod.errors import PmodError
from pmod.format import load_numpy

from .model import torch_dtype
from .torch_engine import CudaStopwatch, torch_device


class TransformersPeer:
    """``prefill(inputs_embeds)`` / ``decode(token)`` -> last logits ``[V]`` float32; ``decode_greedy``,
    ``stopwatch`` and ``reset()`` as an engine has them."""

    def __init__(self, path, dtype: str | None = None, device: str | None = None):
        try:
            from transformers import LlamaConfig, LlamaForCausalLM
        except ImportError as e:
            raise PmodError(f"the transformers comparison needs transformers ({e.name or e} is missing): "
                            "pip install 'pmod[export]'") from None

        config, tensors = load_numpy(path)
        if config.text_model_type != "llama" or config.qkv_bias != config.o_bias:
            raise PmodError(f"{path}: no transformers twin here for text model {config.text_model_type!r} "
                            "with these biases (the peer is transformers' LLaMA)")
        c, self.device = config, torch_device(device)
        hf = LlamaConfig(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
            max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings,
            attention_bias=c.qkv_bias, mlp_bias=c.mlp_bias, rope_theta=c.rope_theta,
            rope_scaling=dict(c.rope_scaling) if c.rope_scaling else None)
        hf._attn_implementation = "sdpa"
        with self.device:  # built (and initialised) where it runs, then given the checkpoint's weights
            model = LlamaForCausalLM(hf).to(torch_dtype(dtype))
        hf_names = {n: llama_source_name(n, ()) for n in tensors if ".router." not in n}  # the converter's names
        state = {hf_names[n]: torch.tensor(a, dtype=torch_dtype(dtype), device=self.device)
                 for n, a in tensors.items() if hf_names.get(n)}
        if c.tie_word_embeddings:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or [m for m in missing if "rotary_emb" not in m]:
            raise PmodError(f"{path}: the checkpoint does not fit transformers' LLaMA (missing {missing[:2]}, "
                            f"unexpected {unexpected[:2]}); report this as a bug")
        self.model, self.dtype = model.eval().requires_grad_(False), torch_dtype(dtype)
        # transformers 5 renamed the cache argument ('past_key_values' still works, with a warning), and
        # 4.45-4.49 name the last-logits-only argument num_logits_to_keep
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.keep = {k: 1 for k in ("logits_to_keep", "num_logits_to_keep") if k in params}
        self.reset()

    def reset(self) -> None:
        self.past, self.position = None, 0

    def _run(self, **inputs) -> torch.Tensor:
        from transformers import DynamicCache

        if self.past is None:
            self.past = DynamicCache()
        with torch.inference_mode():
            out = self.model(**inputs, **{self.cache_arg: self.past}, **self.keep, use_cache=True)
        return out.logits[0, -1]

    def prefill(self, inputs_embeds) -> np.ndarray:
        x = torch.from_numpy(np.asarray(inputs_embeds)).to(self.device, self.dtype)[None]
        self.position += x.shape[1]
        return self._run(inputs_embeds=x).float().cpu().numpy()

    def _step(self, token_id: int) -> torch.Tensor:
        self.position += 1
        return self._run(input_ids=torch.tensor([[int(token_id)]], device=self.device))

    def decode(self, token_id: int) -> np.ndarray:
        return self._step(token_id).float().cpu().numpy()

    def decode_greedy(self, token_id: int) -> int:
        return int(self._step(token_id).argmax())

    def stopwatch(self) -> Stopwatch:
        return CudaStopwatch(self.device) if self.device.type == "cuda" else Stopwatch()
