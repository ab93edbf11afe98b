"""One LoRA run: the model with its LoRA layers, the data, Adam, the loop, validation, saves and resume.

Step ``i`` draws its batch and its dropout noise from ``(seed, i)`` alone, and a save holds
the optimizer state with the weights, so a resumed run is the uninterrupted one bit for bit.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map_with_path
from tqdm import tqdm

from pmod.errors import PmodError
from pmod.fuse import ADAPTER_FILE
from pmod.image import ImageProcessorConfig
from pmod.lora_data import TrainArgs, eval_batches, iterate_batches, learning_rate, load_data, row_images
from pmod.tokenizer import load_tokenizer

from ..loader import load
from ..train import Example, collate, input_embeddings, loss_fn
from .adapter import STATE_FILE, save_adapter
from .layers import adapter_weights, apply_lora


# ============================================================================ gradient checkpointing
_CHECKPOINTED: dict = {}


def _checkpointed_call(self, x, rope, cache, routing, probe=None):
    base_call = super(type(self), self).__call__

    def inner(params, x):
        self.update(params)
        return base_call(x, rope, cache, routing, probe)

    return mx.checkpoint(inner)(self.trainable_parameters(), x)


def grad_checkpoint(model) -> None:
    """Recompute each decoder layer's activations in the backward pass (less memory, ~30% slower).

    Per instance (the layer's class is swapped for a subclass), so other models are untouched."""
    for layer in model.language_model.layers:
        cls = type(layer)
        if cls in _CHECKPOINTED.values():
            continue
        sub = _CHECKPOINTED.get(cls)
        if sub is None:
            sub = _CHECKPOINTED[cls] = type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": _checkpointed_call})
        layer.__class__ = sub


# ============================================================================ training
def step_seed(seed: int, step: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(step), 0x10AA]).generate_state(1)[0])


def peak_memory_bytes() -> int:
    """MLX's peak allocation where it reports one, else the process's max RSS."""
    try:
        peak = int(mx.get_peak_memory())
    except AttributeError:
        peak = 0
    if peak:
        return peak
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


