"""The Newton-Schulz precision of every Muon (gnopt.optim.muon.Muon, MuonAdamW, the baseline, the config).

References: ``torch.optim.Muon`` itself (bf16, bitwise), and an SVD reference of what the Newton-Schulz
iteration computes: with G = U S Vᵀ, the iteration maps G/‖G‖_F to U f(S/‖G‖_F) Vᵀ, where f is the
5-fold composition of the quintic x ↦ a x + b x³ + c x⁵ applied to each singular value (evaluated in float64).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from _helpers import read_metrics
from torch import nn
from torch.optim import _muon

import gnopt.optim.inner as inner_mod
from gnopt.baselines import build_baseline_optimizers
from gnopt.cli import main
from gnopt.config import (
    TrainConfig,
    fingerprint,
    fingerprint_diff,
    fingerprint_fields,
    resolve,
    resolve_in_folder,
)
from gnopt.errors import GnoptError
from gnopt.model import build_model
from gnopt.optim import GaussNewton, MSELoss, MuonAdamW
from gnopt.optim.muon import Muon, zeropower_via_newtonschulz
from gnopt.study.runner import run_action
from gnopt.study.spec import load_spec, plan_runs

COEFFS = (_muon.DEFAULT_A, _muon.DEFAULT_B, _muon.DEFAULT_C)
SHAPES = [(24, 40), (40, 24), (32, 32)]


def svd_reference(g: torch.Tensor, steps: int = _muon.DEFAULT_NS_STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(U f(S/‖G‖) Vᵀ, U Vᵀ) in float64: what the Newton-Schulz iteration computes, and the polar factor."""
    g = g.double()
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    x = s / g.norm()
    a, b, c = COEFFS
    for _ in range(steps):
        x = a * x + b * x**3 + c * x**5
    return u @ torch.diag(x) @ vh, u @ vh


@pytest.mark.parametrize("shape", SHAPES)
def test_newton_schulz_in_bf16_is_torchs_bitwise(shape: tuple[int, int]) -> None:
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    before = g.clone()
    ours = zeropower_via_newtonschulz(g, COEFFS, 5, _muon.EPS, torch.bfloat16)
    theirs = _muon._zeropower_via_newtonschulz(g, COEFFS, 5, _muon.EPS)
    assert ours.dtype == theirs.dtype == torch.bfloat16 and torch.equal(ours, theirs)
    assert torch.equal(g, before)  # the input is not modified (in float32 too, below)


@pytest.mark.parametrize("shape", SHAPES)
def test_newton_schulz_in_fp32_matches_the_svd_reference(shape: tuple[int, int]) -> None:
    """float32 lands on the iteration's exact result to ~1e-6 (bf16 only to ~1e-2), and that result is the
    polar factor U Vᵀ up to Newton-Schulz's known spread of singular values (≈0.7-1.2, not 1)."""
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    before = g.clone()
    exact, polar = svd_reference(g)
    fp32 = zeropower_via_newtonschulz(g, COEFFS, 5, _muon.EPS, torch.float32)
    bf16 = zeropower_via_newtonschulz(g, COEFFS, 5, _muon.EPS, torch.bfloat16)
    assert fp32.dtype == torch.float32 and torch.equal(g, before)
    err32 = (fp32.double() - exact).abs().max().item()
    err16 = (bf16.double() - exact).abs().max().item()
    assert err32 < 1e-5, err32
    assert err16 > 10 * err32  # the float32 iteration is the more accurate one
    sv = torch.linalg.svdvals(fp32.double())
    assert 0.6 < sv.min().item() and sv.max().item() < 1.25, sv
    # U Vᵀ within the spread: ‖O − U Vᵀ‖₂ = max |s'ᵢ − 1|.
    assert torch.linalg.matrix_norm(fp32.double() - polar, ord=2).item() < 0.4


