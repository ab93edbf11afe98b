"""LoRA finetuning of p-MoD models in MLX, routers included.

The decoder's linear layers named by ``target_modules`` (in the last ``num_layers``
layers) become ``mlx_lm.tuner.lora.LoRALinear`` (mlx-lm's layer, reused as is: the base
linear frozen, ``y = x W^T + scale * (x A) B``, ``B`` zero at the start so the model
starts equal to the base). With ``train_routers`` the MoD routers of those layers are
trained in full, as in the paper: a router has one output, and its gradient flows through
the TanhNorm weight ``w`` that scales kept and skipped vision tokens (the top-k selection
itself passes none). ``train_projector`` trains the multimodal projector in full too.
Everything else is frozen: it is not a trainable parameter at all. On a quantized
checkpoint (QLoRA) the adapted base linears are ``nn.QuantizedLinear`` and stay as they
are; ``pmod fuse`` merges into the dequantized weights and quantizes them again.

A run writes its adapter directory (see ``pmod.fuse``): ``adapters.safetensors`` and
``adapter_config.json``, plus ``training_state.safetensors`` (the trainable weights and
the optimizer state at that step), each file replaced atomically at every save. The
batches of step ``i`` and the dropout noise of step ``i`` depend on ``(seed, i)`` only, so
``resume`` continues from the last save exactly where an uninterrupted run would be.

- ``layers``: which modules get LoRA layers or train in full, and the merge back;
- ``adapter``: the adapter directory a run writes;
- ``trainer``: one run (the loop, validation, saves, resume);
- ``command``: ``pmod lora``.

The data, the batching and the run's settings are ``pmod.lora_data`` (numpy only); the
batch layout and the answer loss, shared with from-scratch training, ``pmod_mlx.train``.
"""
