"""The same code on a CUDA device: GN steps match the CPU path, and every optimizer trains and resumes.

gnopt is device-agnostic; everything else in the suite runs on the CPU, where the GN maths is checked
against dense float64 references. Here the CPU path is the reference for the CUDA one: GN steps (full,
prox-linear, layerwise; gnopt's LLaMA and a Hugging Face LLaMA), the one-pass tangent against forward-mode
AD, bf16-mixed GN and AdamW steps against float32, and every optimizer through ``gnopt train``. The module
skips where torch sees no CUDA device (CI has none); run it on a GPU machine with
``pytest tests/test_cuda.py`` (``benchmarks/gpu_hour.py`` runs it first).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from _gn_reference import CASES
from torch import Tensor, nn

from gnopt.cli import main
from gnopt.config import OPTIMIZERS
from gnopt.model import build_model
from gnopt.optim import (
    GaussNewton,
    InnerSchedule,
    LineSearch,
    MuonAdamW,
    Partition,
    SoftmaxCrossEntropy,
    TorchOptimizer,
    model_autocast,
)
from gnopt.optim.linearize import forward_with_graph_and_tangent, has_tangent_forward, jvp
from gnopt.steppers import forward, lm_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")


def _theta(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1).cpu() for p in model.parameters()])

def _cpu_and_cuda_steps(gn_cpu: GaussNewton, gn_gpu: GaussNewton, cpu_model: nn.Module, gpu_model: nn.Module,
                        batches: list, rel: float):
    """Three outer steps of two micro-batches each, the same on the CPU and on CUDA: after each the
    weights agree to ``rel`` and the step sizes are equal; yields both records for further checks."""
    for t in range(3):
        step = batches[2 * t: 2 * t + 2]
        rc = gn_cpu.step(iter(step))
        rg = gn_gpu.step(iter([_to(b, CUDA) for b in step]))
        ref = _theta(cpu_model)
        assert float((_theta(gpu_model) - ref).abs().max() / ref.abs().max()) < rel, f"step {t}"
        assert rg.alpha == rc.alpha
        yield rc, rg



def _to(batch: tuple[Tensor, Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    return batch[0].to(device), batch[1].to(device)


@pytest.mark.parametrize("case_name", ["mlp_ce_masked", "mlp_mse", "llama_ce_masked"])
@pytest.mark.parametrize("mode,layerwise", [("gn", False), ("prox_linear", False), ("gn", True)],
                         ids=["gn", "prox_linear", "layerwise"])
def test_gn_steps_on_cuda_equal_the_cpu_path_in_float64(case_name: str, mode: str, layerwise: bool) -> None:
    """Three outer steps (SGD inner, warm start, inner cosine, line search): θ, α, the line-search losses
    and the model values agree with the CPU run to float64 round-off."""
    case = CASES[case_name]
    cpu_model = case.make_model(0)
    gpu_model = copy.deepcopy(cpu_model).to(CUDA)
    gen = torch.Generator().manual_seed(3)
    batches = [case.make_batch(gen) for _ in range(6)]

    def make(model: nn.Module) -> GaussNewton:
        # layerwise: one block per top-level module (MLP: its two Linear layers; LLaMA: embedding, the
        # transformer blocks together, final norm, head)
        partition = Partition.from_callable(model, lambda name: name.split(".")[0]) if layerwise else None
        return GaussNewton(
            model, case.loss, inner_steps=2, mode=mode, partition=partition,
            inner=TorchOptimizer(lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.5)), inner_clip=None,
            line_search=LineSearch(kind="grid", ls_range=6, source="inner"),
            schedule=InnerSchedule("constant_with_inner_cosine", total_outer_steps=3, inner_steps=2,
                                   min_ratio=0.5),
        )

    for rc, rg in _cpu_and_cuda_steps(make(cpu_model), make(gpu_model), cpu_model, gpu_model, batches, 1e-10):
        assert rg.rejected == rc.rejected
        assert rg.ls_losses == pytest.approx(rc.ls_losses, rel=1e-10)
        assert rg.q_end == pytest.approx(rc.q_end, rel=1e-8, abs=1e-12)


def test_default_gn_on_the_llama_model_on_cuda() -> None:
    """The real model (fused SDPA for the primal pass, math SDPA under forward-mode AD) in float32 with
    the paper's inner optimizer: the CUDA run follows the CPU run closely and lowers the loss."""
    torch.manual_seed(0)
    cpu_model = build_model("tiny", vocab_size=64, seq_len=16)
    gpu_model = copy.deepcopy(cpu_model).to(CUDA)
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 64, (8, 8, 17), generator=gen)
    batches = [(seq[:, :-1], seq[:, 1:]) for seq in tokens]

    def make(model: nn.Module) -> GaussNewton:
        return GaussNewton(model, SoftmaxCrossEntropy(), inner_steps=4,
                           inner=MuonAdamW(lr=0.02, adam_lr=1e-3),
                           line_search=LineSearch(kind="grid", ls_range=5, source="inner"))

    gn_cpu, gn_gpu = make(cpu_model), make(gpu_model)
    for t in range(2):
        step = batches[4 * t: 4 * t + 4]
        rc = gn_cpu.step(iter(step))
        rg = gn_gpu.step(iter([_to(b, CUDA) for b in step]))
        assert rg.loss == pytest.approx(rc.loss, rel=1e-4)
        assert rg.ls_losses == pytest.approx(rc.ls_losses, rel=2e-3)  # bf16 Newton-Schulz on both devices
        assert rg.alpha is not None and rg.actual_decrease is not None and rg.actual_decrease > 0
    d = _theta(gpu_model) - _theta(cpu_model)
    assert float(d.abs().max()) < 5e-3 * float(_theta(cpu_model).abs().max())


