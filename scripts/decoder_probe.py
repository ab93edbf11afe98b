"""How fast does a fresh decoder learn the shapes task? A diagnostic for the embedded model.

Trains a fresh decoder and projector (seeded random weights, the shipped model's shape)
on the shapes questions, on top of the embedded model's vision tower, frozen, and prints
held-out accuracy per question type as it goes. With ``--text-scene`` the image is
replaced by the scene written out in words, object by object, with the side of the image
it is on as the position questions judge it ("orange triangle left top, purple diamond
right middle. is there a star?"): the decoder's own learning speed, with no vision in
the way. The training loop, batches and binding loss are the embedded model's
(``pmod.tasks.shapes.train``, ``.batches``, ``.losses``).

    python scripts/decoder_probe.py --types existence --steps 200 --eval-every 25
    python scripts/decoder_probe.py --text-scene --steps 3000 --eval-every 300
"""

from __future__ import annotations

import argparse
import itertools
import sys

import numpy as np

import pmod_mlx  # noqa: F401  (fast BLAS before mlx)
import mlx.core as mx

from pmod.tasks import shapes
from pmod.errors import PmodError
from pmod.format import expected_tensors, load_numpy
from pmod.image import ImageProcessorConfig
from pmod.init import random_weights
from pmod.app.models import resolve_model
from pmod.tasks.shapes.batches import binding, qa_messages
from pmod.tasks.shapes.labels import side
from pmod.tasks.shapes.losses import LayerInput, bind_layer, binding_loss, language_logits
from pmod.tasks.shapes.train import model_config, run_stage
from pmod_mlx.model import Model
from pmod_mlx.parallel import launch
from pmod_mlx.train import answer_loss, answer_rows_right, collate, make_example
from pmod_mlx.vision import sanitize


def scene_text(scene: shapes.Scene) -> str:
    across = ("left", "right", "middle")
    down = ("top", "bottom", "middle")
    return ", ".join(f"{o.colour} {o.shape} {across[side(scene, o.cx) - 1]} {down[side(scene, o.cy) - 1]}"
                     for o in scene.objects) + ". "


def batch(tokenizer, config, processor, split: str, start: int, n: int, args, qpi: int):
    """A collated batch, its ``Binding`` (None for ``--text-scene``) and each row's question types."""
    stream = shapes.iter_samples(split, seed=args.seed, start=start, questions_per_image=qpi, types=args.types)
    samples = list(itertools.islice(stream, n))
    if args.text_scene:
        examples = [make_example(tokenizer, qa_messages(s, scene_text(s.scene), image=False), [], config,
                                 processor) for s in samples]
    else:
        examples = [make_example(tokenizer, qa_messages(s), [s.image], config, processor) for s in samples]
    collated = collate(examples, config.mod_target_token_type)
    return collated, None if args.text_scene else binding(samples, collated), [s.qa[0][0] for s in samples]


def probe(group, model_dir: str, args) -> None:
    """Seeded fresh decoder and projector (``pmod.init``, or every matrix at ``--std``) on the
    given checkpoint's vision tower, frozen."""
    from transformers import AutoTokenizer

    mx.random.seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = model_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    config.num_hidden_layers = args.layers
    processor = ImageProcessorConfig.for_model(config)
    model = Model(config)
    weights = random_weights(config, seed=args.seed, std=args.std or None)
    _, shipped = load_numpy(model_dir)
    for k in weights:
        if k.startswith("vision_tower"):
            weights[k] = shipped[k].astype(np.float32)
    model.load_weights(list(sanitize({k: mx.array(v) for k, v in weights.items()}).items()), strict=True)
    model.vision_tower.freeze()
    mx.eval(model.parameters())
    if group.rank == 0:
        val, _, val_kinds = batch(tokenizer, config, processor, "valid", 0, args.val_size, args, 1)
        val_kinds = np.array(val_kinds)

    def loss(m, b, bind):
        if not args.bind_weight:
            return answer_loss(language_logits(m, b), b)
        caught = LayerInput(bind_layer(config))
        value = answer_loss(language_logits(m, b, layer_input=caught), b)
        return value + args.bind_weight * binding_loss(m, caught.h, b, bind)

    def evaluate(step):
        ok = answer_rows_right(model, val)
        return f"accuracy {ok.mean():.1%}: " + "  ".join(
            f"{k} {ok[val_kinds == k].mean():.0%}" for k in sorted(set(val_kinds)))

    bs = args.batch_size
    run_stage(group, "probe", model, loss,
                  lambda step, g: batch(tokenizer, config, processor, "train", step * bs + g.shard(range(bs)).start,
                                        len(g.shard(range(bs))), args, args.questions_per_image)[:2],
                  args, 0.0, args.steps, args.learning_rate, args.warmup, evaluate=evaluate)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a checkpoint shaped like the embedded model, whose vision tower and tokenizer "
                                   "are used (default: the embedded model)")
    p.add_argument("--types", default=",".join(shapes.QUESTION_TYPES), help="question types, comma separated")
    p.add_argument("--text-scene", action="store_true", help="the scene in words instead of the image")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--questions-per-image", type=int, default=6)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--bind-weight", type=float, default=0.0,
                   help="weight of the embedded model's binding loss (0: the answers alone)")
    p.add_argument("--layers", type=int, default=12, help="decoder layers")
    p.add_argument("--std", type=float, default=0.0,
                   help="init std of every decoder and projector matrix instead of pmod.init's 1/sqrt(fan_in) "
                        "(0.02: GPT-2's, which the first embedded models started from)")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--val-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    args.types = tuple(t for t in args.types.split(",") if t)
    unknown = set(args.types) - set(shapes.QUESTION_TYPES) - set(shapes.EXTRA_QUESTION_TYPES)
    if args.bind_weight and args.text_scene:
        p.error("--bind-weight steers attention to image patches; --text-scene has none")
    if unknown or args.steps < 1 or args.layers < 1:
        p.error(f"unknown question type(s) {', '.join(sorted(unknown))}" if unknown
                else "--steps and --layers must be at least 1")
    try:
        model_dir = resolve_model(args.model)
        config, tensors = load_numpy(model_dir)
    except PmodError as e:
        p.error(str(e))
    want = expected_tensors(model_config(config.vocab_size, config.bos_token_id, config.eos_token_id))
    bad = [k for k, shape in want.items() if k.startswith("vision_tower") and tensors.get(k, np.empty(0)).shape != shape]
    if bad:
        p.error(f"{model_dir} has not the embedded model's vision tower ({bad[0]}); "
                "give a checkpoint written by scripts/train_default_model.py")
    launch(args.workers, probe, str(model_dir), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