class Trainer:
    """One LoRA run: model, data, optimizer, the loop, saves and resume."""

    def __init__(self, args: TrainArgs, resume: bool = False, log=None, progress: bool = True):
        self.args, self.resume = args, resume
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.progress = progress
        self.out = Path(args.adapter_path)
        if not resume and (self.out / ADAPTER_FILE).exists():
            raise PmodError(f"{self.out} already holds an adapter: pass --resume to continue it, "
                            "or choose another --adapter-path")
        for flag in ("iters", "batch_size", "steps_per_eval", "save_every", "steps_per_report"):
            if getattr(args, flag) < 1:
                raise PmodError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
        if args.warmup < 0:
            raise PmodError(f"--warmup must be >= 0, got {args.warmup}")
        if args.learning_rate <= 0:
            raise PmodError(f"--learning-rate must be > 0, got {args.learning_rate}")
        settings = args.lora_settings()  # checks the LoRA flags before the model loads
        self.tokenizer = load_tokenizer(args.model)
        self.model = load(args.model, args.dtype)
        self.config = self.model.config
        self.processor = ImageProcessorConfig.for_model(self.config, args.model) \
            if self.config.vision_config is not None else None
        self.data = load_data(args.data, self.tokenizer, self.config, self.processor, on_bad_row=args.on_bad_row,
                              seed=args.seed, need_valid=args.val_batches != 0, report=self.log)
        mx.random.seed(args.seed)
        self.layers = apply_lora(self.model, settings)
        self.settings = settings
        if args.grad_checkpoint:
            grad_checkpoint(self.model)
        self.optimizer = optim.Adam(learning_rate=args.learning_rate)
        self.step = 0
        if resume:
            self._load_state()
            if self.step > args.iters:
                raise PmodError(f"--resume: the saved run is at step {self.step}, past --iters {args.iters}")
        self.loss_and_grad = nn.value_and_grad(self.model, loss_fn)

    # ------------------------------------------------------------------ batches
    def batch(self, rows: list):
        examples = [Example(r.tokens, r.loss_mask, row_images(r, self.config, self.processor)) for r in rows]
        return collate(examples, self.config.mod_target_token_type)

    def evaluate(self, limit: int | None = None) -> tuple[float, float]:
        """(token-weighted loss, share of rows whose every reply is right) over the validation batches."""
        limit = self.args.val_batches if limit is None else limit
        self.model.eval()
        loss_sum, weight, right, rows = 0.0, 0.0, 0, 0
        for idx in eval_batches(self.data.valid, self.args.batch_size, limit):
            b = self.batch([self.data.valid[i] for i in idx])
            ce, w, ok = _eval_batch(self.model, b)
            mx.eval(ce, w, ok)
            loss_sum += ce.item()
            weight += w.item()
            right += int(ok.sum().item())
            rows += ok.shape[0]
        self.model.train()
        return loss_sum / max(weight, 1.0), right / max(rows, 1)

    # ------------------------------------------------------------------ saving
    def save(self, extra: dict | None = None) -> None:
        training = asdict(self.args)
        training["data"] = str(Path(self.args.data).resolve())
        training["model"] = str(Path(self.args.model).resolve())
        state = {f"optimizer.{k}": v for k, v in tree_flatten(self.optimizer.state)}
        save_adapter(self.model, self.settings, self.out, base_model=self.args.model, step=self.step,
                     extra={"training": training, **(extra or {})}, state=state)

    def _load_state(self) -> None:
        f = self.out / STATE_FILE
        if not f.is_file():
            raise PmodError(f"--resume: {f} not found (no save was reached); start without --resume")
        state, meta = mx.load(str(f), return_metadata=True)
        params = {k[len("param."):]: v for k, v in state.items() if k.startswith("param.")}
        expected = adapter_weights(self.model)
        if set(params) != set(expected):
            bad = sorted(set(params) ^ set(expected))[0]
            raise PmodError(f"--resume: {f} does not match this run's LoRA layers ('{bad}')")
        self.model.load_weights(list(params.items()), strict=False)
        opt = {k[len("optimizer."):]: v for k, v in state.items() if k.startswith("optimizer.")}
        self.optimizer.init(self.model.trainable_parameters())

        def restore(path, v):
            if path not in opt:
                raise PmodError(f"--resume: {f} has no optimizer state '{path}'")
            return opt[path]

        self.optimizer.state = tree_map_with_path(restore, self.optimizer.state)
        self.step = int(meta.get("step", 0))
        mx.eval(self.model.parameters(), self.optimizer.state)

    # ------------------------------------------------------------------ the loop
    def train(self, stop_after: int | None = None) -> dict:
        """Train to ``args.iters`` (``stop_after``: leave after that step, as if interrupted)."""
        a = self.args
        n_train = sum(p.size for _, p in tree_flatten(self.model.trainable_parameters()))
        n_total = sum(p.size for _, p in tree_flatten(self.model.parameters()))
        for line in self.data.sources:
            self.log(f"data: {line}")
        self.log(f"trainable: {n_train / 1e3:.1f}K of {n_total / 1e6:.2f}M parameters ({100 * n_train / n_total:.2f}%): "
                 f"LoRA rank {self.settings.rank} on {','.join(self.settings.target_modules)} of layers "
                 f"{self.layers[0]}..{self.layers[-1]}"
                 + (", routers" if self.settings.train_routers else "")
                 + (", projector" if self.settings.train_projector else ""))
        if self.resume:
            self.log(f"resuming {self.out} at step {self.step} of {a.iters}")
        self.model.train()
        val_loss = val_acc = None
        history = []
        if self.data.valid and a.val_batches != 0 and self.step == 0:
            val_loss, val_acc = self.evaluate()
            history.append({"step": 0, "val_loss": val_loss, "val_accuracy": val_acc})
            self.log(f"step 0: validation loss {val_loss:.3f}, rows right {100 * val_acc:.1f}%")
        bar = tqdm(total=a.iters, initial=self.step, unit="it", dynamic_ncols=True, disable=not self.progress,
                   file=sys.stderr)
        t0 = time.perf_counter()
        window_loss, window_w, window_tokens, window_t, window_steps = 0.0, 0.0, 0, t0, 0
        tokens_total, train_loss = 0, None
        post = {"loss": "-", "val": "-" if val_loss is None else f"{val_loss:.3f}"}
        batches = iterate_batches(self.data.train, a.batch_size, a.seed, start=self.step)
        try:
            while self.step < a.iters:
                step, idx = next(batches)
                batch = self.batch([self.data.train[i] for i in idx])
                mx.random.seed(step_seed(a.seed, step))  # dropout noise of this step
                self.optimizer.learning_rate = learning_rate(a, step)
                loss, grads = self.loss_and_grad(self.model, batch)
                if a.max_grad_norm and a.max_grad_norm > 0:
                    grads, _ = optim.clip_grad_norm(grads, a.max_grad_norm)
                self.optimizer.update(self.model, grads)
                mx.eval(self.model.parameters(), self.optimizer.state, loss)
                self.step = step + 1
                w = float(np.asarray(batch.weights).sum())
                window_loss += loss.item() * w
                window_w += w
                window_tokens += batch.n_tokens
                tokens_total += batch.n_tokens
                window_steps += 1
                now = time.perf_counter()
                report = self.step % a.steps_per_report == 0 or self.step == a.iters
                evaluate = self.data.valid and a.val_batches != 0 and (
                    self.step % a.steps_per_eval == 0 or self.step == a.iters)
                if report:
                    train_loss = window_loss / max(window_w, 1.0)
                    dt = max(now - window_t, 1e-9)
                    its, tps = window_steps / dt, window_tokens / dt
                    mem = peak_memory_bytes() / 2**30
                    post.update(loss=f"{train_loss:.3f}", it_s=f"{its:.2f}", tok_s=f"{tps:.0f}", mem=f"{mem:.2f}GB")
                    bar.set_postfix(post, refresh=False)
                    history.append({"step": self.step, "train_loss": train_loss, "it_s": its, "tok_s": tps,
                                    "lr": learning_rate(a, step), "peak_memory_gb": mem})
                    if not self.progress:
                        self.log(f"step {self.step}: train loss {train_loss:.3f}, {its:.2f} it/s, {tps:.0f} tok/s, "
                                 f"peak memory {mem:.2f} GB")
                    window_loss, window_w, window_tokens, window_t, window_steps = 0.0, 0.0, 0, now, 0
                bar.update(1)
                if evaluate:
                    te = time.perf_counter()
                    val_loss, val_acc = self.evaluate()
                    history.append({"step": self.step, "val_loss": val_loss, "val_accuracy": val_acc})
                    msg = (f"step {self.step}: validation loss {val_loss:.3f}, rows right {100 * val_acc:.1f}% "
                           f"({time.perf_counter() - te:.1f} s)")
                    if self.progress:
                        bar.write(msg, file=sys.stderr)
                    else:
                        self.log(msg)
                    post.update(val=f"{val_loss:.3f}", mem=f"{peak_memory_bytes() / 2**30:.2f}GB")
                    bar.set_postfix(post, refresh=True)
                    window_t += time.perf_counter() - te  # evaluation time is not training speed
                if self.step % a.save_every == 0 or self.step == a.iters:
                    self.save()
                if stop_after is not None and self.step >= stop_after:
                    break
        except KeyboardInterrupt:
            bar.close()
            saved = (self.step // a.save_every) * a.save_every
            raise PmodError(f"interrupted at step {self.step}; the last save is step {saved}: continue with "
                            "the same command plus --resume") from None
        bar.close()
        seconds = time.perf_counter() - t0
        result = {"steps": self.step, "seconds": seconds, "train_loss": train_loss, "val_loss": val_loss,
                  "val_accuracy": val_acc, "tokens": tokens_total, "peak_memory_gb": peak_memory_bytes() / 2**30,
                  "history": history}
        if self.step == a.iters:
            self.save({"result": {k: v for k, v in result.items() if k != "history"}})
            self.log(f"trained {self.step} steps in {seconds / 60:.1f} min "
                     f"({tokens_total / max(seconds, 1e-9):.0f} tok/s), peak memory {result['peak_memory_gb']:.2f} GB; "
                     f"wrote {self.out}")
        return result


def _eval_batch(model, batch):
    """One forward for validation: (summed reply cross-entropy, reply tokens, per row: every reply token right)."""
    logits = model.language_model(inputs_embeds=input_embeddings(model, batch), vision_mask=batch.vision_mask)
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), batch.targets, reduction="none")
    right = (mx.argmax(logits, axis=-1) == batch.targets) | (batch.weights == 0)
    return (ce * batch.weights).sum(), batch.weights.sum(), mx.all(right, axis=1)