def _args(corpus: Path, out: Path, optimizer: str, *extra: str) -> list[str]:
    return ["train", "--device", "cuda", "--data", str(corpus), "--preset", "tiny", "--tokenizer", "bytes",
            "--optimizer", optimizer, "--steps", "4", "--batch-tokens", "512", "--micro-batch-size", "8",
            "--seq-len", "32", "--eval-every", "2", "--eval-tokens", "1024", "--quiet", "--out", str(out),
            *extra]


def _metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer_trains_and_resumes_on_cuda(corpus: Path, tmp_path: Path, optimizer: str) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(_args(corpus, straight, optimizer)) == 0
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["final_val_loss"] < summary["initial_val_loss"]
    assert main(_args(corpus, split, optimizer, "--stop-after", "2")) == 0
    assert main(_args(corpus, split, optimizer, "--resume")) == 0
    a = [r["loss"] for r in _metrics(straight) if "loss" in r]
    b = [r["loss"] for r in _metrics(split) if "loss" in r]
    assert len(a) == len(b) == 4
    assert b == pytest.approx(a, rel=1e-5)  # CUDA kernels need not be bitwise deterministic
    # a checkpoint written on the GPU warm-starts a CPU run
    cpu = tmp_path / "cpu"
    assert main(["train", "--device", "cpu", "--init-from", str(straight / "checkpoint.pt"), "--data",
                 str(corpus), "--preset", "tiny", "--tokenizer", "bytes", "--optimizer", "adamw", "--steps",
                 "1", "--batch-tokens", "256", "--micro-batch-size", "8", "--seq-len", "32",
                 "--eval-tokens", "1024", "--quiet", "--out", str(cpu)]) == 0
    init = json.loads((cpu / "summary.json").read_text())["initial_val_loss"]
    assert init == pytest.approx(summary["final_val_loss"], rel=1e-4)


# ------------------------------------------------------------------------------------- bf16 mixed precision
needs_bf16 = pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)),
    reason="needs a CUDA device with bf16 (Ampere or newer)",
)


@needs_bf16
@pytest.mark.parametrize("mode,partition", [("gn", None), ("prox_linear", None), ("gn", "transformer")],
                         ids=["gn", "prox_linear", "layerwise"])
def test_gn_direction_under_bf16_on_cuda_agrees_with_float32(mode: str, partition: str | None) -> None:
    """On the GPU, where autocast's op lists differ from the CPU's (softmax and norms in float32, fused
    attention for the primal pass, math attention under forward-mode AD): the inner-loop direction of one
    outer step under bf16 autocast has cosine >= 0.99 with the float32 one, and the weights stay float32."""
    torch.manual_seed(0)
    base = build_model("tiny").to(CUDA)
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 256, (4, 4, 33), generator=gen)
    batches = [(seq[:, :-1].to(CUDA), seq[:, 1:].to(CUDA)) for seq in tokens]

    def direction(dtype: torch.dtype | None) -> Tensor:
        model = copy.deepcopy(base)
        gn = GaussNewton(model, SoftmaxCrossEntropy(), inner_steps=4, mode=mode, partition=partition,
                         inner=TorchOptimizer(lambda ps: torch.optim.SGD(ps, lr=0.5)), inner_clip=None,
                         line_search=LineSearch(kind="grid", ls_range=2, source="inner"),
                         autocast_dtype=dtype)
        theta = {n: p.detach().clone() for n, p in model.named_parameters()}
        gn.step(iter(batches))
        assert all(p.dtype == torch.float32 for p in model.parameters())
        hat = {n: v for blk in gn._blocks for n, v in blk.theta_hat.items()}
        return torch.cat([(hat[n] - theta[n]).reshape(-1) for n in theta]).cpu()

    d32, d16 = direction(None), direction(torch.bfloat16)
    assert float(torch.nn.functional.cosine_similarity(d16, d32, dim=0)) >= 0.99
    assert float((d16 - d32).norm() / d32.norm()) > 1e-4  # the bf16 passes really ran


