"""Hugging Face ``transformers`` causal LMs under GaussNewton (:mod:`gnopt.optim.hf`), checked against the
dense float64 references of ``_gn_reference`` (Jacobians by reverse-mode autograd of the same HF model,
closed-form softmax Hessians, ``torch.linalg`` solves). Models are built from a config: no download.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from _gn_reference import CASES, Case, dense, flat, jacobi_sgd, llama_batch, names_of, params_of
from _helpers import rel_err, theta_flat
from torch import Tensor

from gnopt.errors import GnoptError
from gnopt.optim import CG, GaussNewton, LineSearch, TorchOptimizer, model_autocast
from gnopt.optim.hf import CausalLMLogits, transformer_partition
from gnopt.optim.linearize import jvp

transformers = pytest.importorskip("transformers")

F64 = torch.float64
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hf_causal_lm.py"
VOCAB, SEQ = 11, 6  # llama_batch's vocabulary and sequence length


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops on 2 shared cores: one thread


def hf_llama(attn: str = "eager", dtype: torch.dtype = F64) -> CausalLMLogits:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=8, intermediate_size=12, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=16, attn_implementation=attn,
    )
    return CausalLMLogits(transformers.LlamaForCausalLM(cfg).to(dtype))


def hf_gpt2(attn: str = "eager", dtype: torch.dtype = F64) -> CausalLMLogits:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=8, n_layer=2, n_head=2, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, attn_implementation=attn,
    )
    return CausalLMLogits(transformers.GPT2LMHeadModel(cfg).to(dtype))


MODELS = {"llama": hf_llama, "gpt2": hf_gpt2}
#: Relative tolerance against the float64 reference. HF's LLaMA computes RMSNorm and the attention softmax
#: in float32 even in a float64 model (``.to(torch.float32)`` in modeling_llama.py), so its Jacobian
#: products carry float32 rounding; GPT-2 stays float64 throughout.
TOL = {"llama": 1e-6, "gpt2": 1e-10}
CE: Case = CASES["llama_ce_masked"]  # token-mean CE with ignored targets, reference value and Hessian


def test_partition_finds_the_decoder_layers() -> None:
    llama = transformer_partition(hf_llama())
    assert llama.labels == ("embedding", "layer0", "layer1", "head")
    assert llama.blocks[0] == ("model.model.embed_tokens.weight",)
    assert llama.blocks[2][-1] == "model.model.norm.weight"  # the final norm joins the last layer
    assert llama.blocks[3] == ("model.lm_head.weight",)
    gpt2 = transformer_partition(hf_gpt2())  # head tied to the input embedding: no head block
    assert gpt2.labels == ("embedding", "layer0", "layer1")
    assert gpt2.blocks[0] == ("model.transformer.wte.weight", "model.transformer.wpe.weight")
    assert gpt2.blocks[2][-2:] == ("model.transformer.ln_f.weight", "model.transformer.ln_f.bias")
    assert all(n.startswith("model.transformer.h.1.") for n in gpt2.blocks[2][:-2])


def test_attention_without_forward_ad_is_refused() -> None:
    hf = hf_llama().model
    hf.config._attn_implementation = "flash_attention_2"
    with pytest.raises(GnoptError, match="has no forward-mode AD"):
        CausalLMLogits(hf)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_layerwise_sgd_inner_equals_dense_reference(arch: str, attn: str) -> None:
    """Layerwise GN with SGD inner steps on an HF model: each block b steps on J_bᵀ(g_z + H_z J_b Δ_b), the
    others frozen at θ_t; two outer steps with warm start, against the dense J sliced per block."""
    model = MODELS[arch](attn)
    names = names_of(model)
    partition = transformer_partition(model)
    assert [n for blk in partition.blocks for n in blk] == names  # contiguous slices of the flat vector
    sizes = [sum(p.numel() for n, p in model.named_parameters() if n in blk) for blk in partition.blocks]
    batch = llama_batch(torch.Generator().manual_seed(12))
    eta = 0.5
    gn = GaussNewton(model, CE.loss, inner_steps=2, partition=partition, inner_clip=None,
                     warm_scale=False,
                     inner=TorchOptimizer(lambda ps: torch.optim.SGD(ps, lr=eta)),
                     line_search=LineSearch(kind="grid", ls_range=6, source="inner"))
    theta_hat_prev: Tensor | None = None
    for t in range(2):
        theta_t = theta_flat(model)
        params = params_of(model)
        D = dense(CE, model, params, batch, names)
        delta = torch.zeros_like(theta_t) if theta_hat_prev is None else theta_hat_prev - theta_t
        delta = jacobi_sgd(D, delta, sizes, eta, 2)
        rec = gn.step(iter([batch] * 2))
        got = flat({n: v for blk in gn._blocks for n, v in blk.theta_hat.items()}, names).clone()
        assert rel_err(got - theta_t, delta) < TOL[arch], f"step {t}"
        assert rec.loss == pytest.approx(D.loss, rel=1e-12)
        assert rec.alpha is not None
        assert rel_err(theta_flat(model), theta_t + rec.alpha * (got - theta_t)) < 1e-14
        theta_hat_prev = got


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_full_gn_cg_direction_equals_damped_solve(arch: str) -> None:
    """Full GN with CG: d = −(JᵀHJ + λI)⁻¹ Jᵀg_z = −Jᵀ(HJJᵀ + λI)⁻¹ g_z (solved densely in output space)."""
    model = MODELS[arch]()
    names = names_of(model)
    batch = llama_batch(torch.Generator().manual_seed(22))
    lam = 1e-3
    D = dense(CE, model, params_of(model), batch, names)
    K = D.H @ D.J @ D.J.T
    ref = -D.J.T @ torch.linalg.solve(K + lam * torch.eye(K.shape[0], dtype=F64), D.gz)
    gn = GaussNewton(model, CE.loss, inner_steps=1, inner=CG(tol=1e-12, max_iters=200), damping=lam,
                     line_search=LineSearch(kind="grid", ls_range=1, source="inner", model_decrease=False))
    theta0 = theta_flat(model)
    rec = gn.step(iter([batch]))
    assert rec.alpha == 1.0
    # The solve with λ = 1e-3 amplifies LLaMA's float32 rounding (TOL) by the system's conditioning, and
    # that rounding is also where CG's residual stalls.
    assert rel_err(theta_flat(model) - theta0, ref) < {"llama": 1e-4, "gpt2": 1e-8}[arch]
    assert rec.cg_rel_residual[0] < {"llama": 1e-7, "gpt2": 1e-10}[arch]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bf16_tangent_of_an_hf_model_is_close_to_float32(arch: str) -> None:
    model = MODELS[arch]("sdpa", torch.float32)
    params = {n: p.detach() for n, p in model.named_parameters()}
    tangent = {n: torch.randn_like(p) for n, p in params.items()}
    x, _ = llama_batch(torch.Generator().manual_seed(5))
    _, u32 = jvp(model, params, x, tangent)
    with model_autocast(torch.bfloat16):
        z16, u16 = jvp(model, params, x, tangent)
    assert z16.dtype == u16.dtype == torch.float32
    err = float((u16 - u32).norm() / u32.norm())
    assert 0 < err < 0.05, err


@pytest.mark.parametrize(
    "args", [["--arch", "llama"], ["--arch", "gpt2", "--layerwise", "--precision", "bf16-mixed"]]
)
def test_example_trains(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("hf_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    losses = example.main([*args, "--steps", "4", "--seq-len", "32", "--batch", "4", "--inner-steps", "2"])
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.2, losses
    assert capsys.readouterr().out.count("step ") == 4
