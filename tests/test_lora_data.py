"""LoRA data: the LLaVA JSONL reader, bad rows as FILE:LINE, the split, batches by routing key."""

from __future__ import annotations

import json

import numpy as np
import pytest
from lora_fixtures import make_model, vision_config, write_shapes_jsonl

from pmod import prompt
from pmod.errors import PmodError
from pmod.format import read_config
from pmod.lora_data import (TrainArgs, epoch_batches, eval_batches, holdout, iterate_batches, load_data,
                            parse_targets, read_jsonl, resolve_args)
from pmod.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = make_model(tmp_path_factory.mktemp("lora-data"))
    return path, read_config(path), load_tokenizer(path)


GOOD = {"image": "images/train-0-0.png", "conversations": [
    {"from": "human", "value": "<image>\nwhat colour is it?"}, {"from": "gpt", "value": "red"}]}

BAD = [  # (line text, expected words in the reason)
    ('{"image": "images/train-0-0.png", "conversations": [', "bad JSON"),
    (json.dumps({"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "x"}]}),
     "unknown role 'bot'"),
    (json.dumps({**GOOD, "image": "images/nope.png"}), "not found"),
    (json.dumps({**GOOD, "conversations": [{"from": "human", "value": "what colour is it?"},
                                           {"from": "gpt", "value": "red"}]}), "no <image> marker"),
    (json.dumps({**GOOD, "conversations": [GOOD["conversations"][0], {"from": "gpt", "value": "  "}]}),
     "empty answer"),
    (json.dumps({"conversations": [{"from": "human", "value": "hello " * 600}, {"from": "gpt", "value": "hi"}]}),
     "exceed the model's context of 512"),
    ("[1, 2]", "JSON object"),
    (json.dumps({"conversations": [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "x"}]}),
     "1 <image> marker(s) for 0 image(s)"),
    (json.dumps({**GOOD, "image": "images/garbage.png"}), "not an image"),
    (json.dumps({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
                                   {"from": "human", "value": "c"}]}), "last turn must be the gpt answer"),
    (json.dumps({"conversations": [{"from": "gpt", "value": "a"}]}), "expected a human turn"),
]


def _write_bad_file(tmp_path):
    write_shapes_jsonl(tmp_path, n=1, text_rows=0)
    (tmp_path / "images" / "garbage.png").write_bytes(b"not a png at all")
    lines, expect = [json.dumps(GOOD), ""], {}  # line 2 is blank: not a row, but it counts
    for text, reason in BAD:
        lines.append(text)
        expect[len(lines)] = reason
        lines.append(json.dumps(GOOD))
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, expect


def test_every_bad_row_kind_is_reported_with_file_and_line(model, tmp_path):
    path_, config, tok = model
    path, expect = _write_bad_file(tmp_path)
    reported = []
    rows, bad = read_jsonl(path, tok, config, on_bad_row="skip", report=reported.append)
    assert reported == bad and len(bad) == len(BAD)
    for line, (n, reason) in zip(bad, expect.items()):
        assert line.startswith(f"{path}:{n}: "), line
        assert reason in line, (reason, line)
    assert len(rows) == len(BAD) + 1  # every good row kept
    assert [r.source for r in rows][:2] == [f"{path}:1", f"{path}:4"]


def test_fail_is_the_default_and_names_the_first_bad_row(model, tmp_path):
    _, config, tok = model
    path, expect = _write_bad_file(tmp_path)
    reported = []
    with pytest.raises(PmodError) as e:
        read_jsonl(path, tok, config, report=reported.append)
    first = min(expect)
    assert f"{path}:{first}: bad JSON" in str(e.value)
    assert f"and {len(BAD) - 1} more" in str(e.value) and "pass on_bad_row skip" in str(e.value)
    assert "pass --on-bad-row skip" in e.value.worded()  # what the CLI prints
    assert len(reported) == len(BAD)  # all of them were listed before failing
    with pytest.raises(PmodError, match="on_bad_row"):
        read_jsonl(path, tok, config, on_bad_row="ignore")


def test_rows_use_the_inference_template_and_mask_only_answers(model, tmp_path):
    _, config, tok = model
    path = tmp_path / "d.jsonl"
    write_shapes_jsonl(tmp_path, n=1, text_rows=0)
    row = {"image": "images/train-0-0.png", "conversations": [
        {"from": "system", "value": "be brief."},
        {"from": "human", "value": "<image>\nwhat colour is the circle?"}, {"from": "gpt", "value": "red"},
        {"from": "user", "value": "and the shape?"}, {"from": "assistant", "value": "circle"}]}
    path.write_text(json.dumps(row) + "\n")
    (r,), _ = read_jsonl(path, tok, config)
    msgs = [prompt.Message("user", "<image>\nwhat colour is the circle?", 1), prompt.Message("assistant", "red"),
            prompt.Message("user", "and the shape?"), prompt.Message("assistant", "circle")]
    tokens, mask = prompt.tokenize_dialogue(tok, msgs, system="be brief.")
    assert r.tokens == tokens and np.array_equal(r.loss_mask, mask)
    answer = tok.decode([t for t, m in zip(r.tokens, r.loss_mask) if m and t is not None])
    assert answer.replace(" ", "") == "red</s>circle</s>"
    assert r.key == (16, 16) and r.length == len(tokens) - 1 + 16


