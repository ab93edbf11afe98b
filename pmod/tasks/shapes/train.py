"""Train the embedded default model: a small p-MoD LLaVA, from scratch, in MLX.

The task is pmod's synthetic shapes VQA (``pmod.tasks.shapes``). The model is built from the
project's own pieces: a CLIP-architecture ViT, the ``mlp2x_gelu`` projector, a 12-layer
LLaMA decoder with the shifted-cosine PRD schedule whose routers train jointly, the
Vicuna v1 template (``pmod.prompt``), and a BPE tokenizer trained here on the task's
text with the Hugging Face ``tokenizers`` library. The result is written atomically as
a float16 pmod checkpoint.

Two stages, as LLaVA builds on a pretrained vision tower:

1. *Vision pretraining* (``--vision-minutes``): the ViT alone learns dense scene labels
   the generator knows for free (small linear heads on the features the projector reads):
   per patch, the colour and shape of the object covering it, its side of the image and
   whether an object's centre lies in it; per image, from the mean of the patch features,
   how many objects of each colour, shape and pair there are and the side of each one
   that is unique (the facts the count, existence and position questions ask for, where
   a decoder head that spreads its attention over the image reads them). A label is far
   cheaper to learn from than a one-word answer behind a 12-layer decoder, and the ViT
   step costs a fifth of the full model's.
2. *Instruction tuning* (the rest of ``--minutes``): the whole model, routers included,
   on multi-turn question answering (loss on the answers), with the scene labels kept as
   an auxiliary loss so the tower keeps what it learned, and a binding loss
   (``--bind-weight``) that steers one attention head, from where each answer is
   predicted, to the object its question names (``binding_loss``).

The label heads and the binding loss are not part of the checkpoint. ``--workers 2``
(default) trains data parallel in two processes, which on MLX's CPU backend nearly
doubles throughput (``pmod_mlx.parallel``).

Training from scratch is MLX work, so this module (and ``batches`` and ``losses`` beside
it) imports ``mlx`` and ``pmod_mlx`` directly rather than going through ``open_engine``;
the scene labels are ``labels`` (numpy only). ``scripts/train_default_model.py`` runs
``main``.

    python scripts/train_default_model.py --out pmod/models/shapes-pmod
"""

from __future__ import annotations

import argparse
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

from pmod import prompt
from pmod.config import PmodConfig
from pmod.errors import PmodError
from pmod.format import save_checkpoint
from pmod.image import ImageProcessorConfig
from pmod.init import random_weights
from pmod.tasks import shapes
from pmod.tasks.shapes.batches import Binding, qa_batch, vision_batch
from pmod.tasks.shapes.labels import IMAGE_SIZE, KINDS, PATCH
from pmod.tasks.shapes.losses import LabelHeads, LayerInput, bind_layer, binding_loss, language_logits
from pmod_mlx.model import Model
from pmod_mlx.parallel import launch
from pmod_mlx.train import answer_loss, answer_rows_right
from pmod_mlx.vision import sanitize


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
        corpus.append("\n" + s.qa[0][1])  # a first question follows "<image>\n"
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


class Trainee(nn.Module):
    def __init__(self, model: Model, heads: LabelHeads):
        super().__init__()
        self.model, self.heads = model, heads


def full_loss(t: Trainee, batch, labels: mx.array, scene: mx.array, bind: Binding, aux_weight: float,
              bind_weight: float) -> mx.array:
    m = t.model
    features = m.vision_tower(batch.pixel_values)
    caught = LayerInput(bind_layer(m.config))
    logits = language_logits(m, batch, m.projector(features), caught)
    return (answer_loss(logits, batch) + aux_weight * t.heads.loss(features, labels, scene)
            + bind_weight * binding_loss(m, caught.h, batch, bind))


# ------------------------------------------------------------------------------ training