@needs_bf16
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer_trains_under_bf16_on_cuda(corpus: Path, tmp_path: Path, optimizer: str) -> None:
    out = tmp_path / "bf16"
    before = torch.get_float32_matmul_precision()
    assert main(_args(corpus, out, optimizer, "--precision", "bf16-mixed")) == 0
    assert torch.get_float32_matmul_precision() == before  # TF32 is only on during the run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["precision"] == "bf16-mixed"
    assert summary["final_val_loss"] < summary["initial_val_loss"]
    assert summary["rejected_steps"] == 0 and summary["skipped_steps"] == 0


def _cos(a: Tensor, b: Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.reshape(-1).float(), b.reshape(-1).float(), dim=0))


@needs_bf16
def test_adamw_step_under_bf16_on_cuda_agrees_with_float32() -> None:
    """One AdamW step of the tiny LLaMA under bf16 autocast: loss and gradient close to float32 (the bf16
    passes really ran: they differ), gradients, weights and AdamW's moments stay float32."""
    torch.manual_seed(0)
    base = build_model("tiny").to(CUDA)
    gen = torch.Generator().manual_seed(4)
    seq = torch.randint(0, 256, (8, 33), generator=gen).to(CUDA)
    x, y = seq[:, :-1], seq[:, 1:]

    def step(dtype: torch.dtype | None) -> tuple[float, Tensor, nn.Module, torch.optim.AdamW]:
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        loss = lm_loss(forward(model, x, dtype), y)
        loss.backward()
        grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        assert all(p.grad.dtype == torch.float32 for p in model.parameters())
        opt.step()
        return float(loss), grad, model, opt

    l32, g32, _, _ = step(None)
    l16, g16, m16, opt16 = step(torch.bfloat16)
    assert l16 == pytest.approx(l32, rel=1e-2)
    assert _cos(g16, g32) >= 0.99
    assert float((g16 - g32).norm() / g32.norm()) > 1e-4  # the bf16 passes really ran
    assert all(p.dtype == torch.float32 for p in m16.parameters())
    assert all(v.dtype == torch.float32 for st in opt16.state.values() for k, v in st.items()
               if k in ("exp_avg", "exp_avg_sq"))


@needs_bf16
def test_gn_step_with_the_library_defaults_under_bf16_on_cuda() -> None:
    """GN as the library ships it (inner Muon + AdamW, the model line search) under bf16 autocast: the
    loss at θ_t agrees with float32, the line search accepts a step that lowers the loss, and θ, the inner
    iterates and the inner optimizer states stay float32."""
    torch.manual_seed(0)
    base = build_model("tiny").to(CUDA)
    gen = torch.Generator().manual_seed(6)
    tokens = torch.randint(0, 256, (10, 8, 33), generator=gen)
    batches = [(seq[:, :-1].to(CUDA), seq[:, 1:].to(CUDA)) for seq in tokens]

    def run(dtype: torch.dtype | None) -> tuple[list[Any], GaussNewton, nn.Module]:
        model = copy.deepcopy(base)
        gn = GaussNewton(model, SoftmaxCrossEntropy(), inner_steps=4, autocast_dtype=dtype)
        it = iter(batches)
        return [gn.step(it) for _ in range(2)], gn, model

    r32, _, _ = run(None)
    r16, gn16, m16 = run(torch.bfloat16)
    for a, b in zip(r16, r32, strict=True):
        assert a.loss == pytest.approx(b.loss, rel=2e-2)
    assert any(r.alpha is not None and r.actual_decrease is not None and r.actual_decrease > 0 for r in r16)
    assert all(p.dtype == torch.float32 for p in m16.parameters())
    assert all(v.dtype == torch.float32 for blk in gn16._blocks for v in blk.theta_hat.values())
    for blk in gn16._blocks:
        assert blk.optimizer is not None
        sd = blk.optimizer.state_dict()
        for opt_sd in sd.get("optimizers", [sd]):  # an OptimizerChain (Muon + AdamW) or one optimizer
            assert opt_sd["state"]
            for st in opt_sd["state"].values():
                assert all(v.dtype == torch.float32 for v in st.values()
                           if torch.is_tensor(v) and v.dim() > 0)


