"""Analytic FLOPs / KV cache (pmod.flops): checked against independent arithmetic and the paper."""

from __future__ import annotations

import json

import numpy as np
import pytest

from builders import tiny_config
from reference import reference_kept_count, reference_ratios
from pmod.app.cli import main
from pmod.config import PmodConfig
from pmod.errors import PmodError
from pmod.flops import (PRESETS, decode_flops, kv_bytes, kv_entries, prefill_flops,
                        preset_config, report)


# ---------------------------------------------------------------- independent arithmetic
class MatmulCounter:
    """Counts FLOPs of matrix products from the shapes of real arrays: (m,k)@(k,n) = 2mkn."""

    def __init__(self):
        self.flops = 0

    def matmul(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        assert a.shape[-1] == b.shape[0]
        self.flops += 2 * int(np.prod(a.shape[:-1])) * a.shape[-1] * b.shape[1]
        return np.zeros(a.shape[:-1] + b.shape[1:], dtype=np.float32)


def literal_layer_flops(cfg: PmodConfig, t: int) -> dict:
    """One decoder layer on ``t`` tokens, by building the arrays of every product.

    The attention core is counted per query head as the masked products that the causal
    mask lets through: ``head_dim`` multiply-adds for Q.K and for P.V per allowed pair."""
    H, I = cfg.hidden_size, cfg.intermediate_size
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    x = np.zeros((t, H), dtype=np.float32)
    proj = MatmulCounter()
    q = proj.matmul(x, np.zeros((H, nh * hd), np.float32))
    proj.matmul(x, np.zeros((H, nkv * hd), np.float32))
    proj.matmul(x, np.zeros((H, nkv * hd), np.float32))
    proj.matmul(q, np.zeros((nh * hd, H), np.float32))
    allowed = int(np.tril(np.ones((t, t), dtype=bool)).sum())  # causal (query, key) pairs
    core = nh * (2 * hd * allowed + 2 * hd * allowed)
    mlp = MatmulCounter()
    g = mlp.matmul(x, np.zeros((H, I), np.float32))
    mlp.matmul(x, np.zeros((H, I), np.float32))
    mlp.matmul(g, np.zeros((I, H), np.float32))
    return dict(attn_proj=proj.flops, attn_core=core, mlp=mlp.flops)


def gqa_config(**kw) -> PmodConfig:
    base = dict(vocab_size=50, hidden_size=24, intermediate_size=40, num_hidden_layers=6,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                mod_target_layers="shiftedcos_decay_0.85_0.15")
    return PmodConfig(**{**base, **kw})


# ---------------------------------------------------------------- the paper's KV figure
def test_kv_ratio_llava_next_7b_matches_paper():
    cfg = preset_config("llava-next-7b")
    dense = sum(kv_entries(cfg, 2880, 0, dense=True))
    pmod = sum(kv_entries(cfg, 2880, 0))
    assert dense == 32 * 2880
    assert abs(100 * pmod / dense - 53.7) < 0.1
    # Untruncated ratios (dense layer = 1): exactly 0.5375, the paper's 53.8% (v1) / 53.7% (v2).
    ratios = reference_ratios(PRESETS["llava-next-7b"])
    assert sum(1.0 if r is None else r for r in ratios) / 32 == pytest.approx(0.5375, abs=1e-12)
    assert report(cfg, 2880, 0).kv_ratio == pytest.approx(pmod / dense)


def test_kv_entries_equal_text_plus_rederived_capacities():
    for name in PRESETS:
        spec = PRESETS[name]
        cfg = preset_config(name)
        for n_vision, n_text in [(2880, 0), (2365, 17), (576, 40), (1, 3), (0, 5)]:
            want = [n_text + reference_kept_count(n_vision, r) for r in reference_ratios(spec)]
            assert kv_entries(cfg, n_vision, n_text) == want
            assert kv_entries(cfg, n_vision, n_text, dense=True) == [n_vision + n_text] * 32
    # kv_bytes: K and V, every KV head, bytes per element, summed over layers
    cfg = gqa_config()
    n = sum(kv_entries(cfg, 100, 7))
    assert kv_bytes(cfg, 100, 7) == n * 2 * 2 * 8 * 2
    assert kv_bytes(cfg, 100, 7, kv_dtype="float32") == n * 2 * 2 * 8 * 4


def test_dense_model_ratio_is_exactly_one():
    cfg = PmodConfig(**{**PRESETS["llava-next-7b"], "mod_target_layers": None})
    rep = report(cfg, 2880, 50)
    assert rep.flops_ratio == 1.0 and rep.kv_ratio == 1.0
    assert rep.pmod["total"] == rep.dense["total"]
    assert all(l["router"] == 0 for l in rep.pmod["layers"])


# ---------------------------------------------------------------- FLOPs vs hand count
@pytest.mark.parametrize("t", [1, 2, 7, 33])
def test_dense_layer_flops_match_literal_count(t):
    cfg = gqa_config()
    got = prefill_flops(cfg, t - 1, 1, dense=True)
    want = literal_layer_flops(cfg, t)
    for row in got["layers"]:
        assert row["tokens"] == t and row["router"] == 0
        for key, v in want.items():
            assert row[key] == v, key
        assert row["total"] == sum(want.values())
    assert got["lm_head"] == 2 * 24 * 50          # last position only
    assert got["total"] == 6 * sum(want.values()) + 2 * 24 * 50


def test_mod_layer_flops_use_kept_tokens_and_add_router():
    cfg = gqa_config()
    n_vision, n_text = 40, 5
    got = prefill_flops(cfg, n_vision, n_text)
    ratios = reference_ratios(dict(num_hidden_layers=6, mod_target_layers=cfg.mod_target_layers,
                                   mod_router_factor=0.5))
    assert any(r is not None for r in ratios) and any(r is None for r in ratios)
    for row, r in zip(got["layers"], ratios):
        t = n_text + reference_kept_count(n_vision, r)
        want = literal_layer_flops(cfg, t)
        assert row["tokens"] == t
        assert row["attn_core"] == want["attn_core"]
        assert row["attn_proj"] + row["mlp"] == want["attn_proj"] + want["mlp"]
        assert row["router"] == (0 if r is None else 2 * 24 * n_vision)


def test_decode_flops_by_hand():
    cfg = gqa_config()
    ctx = [10, 11, 12, 13, 14, 15]
    got = decode_flops(cfg, ctx)
    for row, c in zip(got["layers"], ctx):
        one = literal_layer_flops(cfg, 1)
        assert row["attn_proj"] == one["attn_proj"] and row["mlp"] == one["mlp"]
        assert row["attn_core"] == 4 * 4 * 8 * (c + 1)   # the new query sees the cache and itself
    assert got["lm_head"] == 2 * 24 * 50
    with pytest.raises(PmodError, match="6 layers"):
        decode_flops(cfg, [1, 2])


# ---------------------------------------------------------------- monotonicity
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_pmod_cheaper_with_vision_equal_without(name):
    cfg = preset_config(name)
    for n_vision in (1, 10, 576, 2880):
        for n_text in (0, 64):
            rep = report(cfg, n_vision, n_text)
            assert rep.pmod["total"] < rep.dense["total"]
            assert sum(rep.pmod_kv_entries) <= sum(rep.dense_kv_entries)
    rep = report(cfg, 0, 100)
    assert rep.pmod["total"] == rep.dense["total"] and rep.flops_ratio == 1.0
    assert rep.kv_ratio == 1.0
    # more vision tokens never cost less
    totals = [prefill_flops(cfg, n, 10)["total"] for n in range(0, 3000, 97)]
    assert totals == sorted(totals)


def test_paper_figures_reproduced_where_documented():
    """Numbers quoted in docs/FLOPS.md (not tuned: the counting rule is fixed)."""
    cfg = preset_config("llava-next-7b")
    assert round(100 * report(cfg, 2880, 0).flops_ratio, 1) == 53.0
    assert round(100 * report(cfg, 2880, 178).flops_ratio, 1) == 55.6
    r = report(cfg, 2714, 165)
    assert (round(r.dense["total"] / 1e12, 2), round(r.pmod["total"] / 1e12, 2)) == (39.46, 21.94)
    cfg15 = preset_config("llava-1.5-7b")
    assert round(100 * report(cfg15, 576, 73).flops_ratio, 1) == 58.7


def test_bad_counts_raise():
    cfg = gqa_config()
    with pytest.raises(PmodError, match="n_vision"):
        kv_entries(cfg, -1, 0)
    with pytest.raises(PmodError, match="n_text"):
        prefill_flops(cfg, 3, -2)
    with pytest.raises(PmodError, match="KV dtype"):
        kv_bytes(cfg, 3, 0, kv_dtype="int3")
    with pytest.raises(PmodError, match="unknown preset"):
        preset_config("nope")


# ---------------------------------------------------------------- CLI
def test_cli_preset_prints_table_and_summary(capsys):
    assert main(["flops", "--preset", "llava-next-7b"]) == 0
    out = capsys.readouterr().out
    assert "TFLOPs      dense 39.477   p-MoD 20.927   ratio 53.0%" in out
    assert "KV entries  dense 92160   p-MoD 49528   ratio 53.7%" in out
    assert "KV bytes" in out and "1,440.0 MiB" in out
    rows = [l.split() for l in out.splitlines() if l.split() and l.split()[0].isdigit()]
    assert len(rows) == 32
    assert rows[0][1] == "dense" and rows[8][1] == "0.8445" and rows[31][2] == "432"


def test_cli_model_dir(tmp_path, capsys):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(tiny_config().to_dict()))
    assert main(["flops", str(d), "--vision-tokens", "64", "--text-tokens", "8",
                 "--kv-dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "64 routed vision + 8 text tokens" in out and "float32" in out


@pytest.mark.parametrize("argv,needle", [
    (["flops"], "--preset"),
    (["flops", "somewhere", "--preset", "llava-next-7b"], "not both"),
    (["flops", "--preset", "gpt-5"], "llava-1.5-7b, llava-next-7b"),
    (["flops", "--preset", "llava-next-7b", "--vision-tokens", "-1"], "--vision-tokens"),
    (["flops", "--preset", "llava-next-7b", "--text-tokens", "-5"], "--text-tokens"),
])
def test_cli_bad_args(argv, needle, capsys):
    assert main(argv) == 2
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pmod: error: ") and needle in lines[0]
    assert cap.out == ""