def schedule(peak: float, warmup: int, step: int, done: float) -> float:
    """Linear warm-up over ``warmup`` steps, then a cosine decay to 5% as ``done`` goes 0 -> 1."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(done, 1.0))))


def run_stage(group, name: str, trainee: nn.Module, loss, make_batch, args, budget_s: float,
              max_steps: int | None, peak_lr: float, warmup: int, evaluate=None, log=None) -> int:
    """Train ``trainee`` on ``loss(trainee, *make_batch(step, group))`` until the time or step
    budget; rank 0 decides when to stop and the learning rate, the other ranks follow
    (``Group.all_mean``)."""
    opt = optim.AdamW(learning_rate=peak_lr, betas=[0.9, 0.95], weight_decay=0.01)
    step_fn = nn.value_and_grad(trainee, loss)
    lead = group.rank == 0
    bar = tqdm(total=max_steps, unit="step", desc=name, dynamic_ncols=True, disable=not lead, file=sys.stderr)
    start = time.perf_counter()
    step, seen, info = 0, 0, {"stop": False}
    while not info["stop"]:
        inputs = make_batch(step, group)
        value, grads = step_fn(trainee, *inputs)
        elapsed = time.perf_counter() - start
        done = step / max_steps if max_steps else elapsed / budget_s
        info = {"lr": schedule(peak_lr, warmup, step, done),
                "stop": (step + 1 >= max_steps) if max_steps else elapsed >= budget_s}
        grads, info = group.all_mean(grads, info)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.learning_rate = info["lr"]
        opt.update(trainee, grads)
        mx.eval(trainee.parameters(), opt.state, value)
        step += 1
        if lead:
            seen += inputs[0].n_tokens if hasattr(inputs[0], "n_tokens") else inputs[0].shape[0]
            rate = seen * group.size / (time.perf_counter() - start)
            bar.update(1)
            bar.set_postfix(loss=f"{value.item():.3f}",
                            **({"tok_s": f"{rate:.0f}"} if hasattr(inputs[0], "n_tokens") else {"img_s": f"{rate:.1f}"}))
            if log is not None:
                log.append(round(value.item(), 4))
            if evaluate is not None and (step % args.eval_every == 0 or info["stop"]):
                tqdm.write(f"{name} step {step}  {(time.perf_counter() - start) / 60:.1f} min  "
                           f"loss {value.item():.3f}  {evaluate(step)}", file=sys.stderr)
    bar.close()
    return step


def train(group, work: str, args) -> dict | None:
    """Both stages on this rank; rank 0 evaluates and returns what it wrote."""
    from transformers import AutoTokenizer

    mx.random.seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(work)
    config = model_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, args.width)
    processor = ImageProcessorConfig.for_model(config)
    model = Model(config)
    weights = {k: mx.array(v) for k, v in random_weights(config, seed=args.seed).items()}
    model.load_weights(list(sanitize(weights).items()), strict=True)
    heads = LabelHeads(config.mm_hidden_size)
    trainee = Trainee(model, heads)
    mx.eval(trainee.parameters())
    lead = group.rank == 0
    if lead:
        n_params = sum(v.size for _, v in nn.utils.tree_flatten(model.parameters()))
        print(f"model: {n_params / 1e6:.2f}M parameters, vocab {config.vocab_size}; {group.size} process(es)",
              file=sys.stderr)
    start = time.perf_counter()
    budget = args.minutes * 60

    # stage 1: the vision tower on patch labels
    vb = args.vision_batch_size
    val_px, val_labels, val_scene = vision_batch(config, processor, 10**7, 128, args.seed)  # far past the training stream

    class Vision(nn.Module):  # the tower and the heads: what stage 1 trains
        def __init__(self):
            super().__init__()
            self.tower, self.heads = model.vision_tower, heads

    def vision_eval(step):
        f = model.vision_tower(val_px)
        obj = val_labels[:, 1] > 0
        acc = {k: ((mx.argmax(getattr(heads, k)(f), -1) == val_labels[:, i]) & obj).sum().item() / obj.sum().item()
               for i, k in ((0, "colour"), (1, "shape"), (3, "across"), (4, "down"))}
        n, pooled = 1 + len(KINDS), f.mean(axis=1)
        counts = mx.argmax(heads.count(pooled).reshape(f.shape[0], n, -1), -1) == val_scene[:, :n]
        sides = mx.argmax(heads.sides(pooled).reshape(f.shape[0], 2 * len(KINDS), -1), -1) == val_scene[:, n:]
        return ("object patches: " + "  ".join(f"{k} {v:.1%}" for k, v in acc.items())
                + f"; images: count {counts[:, 0].mean().item():.1%}  all counts {counts.all(1).mean().item():.1%}"
                + f"  all sides {sides.all(1).mean().item():.1%}")

    stage1 = Vision()
    vision_losses = []
    t_vision = time.perf_counter()
    steps1 = run_stage(
        group, "vision", stage1,
        lambda s, px, lab, scene: s.heads.loss(s.tower(px), lab, scene),
        lambda step, g: vision_batch(config, processor, step * vb + g.shard(range(vb)).start,
                                     len(g.shard(range(vb))), args.seed),
        args, args.vision_minutes * 60, args.vision_steps, args.vision_learning_rate, 30,
        evaluate=vision_eval, log=vision_losses)
    t_vision = time.perf_counter() - t_vision

    # stage 2: everything on question answering (+ the patch labels)
    bs = args.batch_size
    val = qa_batch(tokenizer, config, processor, "valid", 0, args.val_size, args.seed, 1)[0]
    history, losses = [], []

    def qa_eval(step):
        accuracy = answer_rows_right(model, val).mean()
        history.append((step, round(time.perf_counter() - start), float(accuracy)))
        return f"validation accuracy {accuracy:.1%}"

    steps2 = run_stage(
        group, "qa", trainee,
        lambda t, batch, lab, scene, bind: full_loss(t, batch, lab, scene, bind, args.aux_weight,
                                                     args.bind_weight),
        lambda step, g: qa_batch(tokenizer, config, processor, "train", step * bs + g.shard(range(bs)).start,
                                 len(g.shard(range(bs))), args.seed, args.questions_per_image),
        args, max(budget - (time.perf_counter() - start), 60.0), args.steps, args.learning_rate, args.warmup,
        evaluate=qa_eval, log=losses)
    if not lead:
        return None
    accuracy = history[-1][2]  # run_stage evaluates after its last step
    elapsed = time.perf_counter() - start
    print(f"trained {steps1} vision + {steps2} QA steps in {elapsed / 60:.1f} min; "
          f"validation accuracy {accuracy:.1%}", file=sys.stderr)
    tensors = {k: np.array(v.astype(mx.float32)) for k, v in nn.utils.tree_flatten(model.parameters())}
    c = tensors["vision_tower.embeddings.patch_embedding.weight"]
    tensors["vision_tower.embeddings.patch_embedding.weight"] = c.transpose(0, 3, 1, 2)  # MLX -> torch layout
    out = Path(args.out)
    save_checkpoint(out, config, tensors, dtype="float16", tokenizer_dir=Path(work))
    (out / "training.json").write_text(json.dumps({
        "vision_steps": steps1, "vision_minutes": round(t_vision / 60, 1), "qa_steps": steps2,
        "minutes": round(elapsed / 60, 1), "workers": group.size, "batch_size": bs,
        "vision_batch_size": vb, "learning_rate": args.learning_rate, "bind_weight": args.bind_weight,
        "seed": args.seed,
        "validation_accuracy": accuracy, "history": history, "losses": losses,
        "vision_losses": vision_losses}, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return {"validation_accuracy": accuracy}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output pmod checkpoint directory (must not exist)")
    p.add_argument("--minutes", type=float, default=42.0, help="training time budget, both stages")
    p.add_argument("--vision-minutes", type=float, default=8.0, help="of which vision pretraining")
    p.add_argument("--steps", type=int, default=None, help="QA steps (default: until the budget)")
    p.add_argument("--vision-steps", type=int, default=None, help="vision steps (default: until its budget)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--vision-batch-size", type=int, default=32)
    p.add_argument("--questions-per-image", type=int, default=6)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--vision-learning-rate", type=float, default=2e-3)
    p.add_argument("--aux-weight", type=float, default=0.3, help="weight of the label losses in stage 2")
    p.add_argument("--bind-weight", type=float, default=0.3,
                   help="weight of the loss that steers one head to the object a question names (stage 2)")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=200, help="steps between validation checks")
    p.add_argument("--val-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=128, help="decoder width (the vision tower is 3/4 of it)")
    p.add_argument("--workers", type=int, default=2, help="data-parallel processes (one per core)")
    args = p.parse_args(argv)
    if Path(args.out).exists():
        print(f"train_default_model: error: {args.out} already exists; choose a new --out", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="pmod-train-"))
    train_tokenizer(work, args.seed)
    try:
        launch(args.workers, train, str(work), args)
    except PmodError as e:
        print(f"train_default_model: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
