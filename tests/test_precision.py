"""Mixed precision (``--precision bf16-mixed``) on CPU: bf16 autocast for the model's passes, float32 for
weights, optimizer states, losses, logit gradients and GN's logit Hessian-vector products.

Each test also checks that the model really ran in bf16 (a forward hook sees bf16 activations, or the
result differs from the float32 one), so a setting that were silently ignored would fail them.
"""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from test_baselines import pattern_batches
from torch import Tensor, nn

from gnopt.cli import main
from gnopt.config import TrainConfig, fingerprint, fingerprint_diff, fingerprint_fields, resolve
from gnopt.errors import GnoptError
from gnopt.model import build_model
from gnopt.optim import GaussNewton, LineSearch, SoftmaxCrossEntropy, TorchOptimizer, model_autocast
from gnopt.optim.linearize import forward_with_graph, jvp, pullback
from gnopt.steppers import build_stepper, lm_loss

SEQ = 32  # the tiny preset's sequence length
ALL_OPTIMIZERS = ["adamw", "muon", "soap", "shampoo", "gn", "gn-prox-linear", "gn-layerwise"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops on 2 shared cores: one thread


class DtypeSpy:
    """Records the output dtypes of every ``nn.Linear`` of a model (forward hooks)."""

    def __init__(self, model: nn.Module) -> None:
        self.dtypes: set[torch.dtype] = set()
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        self.handles = [m.register_forward_hook(self._hook) for m in linears]

    def _hook(self, module: nn.Module, args: object, out: Tensor) -> None:
        self.dtypes.add(out.dtype)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def mean_loss(model: nn.Module, data: list[tuple[Tensor, Tensor]]) -> float:
    with torch.no_grad():
        return float(sum(lm_loss(model(x), y) for x, y in data)) / len(data)


@pytest.mark.parametrize("name", ALL_OPTIMIZERS)
def test_bf16_mixed_training_lowers_the_loss(name: str) -> None:
    torch.manual_seed(0)
    model = build_model("tiny")
    cfg = resolve(TrainConfig(preset="tiny", tokenizer="bytes", optimizer=name, steps=6,
                              batch_tokens=2 * 4 * SEQ, micro_batch_size=4, warmup_steps=0,
                              schedule="constant", out="unused", precision="bf16-mixed"))
    stepper = build_stepper(cfg, model)
    data = pattern_batches(2, seed=1)
    before = mean_loss(model, data)  # measured in float32
    spy = DtypeSpy(model)
    batches: Iterator[tuple[Tensor, Tensor]] = itertools.cycle(data)
    for _ in range(cfg.steps):
        out = stepper.step(batches)
        assert isinstance(out["loss"], float)
    spy.close()
    assert spy.dtypes == {torch.bfloat16}, spy.dtypes  # every model pass ran under bf16 autocast
    assert all(p.dtype == torch.float32 for p in model.parameters())  # float32 master weights
    state_dtypes = {t.dtype for t in _tensors(stepper.state_dict()) if t.is_floating_point()}
    assert state_dtypes <= {torch.float32}, state_dtypes  # optimizer / inner states stay float32
    after = mean_loss(model, data)
    assert after < before - 0.3, (name, before, after)


def _tensors(obj: object) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def test_linearized_passes_under_autocast_are_float32_and_close() -> None:
    torch.manual_seed(0)
    model = build_model("tiny")
    params = {n: p.detach() for n, p in model.named_parameters()}
    tangent = {n: 1e-2 * torch.randn_like(p) for n, p in params.items()}
    x, _ = pattern_batches(1)[0]
    z32, u32 = jvp(model, params, x, tangent)
    with model_autocast(torch.bfloat16):
        z16, u16 = jvp(model, params, x, tangent)
        z, leaves = forward_with_graph(model, params, x, list(params))
    assert z16.dtype == u16.dtype == z.dtype == torch.float32
    r = torch.randn_like(z)
    grads = pullback(z, leaves, list(params), r)
    assert all(g.dtype == torch.float32 for g in grads.values())
    ref_z, leaves32 = forward_with_graph(model, params, x, list(params))
    ref = pullback(ref_z, leaves32, list(params), r)
    for a, b, what in ((z16, z32, "primal"), (u16, u32, "tangent")):
        err = float((a - b).norm() / b.norm())
        assert 0 < err < 0.05, (what, err)  # bf16 rounding: not exact, but close
    g16 = torch.cat([g.reshape(-1) for g in grads.values()])
    g32 = torch.cat([g.reshape(-1) for g in ref.values()])
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0) > 0.99


def _gn_direction(model: nn.Module, mode: str, partition: str | None, dtype: torch.dtype | None) -> Tensor:
    """θ̂ − θ_t after one inner loop of plain SGD on fixed micro-batches (deterministic)."""
    gn = GaussNewton(model, SoftmaxCrossEntropy(), inner_steps=4, mode=mode, partition=partition,
                     inner=TorchOptimizer(lambda ps: torch.optim.SGD(ps, lr=0.5)), inner_clip=None,
                     line_search=LineSearch(kind="grid", ls_range=2, source="inner"), autocast_dtype=dtype)
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    gn.step(iter(pattern_batches(4, seed=3)))
    hat = {n: v for blk in gn._blocks for n, v in blk.theta_hat.items()}
    return torch.cat([(hat[n] - theta[n]).reshape(-1) for n in theta])