def test_split_and_directory_layouts(model, tmp_path):
    _, config, tok = model
    f = write_shapes_jsonl(tmp_path / "one", n=30, text_rows=3)
    a = load_data(f, tok, config, seed=1)
    b = load_data(f, tok, config, seed=1)
    c = load_data(f, tok, config, seed=2)
    assert len(a.valid) == 3 and len(a.train) == 30  # 10% of 33 rows held out
    assert [r.source for r in a.valid] == [r.source for r in b.valid] != [r.source for r in c.valid]
    assert not {r.source for r in a.valid} & {r.source for r in a.train}
    assert load_data(f, tok, config, need_valid=False).valid == []

    d = tmp_path / "dir"
    write_shapes_jsonl(d, n=10, text_rows=0)
    write_shapes_jsonl(d, n=4, text_rows=0, name="valid.jsonl", split="valid")
    data = load_data(d, tok, config)
    assert len(data.train) == 10 and len(data.valid) == 4
    (d / "valid.jsonl").unlink()
    assert (len(load_data(d, tok, config).train), len(load_data(d, tok, config).valid)) == (9, 1)
    with pytest.raises(PmodError, match="no train.jsonl"):
        load_data(tmp_path / "one" / "images", tok, config)
    with pytest.raises(PmodError, match="not found"):
        load_data(tmp_path / "nope.jsonl", tok, config)
    assert holdout([1], 0) == ([1], [])


def test_batches_group_rows_by_routing_key_and_resume_mid_stream(tmp_path):
    """Anyres images of different shapes give different image-token counts: never mixed in a batch."""
    pytest.importorskip("pmod_mlx")
    from pmod_mlx.train import Example, collate

    from pmod.lora_data import row_images

    config = vision_config(image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad",
                           image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]], mod_target_token_type="vision_hr")
    path = make_model(tmp_path, config)
    tok = load_tokenizer(path)
    f = write_shapes_jsonl(tmp_path / "d", n=18, text_rows=3, sizes=[(40, 24), (24, 40), (32, 32)])
    rows, _ = read_jsonl(f, tok, config)
    keys = {r.key for r in rows}
    assert len(keys) >= 3 and (0, 0) in keys
    assert all(r.routed_tokens < r.image_tokens for r in rows if r.image_tokens)  # vision_hr: base view unrouted
    for batch in epoch_batches(rows, 4, seed=0, epoch=0):
        assert len({rows[i].key for i in batch}) == 1 and 1 <= len(batch) <= 4
        b = collate([Example(rows[i].tokens, rows[i].loss_mask, row_images(rows[i], config)) for i in batch],
                    config.mod_target_token_type)
        assert b.ids.shape[0] == len(batch)
    assert sorted(i for b in epoch_batches(rows, 4, 0, 0) for i in b) == list(range(len(rows)))
    assert epoch_batches(rows, 4, 0, 0) == epoch_batches(rows, 4, 0, 0) != epoch_batches(rows, 4, 0, 1)
    full = iterate_batches(rows, 4, seed=3)
    stream = [next(full) for _ in range(25)]
    resumed = iterate_batches(rows, 4, seed=3, start=17)
    assert [next(resumed) for _ in range(8)] == stream[17:]
    assert len(eval_batches(rows, 4, limit=2)) == 2 and eval_batches(rows, 4) == eval_batches(rows, 4)


def test_settings_parsing_and_resume_rules(tmp_path):
    assert parse_targets("q,v,gate_proj,self_attn.o_proj") == ["q", "v", "gate", "o"]
    with pytest.raises(PmodError, match="unknown target module 'qq'"):
        parse_targets("qq")
    with pytest.raises(PmodError, match="^data is required"):
        resolve_args({"adapter_path": "x", "model": "m", "data": None}, resume=False)
    assert resolve_args({"adapter_path": "x", "model": "m", "data": "d", "rank": None}, False).rank == TrainArgs().rank
    with pytest.raises(PmodError, match="no adapter_config.json"):
        (tmp_path / "a").mkdir()
        resolve_args({"adapter_path": str(tmp_path / "a")}, resume=True)