def _muon_runs(kind: str, **kw: object) -> list[torch.Tensor]:
    """Three steps of a Muon on two matrices (different shapes) with fixed gradients; the parameters."""
    g = torch.Generator().manual_seed(2)
    params = [nn.Parameter(torch.randn(24, 40, generator=g)), nn.Parameter(torch.randn(40, 16, generator=g))]
    grads = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(3)]
    opt: torch.optim.Optimizer
    if kind == "torch":
        opt = torch.optim.Muon(params, **kw)  # type: ignore[arg-type]
    else:
        opt = Muon(params, **kw)  # type: ignore[arg-type]
    for step_grads in grads:
        for p, gr in zip(params, step_grads, strict=True):
            p.grad = gr.clone()
        if kind == "loop-bf16":  # gnopt's own update loop (the fp32 path's), forced to run in bf16
            with torch.no_grad():
                for group in opt.param_groups:
                    opt._step_group(group, torch.bfloat16)  # type: ignore[attr-defined]
        else:
            opt.step()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("kw", [
    dict(lr=0.02, weight_decay=0.0, adjust_lr_fn="original"),
    dict(lr=0.05, weight_decay=0.1, nesterov=False, momentum=0.9, adjust_lr_fn="match_rms_adamw"),
    dict(lr=0.01, weight_decay=0.01, ns_steps=3),
])
def test_muon_bf16_is_torch_muon_and_its_own_loop_matches_it_bitwise(kw: dict[str, object]) -> None:
    """bf16 runs torch's step; gnopt's loop (used for fp32) run in bf16 gives torch's bits too, so fp32
    differs from torch only by the iteration's precision."""
    reference = _muon_runs("torch", **kw)
    for kind in ("gnopt", "loop-bf16"):
        got = _muon_runs(kind, **kw)
        assert all(torch.equal(a, b) for a, b in zip(got, reference, strict=True)), kind
    fp32 = _muon_runs("gnopt", ns_precision="fp32", **kw)
    assert all(not torch.equal(a, b) and torch.allclose(a, b, atol=0.05)
               for a, b in zip(fp32, reference, strict=True))


def test_ns_precision_is_a_group_option_saved_in_the_state_dict() -> None:
    p = nn.Parameter(torch.randn(8, 4))
    opt = Muon([p], ns_precision="fp32")
    assert opt.param_groups[0]["ns_precision"] == "fp32"
    state = opt.state_dict()
    assert state["param_groups"][0]["ns_precision"] == "fp32"
    fresh = Muon([nn.Parameter(torch.randn(8, 4))])
    fresh.load_state_dict(state)
    assert fresh.param_groups[0]["ns_precision"] == "fp32"  # the recorded precision wins
    old = torch.optim.Muon([nn.Parameter(torch.randn(8, 4))]).state_dict()  # saved before the option existed
    later = Muon([nn.Parameter(torch.randn(8, 4))], ns_precision="fp32")
    later.load_state_dict(old)
    assert later.param_groups[0]["ns_precision"] == "bf16"
    with pytest.raises(ValueError, match="ns_precision must be one of bf16, fp32"):
        Muon([p], ns_precision="fp16")
    with pytest.raises(GnoptError, match="ns_precision must be one of bf16, fp32"):
        MuonAdamW(ns_precision="float32")


def _mlp_gn_theta(inner: MuonAdamW) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)) for _ in range(12)]
    gn = GaussNewton(model, MSELoss(), inner_steps=3, inner=inner)
    it = iter(data)
    for _ in range(2):
        gn.step(it)
    return [p.detach().clone() for p in model.parameters()]


