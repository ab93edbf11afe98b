"""`pmod chat` and multi-turn sessions: caches kept across turns, no recomputation."""

from __future__ import annotations

import argparse
import io

import numpy as np
import pytest

import pmod
from builders import random_tensors, tiny_config, write_checkpoint
from pmod import prompt
from pmod.app.chat import run_chat
from pmod.app.generate import generate_tokens
from pmod.app.session import Reply, open_session
from tiny_tokenizer import write_tiny_tokenizer

pytest.importorskip("pmod_mlx")  # sessions run on the default backend, MLX


@pytest.fixture
def model(tmp_path):
    config = tiny_config(max_position_embeddings=256)
    path = write_checkpoint(tmp_path, config, random_tensors(config, seed=5))
    write_tiny_tokenizer(path, config.vocab_size)
    return path


def _ids(tok, text, bos):
    ids = tok(text)["input_ids"]
    return ids if bos else ids[1:]


def test_second_turn_extends_the_cache(model):
    session = open_session(model, dtype="float32")
    tok = session.tokenizer
    r1, r2 = Reply(), Reply()
    "".join(session.ask("what colour is the circle ?", max_tokens=6, reply=r1))
    pos1 = session.engine.position
    "".join(session.ask("is there a blue star ?", max_tokens=6, reply=r2))
    # Turn 2 prefilled only its own tokens: turn 1's last token (sampled when max_tokens ran
    # out, so not yet fed), then </s> + "USER: ... ASSISTANT:".
    turn1 = _ids(tok, prompt.SYSTEM + " USER: what colour is the circle ? ASSISTANT:", True)
    turn2 = _ids(tok, "</s>USER: is there a blue star ? ASSISTANT:", False)
    assert r1.stats.finish_reason == "length"
    assert pos1 == len(turn1) + r1.stats.generated_tokens - 1
    assert r2.stats.prompt_tokens == 1 + len(turn2)

    # Replaying turn 1's generated ids plus turn 2 in one prefill on a fresh engine gives
    # the same second reply: the kept caches hold exactly that context.
    engine = pmod.open_engine(model, dtype="float32")
    gen1 = list(generate_tokens(engine, np.array(turn1), max_tokens=6, eos_ids=session.eos_ids))
    assert tok.decode(gen1, skip_special_tokens=True) == r1.text
    engine.reset()
    gen2 = list(generate_tokens(engine, np.array(turn1 + gen1 + turn2), max_tokens=6, eos_ids=session.eos_ids))
    assert tok.decode(gen2, skip_special_tokens=True) == r2.text


def test_chat_repl(model):
    args = argparse.Namespace(model=str(model), backend="mlx", dtype="float32", temp=0.0, top_p=1.0, seed=None,
                              max_tokens=5)
    stdin = io.StringIO("what colour is the circle ?\n/image /no/such.png\n/bogus\n/reset\n"
                        "what colour is the circle ?\n/exit\nnever read\n")
    out, err = io.StringIO(), io.StringIO()
    run_chat(args, stdin=stdin, stdout=out, stderr=err)
    replies = out.getvalue().splitlines()
    assert len(replies) == 2 and replies[0] == replies[1]  # /reset: the same question, the same answer
    log = err.getvalue()
    assert "pmod: error:" in log and "/no/such.png" in log  # a bad image keeps the chat going
    assert "unknown command /bogus" in log and "(context cleared)" in log


def test_image_on_text_only_model_names_vision_tower(model):
    session = open_session(model, dtype="float32")
    with pytest.raises(pmod.PmodError, match="--vision-tower"):
        list(session.ask("what is this ?", images=[np.zeros((8, 8, 3), np.uint8)]))


def test_stop_strings(model):
    session = open_session(model, dtype="float32")
    full = Reply()
    text = "".join(session.ask("what colour is the circle ?", max_tokens=12, reply=full))
    assert len(text) > 3
    stop = text[2:4]
    session.reset()
    cut = Reply()
    got = "".join(session.ask("what colour is the circle ?", max_tokens=12, stop=[stop], reply=cut))
    assert got == text[: text.find(stop)] and cut.stats.finish_reason == "stop"
