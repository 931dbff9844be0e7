"""LLaMA model: causality, attention implementations, forward-mode AD, presets, partitions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from gnopt.errors import GnoptError
from gnopt.model import PRESETS, LLaMA, ModelConfig, build_model, count_parameters

SMALL = ModelConfig(vocab_size=61, d_model=16, n_layers=2, n_heads=2, d_ff=24, seq_len=12)


def _model(dtype: torch.dtype = torch.float32, attn_impl: str = "sdpa", seed: int = 0) -> LLaMA:
    torch.manual_seed(seed)
    return LLaMA(SMALL, attn_impl=attn_impl).to(dtype)  # type: ignore[arg-type]


def _idx(b: int = 3, t: int = SMALL.seq_len, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, SMALL.vocab_size, (b, t), generator=g)


def _closed_form(cfg: ModelConfig) -> int:
    v, d, n, ff = cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.d_ff
    return 2 * v * d + n * (4 * d * d + 3 * d * ff + 2 * d) + d


def test_parameter_names_follow_the_contract() -> None:
    names = [n for n, _ in _model().named_parameters()]
    expected = ["tok_emb.weight"]
    for i in range(SMALL.n_layers):
        expected += [f"blocks.{i}.attn_norm.weight"]
        expected += [f"blocks.{i}.attn.{w}.weight" for w in ("wq", "wk", "wv", "wo")]
        expected += [f"blocks.{i}.mlp_norm.weight"]
        expected += [f"blocks.{i}.mlp.{w}.weight" for w in ("w1", "w2", "w3")]
    expected += ["norm.weight", "lm_head.weight"]
    assert names == expected


def test_rope_tables_are_non_persistent_buffers() -> None:
    model = _model()
    assert {n for n, _ in model.named_buffers()} == {"rope.cos", "rope.sin"}
    assert not any(k.startswith("rope.") for k in model.state_dict())
    assert model.rope.cos.shape == (SMALL.seq_len, SMALL.head_dim)


def test_double_model_gets_exact_float64_rope_tables() -> None:
    model = _model().double()
    assert model.rope.cos.dtype == torch.float64
    pos = torch.arange(SMALL.seq_len, dtype=torch.float64)
    inv = 1.0 / SMALL.rope_theta ** (torch.arange(0, SMALL.head_dim, 2, dtype=torch.float64) / SMALL.head_dim)
    ref = torch.cos(torch.outer(pos, inv))
    torch.testing.assert_close(model.rope.cos[:, : SMALL.head_dim // 2], ref, rtol=0, atol=1e-15)


def test_init_scales() -> None:
    torch.manual_seed(0)
    model = build_model("cpu-small", vocab_size=512)
    assert model.tok_emb.weight.std().item() == pytest.approx(1.0, rel=0.05)
    w1 = model.blocks[0].mlp.w1.weight
    assert w1.std().item() == pytest.approx(1 / math.sqrt(128), rel=0.05)
    w2 = model.blocks[0].mlp.w2.weight
    assert w2.std().item() == pytest.approx(1 / math.sqrt(384), rel=0.05)
    assert torch.equal(model.norm.weight, torch.ones(128))


@pytest.mark.parametrize("attn_impl", ["sdpa", "explicit"])
def test_causal_masking(attn_impl: str) -> None:
    model = _model(attn_impl=attn_impl)
    idx = _idx()
    t = 5
    changed = idx.clone()
    changed[:, t:] = (changed[:, t:] + 7) % SMALL.vocab_size
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
    assert (a[:, t:] - b[:, t:]).abs().max() > 1e-3


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 2e-5), (torch.float64, 1e-12)])
def test_sdpa_and_explicit_attention_agree(dtype: torch.dtype, atol: float) -> None:
    model = _model(dtype)
    idx = _idx()
    with torch.no_grad():
        a = model(idx)
        model.set_attn_impl("explicit")
        b = model(idx)
    torch.testing.assert_close(a, b, rtol=0, atol=atol)


def test_shorter_sequences_and_too_long_input() -> None:
    model = _model()
    assert model(_idx(t=4)).shape == (3, 4, SMALL.vocab_size)
    with pytest.raises(GnoptError, match="seq_len"):
        model(torch.zeros(1, SMALL.seq_len + 1, dtype=torch.long))
    with pytest.raises(GnoptError, match="shape"):
        model(torch.zeros(SMALL.seq_len, dtype=torch.long))


def test_functional_call_matches_module() -> None:
    model = _model()
    idx = _idx()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        torch.testing.assert_close(functional_call(model, params, (idx,)), model(idx), rtol=0, atol=0)
        params["lm_head.weight"] = params["lm_head.weight"] * 2
        out = functional_call(model, params, (idx,))
        torch.testing.assert_close(out, 2 * model(idx), rtol=1e-6, atol=1e-6)


def _jvp_dual(model: LLaMA, params: dict, tangents: dict, idx: torch.Tensor) -> torch.Tensor:
    with sdpa_kernel([SDPBackend.MATH]), fwAD.dual_level():
        duals = {n: fwAD.make_dual(params[n], tangents[n]) for n in params}
        out = functional_call(model, duals, (idx,))
        return fwAD.unpack_dual(out).tangent


@pytest.mark.parametrize("attn_impl", ["sdpa", "explicit"])
def test_forward_ad_jvp_matches_finite_differences_and_func_jvp(attn_impl: str) -> None:
    model = _model(torch.float64, attn_impl=attn_impl)
    idx = _idx(b=2)
    params = {n: p.detach() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(3)
    tangents = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in params.items()}

    dual = _jvp_dual(model, params, tangents, idx)

    eps = 1e-6
    with torch.no_grad():
        plus = functional_call(model, {n: params[n] + eps * tangents[n] for n in params}, (idx,))
        minus = functional_call(model, {n: params[n] - eps * tangents[n] for n in params}, (idx,))
    fd = (plus - minus) / (2 * eps)
    assert ((dual - fd).norm() / fd.norm()).item() < 1e-7

    with sdpa_kernel([SDPBackend.MATH]):
        _, func_jvp = jvp(lambda p: functional_call(model, p, (idx,)), (params,), (tangents,))
    torch.testing.assert_close(func_jvp, dual, rtol=1e-12, atol=1e-12)


def test_backward_reaches_every_parameter() -> None:
    model = _model()
    idx = _idx()
    logits = model(idx)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_parameter_counts_match_closed_form(preset: str) -> None:
    model = build_model(preset, device="meta")
    cfg = PRESETS[preset]
    counts = count_parameters(model)
    assert counts["total"] == _closed_form(cfg) == cfg.num_parameters()
    assert counts["embedding"] == counts["lm_head"] == cfg.vocab_size * cfg.d_model
    assert counts["final_norm"] == cfg.d_model
    assert sum(v for k, v in counts.items() if k != "total") == counts["total"]
    assert model.tok_emb.weight.device.type == "meta"


def test_preset_sizes_and_overrides() -> None:
    assert PRESETS["cpu-small"].num_parameters() == pytest.approx(1.9e6, rel=0.02)
    assert PRESETS["cpu-medium"].num_parameters() == pytest.approx(5.5e6, rel=0.02)
    model = build_model("45m", vocab_size=1000, seq_len=64, device="meta")
    assert model.config.vocab_size == 1000 and model.config.seq_len == 64
    assert count_parameters(model)["total"] == _closed_form(model.config)


def test_unknown_preset_and_bad_config() -> None:
    with pytest.raises(GnoptError, match="tiny"):
        build_model("huge")
    with pytest.raises(GnoptError, match="n_heads"):
        LLaMA(ModelConfig(vocab_size=10, d_model=30, n_layers=1, n_heads=4, d_ff=8, seq_len=4))
    with pytest.raises(GnoptError, match="attn_impl"):
        LLaMA(SMALL, attn_impl="flash")  # type: ignore[arg-type]


@pytest.mark.parametrize(("preset", "n_blocks"), [("tiny", 4), ("45m", 6), ("150m", 14)])
def test_block_partition_covers_every_parameter_once(preset: str, n_blocks: int) -> None:
    model = build_model(preset, device="meta")
    parts = model.block_partition()
    assert len(parts) == n_blocks
    flat = [n for part in parts for n in part]
    assert sorted(flat) == sorted(n for n, _ in model.named_parameters())
    assert len(flat) == len(set(flat))
    assert parts[0] == ["tok_emb.weight"] and parts[-1] == ["lm_head.weight"]
    assert parts[-2][-1] == "norm.weight"
    assert all(n.startswith(f"blocks.{model.config.n_layers - 1}.") for n in parts[-2][:-1])
