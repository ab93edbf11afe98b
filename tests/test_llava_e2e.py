"""Image to answer, end to end: converted llava-hf checkpoints against transformers, and a
p-MoD LLaVA-NeXT official-layout checkpoint against the float64 reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from builders import random_tensors
from hf_llava import load_hf_llava, make_clip_tower, make_hf_llava
from official_checkpoint import make_official_checkpoint, tiny_official_config
from pmod.app.cli import main
from pmod.convert import convert_checkpoint
from pmod.app.session import open_session
from reference import Reference

pytest.importorskip("pmod_mlx")  # sessions run on the default backend, MLX
pytest.importorskip("torch")  # the expected values come from transformers
pytest.importorskip("transformers")

QUESTION = "what colour is the circle ?"
# The Vicuna v1 template, written out (official conv_vicuna_v1), image first.
TEMPLATED = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
             "gives helpful, detailed, and polite answers to the user's questions. USER: <image>\n"
             f"{QUESTION} ASSISTANT:")


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("kind,size", [("1.5", (40, 30)), ("next", (50, 31)), ("next", (23, 61))])
def test_llava_hf_matches_transformers(tmp_path, kind, size, capsys):
    import torch
    from transformers import AutoProcessor

    src = make_hf_llava(tmp_path / "hf", kind=kind, seed=3)
    dst = convert_checkpoint(src, tmp_path / "pmod", dtype="float32")
    image = _image(*size)
    image.save(tmp_path / "img.png")

    hf = load_hf_llava(src)
    processor = AutoProcessor.from_pretrained(str(src))
    inputs = processor(images=image, text=TEMPLATED, return_tensors="pt")
    with torch.no_grad():
        expected = hf(**inputs).logits[0, -1].double().numpy()
        gen = hf.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected_text = processor.tokenizer.decode(gen[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    session = open_session(dst, dtype="float32")
    prefill = session.encode(TEMPLATED, images=[image])
    assert prefill["inputs_embeds"].shape[0] == inputs["input_ids"].shape[1]  # same image-token count
    got = session.engine.prefill(**prefill)
    np.testing.assert_allclose(got, expected, atol=1e-4)

    assert main(["generate", "--model", str(dst), "--image", str(tmp_path / "img.png"), "--prompt", QUESTION,
                 "--max-tokens", "6", "--temp", "0", "--dtype", "float32"]) == 0
    assert capsys.readouterr().out == expected_text + "\n"


def test_pmod_next_image_to_logits_matches_reference(tmp_path):
    """Official layout + --vision-tower; features from transformers' own CLIP, packing and
    projector (the reference image features), decoder by the float64 reference."""
    import torch
    from transformers import CLIPVisionModel

    from pmod.format import load_numpy
    from pmod.image import preprocess

    config = tiny_official_config(num_hidden_layers=8, mod_decay_span=7, mm_hidden_size=24,
                                  mod_target_token_type="vision_all",
                                  image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]],
                                  vision_config=None)
    tensors = random_tensors(config, seed=4)
    src = make_official_checkpoint(tmp_path / "src", config, tensors, "safetensors", "float32", vision_tower=False)
    tower = make_clip_tower(tmp_path / "clip", seed=5)
    dst = convert_checkpoint(src, tmp_path / "dst", dtype="float32", vision_tower=tower)
    pconfig, weights = load_numpy(dst)

    image = _image(45, 30, seed=1)
    session = open_session(dst, dtype="float32")
    prefill = session.encode(TEMPLATED, images=[image])
    got = session.engine.prefill(**prefill)

    # Reference image features: transformers' CLIP, numpy projector, the shared packing plan.
    clip = CLIPVisionModel.from_pretrained(str(tower)).eval()
    img = preprocess(image, pconfig, session.processor)
    with torch.no_grad():
        hidden = clip(torch.from_numpy(img.pixel_values), output_hidden_states=True).hidden_states[-2][:, 1:]
    f = hidden.double().numpy().reshape(-1, hidden.shape[-1])
    w1, b1 = weights["projector.linear_1.weight"], weights["projector.linear_1.bias"]
    w2, b2 = weights["projector.linear_2.weight"], weights["projector.linear_2.bias"]
    h = f @ w1.T.astype(np.float64) + b1
    h = 0.5 * h * (1 + np.vectorize(math.erf)(h / np.sqrt(2)))  # exact GELU
    feats = h @ w2.T.astype(np.float64) + b2
    rows = np.concatenate([feats, weights["image_newline"][None].astype(np.float64)])
    packed = rows[img.feature_index()]
    embeds = prefill["inputs_embeds"].astype(np.float64)
    mask = prefill["vision_mask"]
    np.testing.assert_allclose(embeds[mask], packed, atol=1e-5)  # the image features themselves
    embeds[mask] = packed
    ref = Reference(pconfig.to_dict(), weights)
    expected = ref.prefill(embeds=embeds, vision_mask=mask)[-1]
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert session.engine.kv_lengths() == ref.kv_lengths()
    assert min(ref.kv_lengths()) < max(ref.kv_lengths())  # MoD layers really dropped tokens


def test_checkpoint_chat_template(tmp_path):
    """--chat-template: the llava-hf checkpoint's own template, as its processor renders it."""
    import torch
    from transformers import AutoProcessor

    from pmod.app.generate import Sampler, SamplerArgs
    from pmod.prompt import Message
    from pmod.app.session import Reply

    src = make_hf_llava(tmp_path / "hf", kind="next", seed=2)
    dst = convert_checkpoint(src, tmp_path / "pmod", dtype="float32")
    image = _image(37, 52, seed=3)
    processor = AutoProcessor.from_pretrained(str(src))
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(chat, add_generation_prompt=True)
    assert "<image>" in text and "A chat between" not in text  # the checkpoint's template, not Vicuna's
    inputs = processor(images=image, text=text, return_tensors="pt")
    with torch.no_grad():
        expected = load_hf_llava(src)(**inputs).logits[0, -1].double().numpy()

    session = open_session(dst, dtype="float32", chat_template=True)
    assert session.render([Message("user", QUESTION, 1)]) == text
    reply = Reply()
    list(session.ask(QUESTION, images=[image], max_tokens=1, sampler=Sampler(SamplerArgs()), reply=reply))
    assert reply.stats.prompt_tokens == inputs["input_ids"].shape[1]
    session.engine.reset()
    got = session.engine.prefill(**session.encode(text, images=[image]))
    np.testing.assert_allclose(got, expected, atol=1e-4)
