"""The checkpoint's own tokenizer, through the Hugging Face tokenizer libraries."""

from __future__ import annotations

from pathlib import Path

from .errors import PmodError


def load_tokenizer(model_dir: str | Path):
    """``transformers.AutoTokenizer`` from the checkpoint directory (no hub access)."""
    model_dir = Path(model_dir)
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        raise PmodError(
            f"{model_dir} has no tokenizer (tokenizer.json or tokenizer.model); "
            "copy the original checkpoint's tokenizer files into it")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise PmodError("the tokenizer needs transformers: pip install transformers tokenizers") from None
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any loader failure is a bad tokenizer file
        raise PmodError(f"cannot load the tokenizer in {model_dir} ({type(e).__name__}: {e})".split("\n")[0]) from None


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