def test_gauss_newton_with_inner_muon_in_bf16_is_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    """MuonAdamW's default (bf16) steps GN exactly as torch.optim.Muon did before the option existed."""
    ours = _mlp_gn_theta(MuonAdamW(lr=0.02, adam_lr=1e-2))
    fp32 = _mlp_gn_theta(MuonAdamW(lr=0.02, adam_lr=1e-2, ns_precision="fp32"))

    def torch_muon(params: object, *, ns_precision: str, **kw: object) -> torch.optim.Muon:
        assert ns_precision == "bf16"
        return torch.optim.Muon(params, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(inner_mod, "Muon", torch_muon)
    before = _mlp_gn_theta(MuonAdamW(lr=0.02, adam_lr=1e-2))
    assert all(torch.equal(a, b) for a, b in zip(ours, before, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(fp32, before, strict=True))
    assert all(torch.allclose(a, b, atol=0.05) for a, b in zip(fp32, before, strict=True))


# ------------------------------------------------------------------------------------------------------
# the harness: config, fingerprint, baseline, resume
# ------------------------------------------------------------------------------------------------------


def _cfg(**kw: object) -> TrainConfig:
    base: dict[str, object] = dict(preset="tiny", tokenizer="bytes", steps=4, batch_tokens=256,
                                   micro_batch_size=4, out="unused", device="cpu")
    return resolve(TrainConfig(**(base | kw)))  # type: ignore[arg-type]


def test_config_default_recording_and_old_fingerprints() -> None:
    assert _cfg(optimizer="muon").muon_ns_precision == "fp32"  # a CPU run
    assert _cfg(optimizer="gn", device="cuda").muon_ns_precision == "bf16"
    assert _cfg(optimizer="gn", inner_optimizer="cg").muon_ns_precision is None  # no Muon in the run
    assert _cfg(optimizer="adamw", muon_ns_precision="fp32").muon_ns_precision is None
    # Runs recorded before the field existed ran bf16 (Muon) or no Muon: their fingerprints are unchanged.
    for optimizer in ("muon", "gn", "adamw"):
        old = _cfg(optimizer=optimizer, muon_ns_precision="bf16")
        assert "muon_ns_precision" not in fingerprint_fields(old)
    assert "muon_ns_precision" not in fingerprint_fields(_cfg(optimizer="soap"))
    muon = _cfg(optimizer="muon", muon_ns_precision="bf16")
    assert fingerprint(dataclasses.replace(muon, muon_ns_precision="fp32")) != fingerprint(muon)
    with pytest.raises(GnoptError, match="unknown Muon Newton-Schulz precision 'tf32'; valid .*: bf16, fp32"):
        _cfg(optimizer="muon", muon_ns_precision="tf32")
    # A config a run folder records fills the field where it is unset, and only there.
    unset = TrainConfig(optimizer="muon", device="cpu")
    given = TrainConfig(optimizer="muon", device="cpu", muon_ns_precision="fp32")
    assert resolve(unset, {}).muon_ns_precision == "bf16"  # a run recorded before the field existed
    assert resolve(unset, {"muon_ns_precision": "bf16"}).muon_ns_precision == "bf16"
    assert resolve(unset, {"muon_ns_precision": None}).muon_ns_precision == "fp32"  # it ran no Muon
    assert resolve(given, {}).muon_ns_precision == "fp32"
    assert resolve(TrainConfig(optimizer="adamw", device="cpu"), {}).muon_ns_precision is None


def test_a_recorded_config_diffs_as_its_fingerprint_reads_it() -> None:
    # config.json records every field (an AdamW run: muon_ns_precision null); a resume compares it with the
    # fingerprint fields, which leave the unused field out: that is no change, in either direction.
    adamw = _cfg(optimizer="adamw")
    recorded = json.loads(json.dumps(adamw.to_dict()))
    assert recorded["muon_ns_precision"] is None
    assert fingerprint_diff(recorded, fingerprint_fields(adamw)) == []
    assert fingerprint_diff(fingerprint_fields(adamw), recorded) == []
    # A Muon run recorded before the field existed ran bf16: the same as bf16 now, not the same as fp32.
    old_muon = {k: v for k, v in _cfg(optimizer="muon").to_dict().items() if k != "muon_ns_precision"}
    bf16 = _cfg(optimizer="muon", muon_ns_precision="bf16")
    assert fingerprint_diff(old_muon, fingerprint_fields(bf16)) == []
    assert fingerprint_diff(old_muon, fingerprint_fields(_cfg(optimizer="muon"))) == [
        "muon_ns_precision: 'bf16' -> 'fp32'"]


def test_resolve_in_folder_keeps_what_the_folder_records(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = TrainConfig(optimizer="gn", out=str(out), device="cpu")
    assert resolve_in_folder(cfg).muon_ns_precision == "fp32"  # no folder yet: this machine's default
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"fingerprint": "x", "config": {"optimizer": "gn"}}))
    assert resolve_in_folder(cfg).muon_ns_precision == "bf16"  # recorded before the field existed
    assert resolve_in_folder(cfg, overwrite=True).muon_ns_precision == "fp32"  # a new run in the folder
    (out / "config.json").write_text("{torn")
    assert resolve_in_folder(cfg).muon_ns_precision == "fp32"


