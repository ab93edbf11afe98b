"""Train the embedded default model: a small p-MoD LLaVA, from scratch, in MLX.

The task is pmod's synthetic shapes VQA (``pmod.shapes``). The model is built from the
project's own pieces: a CLIP-architecture ViT, the ``mlp2x_gelu`` projector, a 12-layer
LLaMA decoder with the shifted-cosine PRD schedule whose routers train jointly, the
Vicuna v1 template (``pmod.prompt``), and a BPE tokenizer trained here on the task's
text with the Hugging Face ``tokenizers`` library. The result is written atomically as
a float16 pmod checkpoint.

    python scripts/train_default_model.py --out pmod/models/shapes-pmod --minutes 40
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import pmod_mlx  # noqa: F401  (fast BLAS before mlx)
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from tqdm import tqdm

from pmod import prompt, shapes
from pmod.config import PmodConfig
from pmod.format import save_checkpoint
from pmod.image import ImageProcessorConfig
from pmod.init import random_weights
from pmod_mlx.model import Model
from pmod_mlx.train import answer_accuracy, collate, loss_fn, make_example
from pmod_mlx.vision import sanitize

IMAGE_SIZE, PATCH = 96, 8  # 12 x 12 = 144 vision tokens per image


def model_config(vocab_size: int, bos: int, eos: int, width: int = 128) -> PmodConfig:
    """The shipped model's shape (``width`` 128); tests train a narrower one."""
    vwidth = width * 3 // 4
    vision = dict(hidden_size=vwidth, intermediate_size=4 * vwidth, num_hidden_layers=5, num_attention_heads=4,
                  image_size=IMAGE_SIZE, patch_size=PATCH, num_channels=3, hidden_act="quick_gelu",
                  layer_norm_eps=1e-5, model_type="clip_vision_model")
    return PmodConfig(
        vocab_size=vocab_size, hidden_size=width, intermediate_size=3 * width, num_hidden_layers=12,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=bos, eos_token_id=eos, pad_token_id=0,
        mod_target_layers="shiftedcos_decay_0.85_0.15", mod_router_factor=0.5, mod_weight_norm="tanh_0.2_1",
        mod_bias_enabled=True, mod_target_token_type="vision_all",
        mm_projector_type="mlp2x_gelu", mm_hidden_size=vwidth, mm_vision_select_layer=-2,
        mm_vision_select_feature="patch", mm_patch_merge_type="flat", image_aspect_ratio="square",
        vision_config=vision,
    )


def train_tokenizer(directory: Path, seed: int) -> None:
    """A BPE tokenizer (SentencePiece-style spaces) trained on the task's text and the template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    corpus = [prompt.SYSTEM, "USER: ASSISTANT:", " ".join(shapes.vocabulary())]
    for s in shapes.make_samples("train", 3000, seed=seed, questions_per_image=3):
        corpus.extend(f"{q} {a}" for _, q, a in s.qa)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"],
                                                        show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": "<unk>", "model_max_length": 1024}, indent=2))


def examples(tokenizer, config, processor, split: str, start: int, n: int, seed: int, qpi: int):
    out = []
    for s in itertools.islice(shapes.iter_samples(split, seed=seed, start=start, questions_per_image=qpi), n):
        msgs = []
        for i, (_, q, a) in enumerate(s.qa):
            msgs += [prompt.Message("user", q, 1 if i == 0 else 0), prompt.Message("assistant", a)]
        out.append(make_example(tokenizer, msgs, [s.image], config, processor))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output pmod checkpoint directory (must not exist)")
    p.add_argument("--minutes", type=float, default=40.0, help="training time budget")
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps (default: the budget)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--questions-per-image", type=int, default=6)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=300, help="steps between validation accuracy checks")
    p.add_argument("--val-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=128, help="decoder width (the vision tower is 3/4 of it)")
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        print(f"train_default_model: error: {out} already exists", file=sys.stderr)
        return 2
    mx.random.seed(args.seed)
    from transformers import AutoTokenizer

    work = Path(tempfile.mkdtemp(prefix="pmod-train-"))
    train_tokenizer(work, args.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(work))
    config = model_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, args.width)
    processor = ImageProcessorConfig.for_model(config)
    model = Model(config)
    weights = {k: mx.array(v) for k, v in random_weights(config, seed=args.seed).items()}
    model.load_weights(list(sanitize(weights).items()), strict=True)
    n_params = sum(v.size for _, v in nn.utils.tree_flatten(model.parameters()))
    print(f"model: {n_params / 1e6:.2f}M parameters, vocab {config.vocab_size}", file=sys.stderr)

    budget = args.minutes * 60
    total_steps = args.steps or 10**9

    def learning_rate(step: int, elapsed: float) -> float:
        """Linear warm-up, then a cosine decay to 5% over the step or time budget."""
        if step < args.warmup:
            return args.learning_rate * (step + 1) / args.warmup
        done = step / args.steps if args.steps else elapsed / budget
        return args.learning_rate * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(done, 1.0))))

    opt = optim.AdamW(learning_rate=args.learning_rate, betas=[0.9, 0.95], weight_decay=0.01)
    step_fn = nn.value_and_grad(model, loss_fn)
    val = collate(examples(tokenizer, config, processor, "valid", 0, args.val_size, args.seed, 1),
                  config.mod_target_token_type)

    start = time.perf_counter()
    seen_tokens, step, sample_i = 0, 0, 0
    bar = tqdm(total=args.steps, unit="step", dynamic_ncols=True)
    history, losses = [], []
    while step < total_steps and time.perf_counter() - start < budget:
        batch = collate(examples(tokenizer, config, processor, "train", sample_i, args.batch_size, args.seed,
                                 args.questions_per_image), config.mod_target_token_type)
        sample_i += args.batch_size
        opt.learning_rate = learning_rate(step, time.perf_counter() - start)
        loss, grads = step_fn(model, batch)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state, loss)
        step += 1
        losses.append(round(loss.item(), 4))
        seen_tokens += batch.n_tokens
        elapsed = time.perf_counter() - start
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{seen_tokens / elapsed:.0f}")
        if step % args.eval_every == 0:
            right, n = answer_accuracy(model, val)
            history.append((step, round(elapsed), loss.item(), right / n))
            tqdm.write(f"step {step}  {elapsed / 60:.1f} min  loss {loss.item():.3f}  "
                       f"validation accuracy {right / n:.1%}", file=sys.stderr)
    bar.close()
    right, n = answer_accuracy(model, val)
    elapsed = time.perf_counter() - start
    print(f"trained {step} steps in {elapsed / 60:.1f} min; validation accuracy {right / n:.1%}", file=sys.stderr)
    tensors = {k: np.array(v.astype(mx.float32)) for k, v in nn.utils.tree_flatten(model.parameters())}
    c = tensors.get("vision_tower.embeddings.patch_embedding.weight")
    tensors["vision_tower.embeddings.patch_embedding.weight"] = c.transpose(0, 3, 1, 2)  # MLX -> torch layout
    save_checkpoint(out, config, tensors, dtype="float16", tokenizer_dir=work)
    (out / "training.json").write_text(json.dumps({
        "steps": step, "minutes": round(elapsed / 60, 1), "batch_size": args.batch_size,
        "learning_rate": args.learning_rate, "seed": args.seed, "validation_accuracy": right / n,
        "history": history, "losses": losses}, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