@pytest.mark.parametrize(("mode", "partition"), [("gn", None), ("prox_linear", None), ("gn", "transformer")])
def test_gn_direction_under_bf16_agrees_with_float32(mode: str, partition: str | None) -> None:
    torch.manual_seed(0)
    model = build_model("tiny")
    d32 = _gn_direction(copy.deepcopy(model), mode, partition, None)
    d16 = _gn_direction(copy.deepcopy(model), mode, partition, torch.bfloat16)
    cos = float(torch.nn.functional.cosine_similarity(d16, d32, dim=0))
    rel = float((d16 - d32).norm() / d32.norm())
    assert cos >= 0.99, cos
    assert rel > 1e-4, rel  # the bf16 passes really ran (the float32 direction is not reproduced exactly)


def test_gauss_newton_rejects_other_autocast_dtypes() -> None:
    with pytest.raises(GnoptError, match="autocast_dtype must be None or one of"):
        GaussNewton(build_model("tiny"), SoftmaxCrossEntropy(), inner_steps=1, autocast_dtype=torch.float16)


def test_fp32_keeps_the_fingerprint_of_runs_recorded_before_precision_existed() -> None:
    cfg = resolve(TrainConfig(preset="tiny", tokenizer="bytes", out="unused"))
    fields = fingerprint_fields(cfg)
    assert "precision" not in fields  # so the hash is the one older runs recorded
    assert fingerprint_diff(fields, fields) == []
    bf16 = resolve(TrainConfig(preset="tiny", tokenizer="bytes", out="unused", precision="bf16-mixed"))
    assert fingerprint(bf16) != fingerprint(cfg)
    assert fingerprint_diff(fields, fingerprint_fields(bf16)) == ["precision: 'fp32' -> 'bf16-mixed'"]


# ------------------------------------------------------------------------------------------------ CLI
def _train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--preset", "tiny", "--tokenizer", "bytes", "--steps", "2",
            "--batch-tokens", "256", "--micro-batch-size", "4", "--eval-every", "0", "--eval-tokens", "512",
            "--threads", "1", "--quiet", "--out", str(out), *extra]


def _error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured
    assert "Traceback" not in captured.err
    lines = [ln for ln in captured.err.splitlines() if ln.startswith("gnopt: error: ")]
    assert len(lines) == 1, captured.err
    return lines[0]


def test_unknown_precision_is_one_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, corpus: Path
) -> None:
    msg = _error_line(capsys, _train_args(corpus, tmp_path / "out", "--precision", "fp16"))
    assert "unknown precision 'fp16'; valid precisions: fp32, bf16-mixed" in msg
    assert not (tmp_path / "out").exists()


def test_bf16_on_a_device_without_it_is_refused_before_writing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gnopt.precision

    monkeypatch.setattr(gnopt.precision, "bf16_supported", lambda device: False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    msg = _error_line(capsys, _train_args(corpus, out, "--precision", "bf16-mixed", "--device", "cpu"))
    assert "--precision bf16-mixed needs bf16 support" in msg and "--precision fp32" in msg
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_bf16_mixed_run_end_to_end(capsys: pytest.CaptureFixture[str], tmp_path: Path, corpus: Path) -> None:
    out = tmp_path / "run"
    assert main(_train_args(corpus, out, "--precision", "bf16-mixed", "--optimizer", "gn")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["precision"] == "bf16-mixed" and summary["completed"]


# ------------------------------------------------------------------------------------------- --compile
def test_compile_is_refused_for_gauss_newton(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                             corpus: Path) -> None:
    args = _train_args(corpus, tmp_path / "out", "--optimizer", "gn-layerwise", "--compile")
    msg = _error_line(capsys, args)
    assert "--compile works with the baseline optimizers" in msg and "--optimizer gn-layerwise" in msg
    assert not (tmp_path / "out").exists()


def test_gauss_newton_refuses_a_compiled_model() -> None:
    model = build_model("tiny")
    with pytest.raises(GnoptError, match="drops forward-mode AD tangents"):
        GaussNewton(torch.compile(model), SoftmaxCrossEntropy(), inner_steps=1)  # compilation is lazy: cheap
    model.blocks[0] = torch.compile(model.blocks[0])
    with pytest.raises(GnoptError, match=r"submodule 'blocks\.0'"):
        GaussNewton(model, SoftmaxCrossEntropy(), inner_steps=1)


def test_compile_runs_the_baseline_forward_through_torch_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stepper trains through the compiled module while the model (state dict, evaluation) stays eager.
    The "eager" dynamo backend keeps the test fast: it traces the forward without generating code."""
    compiled: list[nn.Module] = []
    real_compile = torch.compile

    def recording_compile(module: nn.Module) -> nn.Module:
        compiled.append(module)
        return real_compile(module, backend="eager")

    monkeypatch.setattr(torch, "compile", recording_compile)
    torch.manual_seed(0)
    model = build_model("tiny")
    cfg = resolve(TrainConfig(preset="tiny", tokenizer="bytes", optimizer="adamw", steps=6,
                              batch_tokens=2 * 4 * SEQ, micro_batch_size=4, warmup_steps=0,
                              schedule="constant", out="unused", compile=True))
    assert "compile" not in fingerprint_fields(cfg)  # how the run executes, not what it computes
    stepper = build_stepper(cfg, model)
    assert compiled == [model]
    data = pattern_batches(2, seed=1)
    before = mean_loss(model, data)
    torch._dynamo.utils.counters.clear()
    for _ in range(cfg.steps):
        stepper.step(itertools.cycle(data))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the forward really was traced
    assert mean_loss(model, data) < before - 0.3
    assert not any(k.startswith("_orig_mod") for k in stepper.model.state_dict())