@pytest.mark.parametrize("dtype", ["float64", "float32", "bf16-autocast"])
def test_one_pass_tangent_equals_forward_mode_ad_on_cuda(dtype: str) -> None:
    """LLaMA's one-pass tangent forward (the fast path of full GN) against the generic forward-mode pass on
    the GPU, where the primal runs the fused SDPA kernel: z and u agree (float64: to round-off, and with the
    CPU's forward-mode AD too; float32 and bf16 autocast: to their precision)."""
    torch.manual_seed(0)
    wide = torch.float64 if dtype == "float64" else torch.float32
    cpu_model = build_model("tiny", vocab_size=64, seq_len=16, dtype=wide)
    model = copy.deepcopy(cpu_model).to(CUDA)
    assert has_tangent_forward(model)
    params = {n: p.detach() for n, p in model.named_parameters()}
    names = list(params)
    gen = torch.Generator().manual_seed(2)
    x_cpu = torch.randint(0, 64, (4, 16), generator=gen)
    tangent_cpu = {n: torch.randn(p.shape, generator=gen, dtype=wide) for n, p in params.items()}
    x, tangent = x_cpu.to(CUDA), {n: t.to(CUDA) for n, t in tangent_cpu.items()}
    with model_autocast(torch.bfloat16 if dtype == "bf16-autocast" else None):
        z_ref, u_ref = jvp(model, params, x, tangent, generic=True)
        z, _, u = forward_with_graph_and_tangent(model, params, x, names, tangent)
    assert u.dtype == z.dtype == torch.float32 or dtype == "float64"
    tol = {"float64": 1e-10, "float32": 1e-4, "bf16-autocast": 5e-2}[dtype]
    assert float((u - u_ref).abs().max() / u_ref.abs().max()) < tol
    assert float((z.detach() - z_ref).abs().max() / z_ref.abs().max()) < tol
    if dtype == "float64":  # the CPU's forward-mode AD is the reference of both
        cpu_params = {n: p.detach() for n, p in cpu_model.named_parameters()}
        _, u_cpu = jvp(cpu_model, cpu_params, x_cpu, tangent_cpu, generic=True)
        assert float((u.cpu() - u_cpu).abs().max() / u_cpu.abs().max()) < 1e-10


def _hf_llama() -> nn.Module:
    """A tiny Hugging Face LLaMA built from its config (no download), in float64, as tests/test_hf.py does."""
    transformers = pytest.importorskip("transformers")
    from gnopt.optim.hf import CausalLMLogits

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=11, hidden_size=8, intermediate_size=12, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=16, attn_implementation="sdpa",
    )
    return CausalLMLogits(transformers.LlamaForCausalLM(cfg).to(torch.float64))


@pytest.mark.parametrize("layerwise", [False, True], ids=["full", "layerwise"])
def test_hugging_face_gn_step_on_cuda_equals_the_cpu_path(layerwise: bool) -> None:
    """GN on a Hugging Face LlamaForCausalLM (SDPA attention; the generic forward-mode path): three outer
    steps on the GPU follow the CPU's in float64 (HF's LLaMA computes RMSNorm and softmax in float32, hence
    1e-6, as in tests/test_hf.py), and a bf16-mixed step on the GPU lowers the loss."""
    from gnopt.optim.hf import transformer_partition

    case = CASES["llama_ce_masked"]
    cpu_model = _hf_llama()
    gpu_model = copy.deepcopy(cpu_model).to(CUDA)
    gen = torch.Generator().manual_seed(7)
    batches = [case.make_batch(gen) for _ in range(6)]

    def make(model: nn.Module, dtype: torch.dtype | None = None) -> GaussNewton:
        return GaussNewton(
            model, case.loss, inner_steps=2, partition=transformer_partition(model) if layerwise else None,
            inner=TorchOptimizer(lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.5)), inner_clip=None,
            line_search=LineSearch(kind="grid", ls_range=6, source="inner"), autocast_dtype=dtype,
        )

    for rc, rg in _cpu_and_cuda_steps(make(cpu_model), make(gpu_model), cpu_model, gpu_model, batches, 1e-6):
        assert rg.ls_losses == pytest.approx(rc.ls_losses, rel=1e-6)
    if torch.cuda.is_bf16_supported(including_emulation=False):
        model16 = _hf_llama().to(torch.float32).to(CUDA)
        gn16 = make(model16, torch.bfloat16)
        rec = gn16.step(iter([_to(b, CUDA) for b in batches[:2]]))
        assert rec.alpha is not None and rec.actual_decrease is not None and rec.actual_decrease > 0
        assert all(p.dtype == torch.float32 for p in model16.parameters())
