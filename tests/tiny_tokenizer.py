"""A tiny SentencePiece-style BPE tokenizer built with the `tokenizers` library."""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "what colour is the circle ? the circle is red .",
    "how many squares are there ? there are three squares .",
    "is there a blue star ? yes , there is a blue star .",
    "where is the green triangle ? the green triangle is on the left .",
    "a chat between a curious human and an artificial intelligence assistant .",
    "user : hello assistant : hi there , how can i help you today ?",
]


def write_tiny_tokenizer(directory, vocab_size: int = 97) -> Path:
    """Write tokenizer.json + tokenizer_config.json (ids: <unk>=0, <s>=1, </s>=2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "model_max_length": 512}))
    return directory
