"""The checkpoint's own tokenizer, through the Hugging Face tokenizer libraries."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from pmod.errors import PmodError


def load_tokenizer(model_dir: str | Path):
    """``transformers.AutoTokenizer`` from the checkpoint directory (no hub access)."""
    model_dir = Path(model_dir)
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        raise PmodError(
            f"{model_dir} has no tokenizer (tokenizer.json or tokenizer.model); "
            "copy the original checkpoint's tokenizer files into it")
    try:
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise PmodError("the tokenizer needs transformers: pip install transformers tokenizers") from None
    # transformers warns that config.json's model_type (pmod_llava_llama) is not one of its own.
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any loader failure is a bad tokenizer file
        raise PmodError(f"cannot load the tokenizer in {model_dir} ({type(e).__name__}: {e})".split("\n")[0]) from None
    finally:
        hf_logging.set_verbosity(level)


def encode(tokenizer, text: str) -> np.ndarray:
    """Token ids of ``text`` (with BOS as the tokenizer adds it); the context is checked by the engine."""
    return np.asarray(tokenizer(text, verbose=False)["input_ids"], dtype=np.int32)


class StreamingDetokenizer:
    """Turns a growing token list into text increments.

    Decoding the whole list and emitting the new suffix keeps SentencePiece spaces and
    multi-byte characters right; a suffix ending in U+FFFD (an incomplete UTF-8
    sequence) is held back until the next token completes it.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.emitted = ""

    def add(self, token: int) -> str:
        self.tokens.append(int(token))
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.emitted):
            return ""
        new, self.emitted = text[len(self.emitted):], text
        return new

    def finish(self) -> str:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        new = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted = text
        return new