def test_the_baseline_muon_uses_the_configured_precision() -> None:
    for value in ("bf16", "fp32"):
        cfg = _cfg(optimizer="muon", muon_ns_precision=value)
        (label, muon), _ = build_baseline_optimizers(cfg, build_model("tiny"))
        assert label == "muon" and isinstance(muon, Muon) and muon.param_groups[0]["ns_precision"] == value


def _args(corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(corpus), "--preset", "tiny", "--tokenizer", "bytes", "--optimizer", "muon",
            "--steps", "4", "--batch-tokens", "256", "--micro-batch-size", "4", "--eval-every", "2",
            "--eval-tokens", "1024", "--threads", "1", "--device", "cpu", "--quiet", "--out", str(out),
            *extra]


def test_a_resumed_run_keeps_the_precision_it_recorded(corpus: Path, tmp_path: Path) -> None:
    """A run started with bf16 (as on a GPU, or before the option existed) and resumed where the default
    is fp32 goes on in bf16, bitwise as if it had not stopped; asking for fp32 explicitly is refused."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(_args(corpus, straight, "--muon-ns-precision", "bf16")) == 0
    assert main(_args(corpus, split, "--muon-ns-precision", "bf16", "--stop-after", "2",
                      "--ckpt-every", "1")) == 0
    assert main(_args(corpus, split, "--resume", "--muon-ns-precision", "fp32")) == 2  # a different run
    assert main(_args(corpus, split, "--resume")) == 0
    keys = ("step", "loss", "val_loss")
    assert ([[r.get(k) for k in keys] for r in read_metrics(straight)]
            == [[r.get(k) for k in keys] for r in read_metrics(split)])
    assert json.loads((split / "summary.json").read_text())["config"]["muon_ns_precision"] == "bf16"
    fp32 = tmp_path / "fp32"
    assert main(_args(corpus, fp32)) == 0
    assert json.loads((fp32 / "config.json").read_text())["config"]["muon_ns_precision"] == "fp32"
    assert read_metrics(fp32)[-1]["val_loss"] != read_metrics(straight)[-1]["val_loss"]


STUDY = """
[experiment]
batch_tokens = [256]
budget_tokens = 1024

[base]
preset = "tiny"
tokenizer = "bytes"
micro_batch_size = 4
device = "cpu"

[methods.adamw]
lr = [1e-3]

[methods.gn]
lr = [0.01]
"""


def test_a_study_recorded_before_the_option_resumes_in_bf16(tmp_path: Path) -> None:
    """A study's run folder written before the field existed (its config has no muon_ns_precision) is
    planned as the bf16 run it was, so the study skips or resumes it instead of calling it changed; a
    method table can set the precision, and a folder that records another one is a changed experiment."""
    exp = tmp_path / "mini.toml"
    exp.write_text(STUDY, encoding="utf-8")
    out = tmp_path / "study"
    fresh = plan_runs(load_spec(exp), out)
    gn = next(r for r in fresh if r.optimizer == "gn")
    assert gn.config.muon_ns_precision == "fp32" and run_action(gn) == "start"  # this CPU's default
    folder = Path(gn.config.out or "")
    folder.mkdir(parents=True)
    old = dataclasses.replace(gn.config, muon_ns_precision="bf16")
    old_fields = fingerprint_fields(old)
    assert "muon_ns_precision" not in old_fields  # what a run recorded before the field existed
    (folder / "config.json").write_text(json.dumps({"fingerprint": fingerprint(old), "config": old_fields}))
    (folder / "summary.json").write_text(json.dumps({"completed": True, "fingerprint": fingerprint(old)}))
    again = next(r for r in plan_runs(load_spec(exp), out) if r.rel == gn.rel)
    assert again.config.muon_ns_precision == "bf16" and run_action(again) == "skip"
    assert fingerprint(again.config) == fingerprint(old)
    exp.write_text(STUDY + 'muon_ns_precision = "fp32"\n', encoding="utf-8")
    pinned = next(r for r in plan_runs(load_spec(exp), out) if r.rel == gn.rel)
    assert pinned.config.muon_ns_precision == "fp32"
    with pytest.raises(GnoptError, match="muon_ns_precision: 'bf16' -> 'fp32'"):
        run_action(pinned)
