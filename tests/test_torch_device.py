"""The torch backend's ``device`` (CPU here, CUDA where present) and the transformers comparison.

The device path is the same code on the CPU and on a GPU (weights and every layer's KV
buffers on ``device``), so the CPU run through ``device="cpu"`` tests it here; the CUDA tests
run where a GPU is, and skip with the reason elsewhere.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from builders import hf_llama, random_tensors, tiny_config, vision_inputs, write_checkpoint  # noqa: E402
from reference import Reference  # noqa: E402

import pmod  # noqa: E402
from pmod.app.cli import main  # noqa: E402
from pmod.errors import PmodError  # noqa: E402

CUDA = torch.cuda.is_available()
NO_CUDA = "no CUDA GPU here (torch.cuda.is_available() is False): the CUDA path runs on a machine with one"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    config = tiny_config()
    tensors = random_tensors(config, seed=7)
    path = write_checkpoint(tmp_path_factory.mktemp("dev"), config, tensors)
    vm = np.zeros(30, dtype=bool)
    vm[5:25] = True
    ids = np.random.default_rng(8).integers(3, config.vocab_size, 30)
    return config, tensors, path, vision_inputs(tensors, ids, vm, seed=8), vm


def _run(engine, emb, vm, steps=6):
    logits = [engine.prefill(inputs_embeds=emb, vision_mask=vm)]
    for _ in range(steps):
        logits.append(engine.decode(int(np.argmax(logits[-1]))))
    return np.array(logits)


@pytest.mark.parametrize("mlp_rows", [None, 7])
def test_cpu_device_matches_the_reference(model, mlp_rows, monkeypatch):
    """Also with the eager MLP taking the 30-token prefill in blocks of 7 rows (``MLP_ROWS``)."""
    from pmod_export import decoder

    if mlp_rows:
        monkeypatch.setattr(decoder, "MLP_ROWS", mlp_rows)
    config, tensors, path, emb, vm = model
    engine = pmod.open_engine(path, backend="torch", dtype="float32", device="cpu")
    assert engine.runtime_info()["device"] == "cpu" and engine.cache.keys[0].device.type == "cpu"
    assert engine.device_memory() is None  # no accelerator allocator to report
    got = _run(engine, emb, vm)
    ref = Reference(config.to_dict(), tensors)
    want = [ref.prefill(embeds=emb, vision_mask=vm)[-1]]
    for s in got[:-1]:
        want.append(np.reshape(ref.decode(int(np.argmax(s))), (-1, config.vocab_size))[-1])
    assert engine.kv_lengths() == ref.kv_lengths()
    assert np.abs(got - np.array(want)).max() <= 2e-5 * max(1.0, np.abs(want).max())


@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
@pytest.mark.parametrize("dtype, tol", [("float32", 1e-4), ("float16", 3e-2), ("bfloat16", 1.5e-1)])
def test_cuda_matches_the_cpu(model, dtype, tol):
    _, _, path, emb, vm = model
    cpu = _run(pmod.open_engine(path, backend="torch", dtype="float32"), emb, vm)
    engine = pmod.open_engine(path, backend="torch", dtype=dtype, device="cuda")
    assert engine.runtime_info()["device"].startswith("cuda") and engine.cache.keys[0].is_cuda
    engine.device_memory(reset=True)
    gpu = _run(engine, emb, vm)
    assert engine.device_memory() >= sum(p.numel() * p.element_size() for p in engine.model.parameters())
    assert np.abs(gpu - cpu).max() <= tol * max(1.0, np.abs(cpu).max())
    top2 = np.sort(cpu, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 4 * tol * max(1.0, np.abs(cpu).max())
    assert (np.argmax(gpu, -1) == np.argmax(cpu, -1))[clear].all()


def test_device_errors_are_one_line(model, monkeypatch, capsys):
    _, _, path, _, _ = model
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(PmodError, match="device 'cuda' is not available .*use --device cpu"):
        pmod.open_engine(path, backend="torch", device="cuda")
    with pytest.raises(PmodError, match="unknown device 'gpu0'|device 'gpu0' is not supported"):
        pmod.open_engine(path, backend="torch", device="gpu0")
    with pytest.raises(PmodError, match="the mlx backend takes no device"):
        pmod.open_engine(path, backend="mlx", device="cpu")
    assert main(["generate", "--backend", "torch", "--device", "cuda", "--prompt", "hi"]) == 2  # the embedded model
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "device 'cuda' is not available" in err[0]


def test_transformers_peer_is_transformers(model):
    """The peer the comparison times is transformers' own LLaMA on the checkpoint's weights."""
    from pmod_export.peer import TransformersPeer

    config, tensors, path, emb, _ = model
    peer = TransformersPeer(path)
    first, second = peer.prefill(emb), peer.decode(11)
    ref = hf_llama(config, tensors)
    with torch.no_grad():
        x = torch.from_numpy(emb)[None]
        want1 = ref(inputs_embeds=x).logits[0, -1].numpy()
        x2 = torch.cat([x, ref.model.embed_tokens.weight[[11]][None]], dim=1)
        want2 = ref(inputs_embeds=x2).logits[0, -1].numpy()
    assert np.abs(first - want1).max() <= 1e-5 and np.abs(second - want2).max() <= 1e-5
    assert peer.position == len(emb) + 1


def test_comparison_script_runs(model, tmp_path, capsys):
    import json

    from pmod.app.bench.peers import main as compare_main

    _, _, path, _, _ = model
    out = tmp_path / "rows.json"
    assert compare_main(["--model", str(path), "--vision-tokens", "0,24", "--text-tokens", "8",
                         "--decode-tokens", "2", "--repeat", "1", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    for run in ("transformers", "pmod dense", "pmod p-MoD"):
        assert f"| 24 | {run} |" in table
    rows = json.loads(out.read_text())["rows"]
    assert {(r["vision_tokens"], r["run"]) for r in rows} == {(n, r) for n in (0, 24)
                                                             for r in ("transformers", "pmod dense", "pmod p-MoD")}
    assert all(r["prefill_s"] > 0 and r["decode_tok_s"] > 0 for r in rows)
    assert compare_main(["--model", str(path), "--repeat", "0"]) == 2
    assert compare_main(["--model", str(path), "--vision-tokens", "24", "--text-tokens", "8", "--decode-tokens", "1",
                         "--repeat", "1", "--profile"]) == 0
    out = capsys.readouterr().out
    for run in ("transformers", "pmod dense", "pmod p-MoD"):  # one op table per run, then the table
        assert f"### {run}, 24 vision tokens" in out
    assert "aten::" in out.split("### pmod dense")[1] and out.rstrip().endswith("x |")


def test_greedy_decode_picks_the_token_on_the_device(model, monkeypatch):
    """``decode_greedy`` equals the argmax of ``decode``, and its logits never reach the host."""
    _, _, path, emb, vm = model
    a, b = (pmod.open_engine(path, backend="torch", dtype="float32") for _ in range(2))
    token = int(np.argmax(a.prefill(inputs_embeds=emb, vision_mask=vm)))
    b.prefill(inputs_embeds=emb, vision_mask=vm)
    monkeypatch.setattr(a, "_host", lambda logits: pytest.fail("greedy decoding copied logits out"))
    for _ in range(5):
        want = int(np.argmax(b.decode(token)))
        got = a.decode_greedy(token)
        assert got == want
        token = got
    assert a.kv_lengths() == b.kv_lengths() and a.position == b.position


def test_stopwatch_times_on_the_engine_device(model):
    from pmod.engine import Stopwatch

    _, _, path, emb, vm = model
    engine = pmod.open_engine(path, backend="torch", dtype="float32")
    with engine.stopwatch() as t:
        engine.prefill(inputs_embeds=emb, vision_mask=vm)
    assert type(t) is Stopwatch and t.seconds > 0  # the CPU: the wall clock


@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
def test_cuda_stopwatch_uses_events(model):
    from pmod_export.torch_engine import CudaStopwatch

    _, _, path, emb, vm = model
    engine = pmod.open_engine(path, backend="torch", dtype="float16", device="cuda")
    with engine.stopwatch() as t:
        engine.prefill(inputs_embeds=emb, vision_mask=vm)
    assert isinstance(t, CudaStopwatch) and t.seconds > 0


def test_seeded_weights_are_one_model_on_every_device_and_dtype(model, tmp_path):
    """A config-only directory opened with ``seeded_weights``: the same seed gives the same
    weights (float32 exactly, bfloat16 their rounding); another seed, others; mlx refuses."""
    from pmod.format import write_config

    config = model[0]
    write_config(tmp_path, config, "float32")
    a = pmod.open_engine(tmp_path, backend="torch", seeded_weights=3)
    b = pmod.open_engine(tmp_path, backend="torch", seeded_weights=3, device="cpu")
    c = pmod.open_engine(tmp_path, backend="torch", dtype="bfloat16", seeded_weights=3)
    d = pmod.open_engine(tmp_path, backend="torch", seeded_weights=4)
    sa, sb, sc, sd = (e.model.state_dict() for e in (a, b, c, d))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(torch.equal(sa[k].to(torch.bfloat16), sc[k]) for k in sa)
    w = "language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(sa[w], sd[w])
    routers = [k for k in sa if k.endswith("router.weight")]
    assert routers and all(sa[k].std() > 0 for k in routers)  # spread: a real top-k, not ties
    std = float(sa[w].std())
    assert abs(std - config.hidden_size ** -0.5) < 0.2 * config.hidden_size ** -0.5  # pmod.init's scale
    with pytest.raises(PmodError, match="the mlx backend takes no seeded_weights"):
        pmod.open_engine(tmp_path, backend="mlx", seeded_weights=3)
    with pytest.raises(PmodError, match="holds no model.safetensors"):
        pmod.open_engine(tmp_path, backend="torch")  # without the seed it needs the weights
