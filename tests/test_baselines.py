"""Baselines: schedules, routing, gradient accumulation, skipping non-finite steps, learning progress."""

from __future__ import annotations

import dataclasses
import io
import math

import pytest
import torch

from gnopt.baselines import (
    MUON_ADJUST_LR_FN,
    build_baseline_optimizers,
    lr_multiplier,
    route_hidden_matrices,
)
from gnopt.config import TrainConfig, fingerprint, fingerprint_fields, resolve
from gnopt.errors import GnoptError
from gnopt.model import build_model
from gnopt.steppers import BaselineStepper, accumulate_gradients, build_stepper, lm_loss

SEQ = 32  # the tiny preset's sequence length


def tiny_cfg(**kw: object) -> TrainConfig:
    base: dict[str, object] = dict(preset="tiny", tokenizer="bytes", steps=10, batch_tokens=4 * SEQ * 2,
                                   micro_batch_size=4, warmup_steps=0, schedule="constant", out="unused")
    base.update(kw)
    return resolve(TrainConfig(**base))  # type: ignore[arg-type]


def pattern_batches(n: int, batch: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Micro-batches of a learnable stream (a repeated random 16-token motif with a little noise)."""
    g = torch.Generator().manual_seed(seed)
    motif = torch.randint(0, 256, (16,), generator=g)
    out = []
    for _ in range(n):
        starts = torch.randint(0, 16, (batch,), generator=g)
        idx = (starts[:, None] + torch.arange(SEQ + 1)[None, :]) % 16
        seqs = motif[idx]
        noise = torch.rand(seqs.shape, generator=g) < 0.05
        seqs = torch.where(noise, torch.randint(0, 256, seqs.shape, generator=g), seqs)
        out.append((seqs[:, :-1].contiguous(), seqs[:, 1:].contiguous()))
    return out


# ------------------------------------------------------------------------------------------------------
# schedule
# ------------------------------------------------------------------------------------------------------


def test_warmup_is_linear_and_reaches_the_peak() -> None:
    vals = [lr_multiplier(s, total_steps=100, warmup_steps=4, kind="cosine", min_ratio=0.1) for s in range(5)]
    assert vals[:4] == [0.25, 0.5, 0.75, 1.0]
    assert vals[4] == pytest.approx(1.0)  # first decay step starts at the peak


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_decay_ends_exactly_at_min_ratio(kind: str) -> None:
    total, warm, r = 50, 5, 0.1
    vals = [lr_multiplier(s, total_steps=total, warmup_steps=warm, kind=kind, min_ratio=r)
            for s in range(total)]
    assert vals[-1] == pytest.approx(r, abs=1e-12)
    assert all(a >= b for a, b in zip(vals[warm - 1 :], vals[warm:], strict=False))  # monotone decay
    assert lr_multiplier(total + 10, total_steps=total, warmup_steps=warm, kind=kind, min_ratio=r) == (
        pytest.approx(r)
    )


def test_cosine_shape() -> None:
    v = lr_multiplier(10, total_steps=21, warmup_steps=0, kind="cosine", min_ratio=0.0)
    assert v == pytest.approx(0.5)  # halfway through the decay
    q = lr_multiplier(5, total_steps=21, warmup_steps=0, kind="cosine", min_ratio=0.0)
    assert q == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))


def test_constant_schedule_with_warmup() -> None:
    vals = [lr_multiplier(s, total_steps=10, warmup_steps=2, kind="constant", min_ratio=0.1)
            for s in range(10)]
    assert vals == [0.5] + [1.0] * 9


def test_scheduler_drives_the_optimizer_lr() -> None:
    cfg = tiny_cfg(optimizer="adamw", lr=1e-2, steps=4, warmup_steps=2, schedule="linear", min_lr_ratio=0.0)
    torch.manual_seed(0)
    stepper = BaselineStepper(cfg, build_model("tiny"))
    batches = iter(pattern_batches(8))
    lrs = [stepper.step(batches)["lr"] for _ in range(4)]
    # the peak at the last warmup step and at the first decay step, min_ratio (0) at the last step
    assert lrs == pytest.approx([5e-3, 1e-2, 1e-2, 0.0])


# ------------------------------------------------------------------------------------------------------
# routing and construction
# ------------------------------------------------------------------------------------------------------


def test_muon_routing_and_explicit_hyperparameters() -> None:
    model = build_model("tiny")
    cfg = tiny_cfg(optimizer="muon", weight_decay=0.05)
    (l1, muon), (l2, adamw) = build_baseline_optimizers(cfg, model)
    assert (l1, l2) == ("muon", "adamw") and isinstance(muon, torch.optim.Muon)
    hidden, rest = route_hidden_matrices(model)
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    adam_names = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert muon_names == {n for n, _ in hidden}
    assert adam_names == {n for n, _ in rest}
    assert {"tok_emb.weight", "lm_head.weight", "norm.weight"} <= adam_names
    assert all(".attn.w" in n or ".mlp.w" in n for n in muon_names)
    assert muon.param_groups[0]["weight_decay"] == 0.05  # explicit, not torch's 0.1
    assert muon.param_groups[0]["adjust_lr_fn"] == MUON_ADJUST_LR_FN == "original"
    assert muon.param_groups[0]["lr"] == cfg.lr and adamw.param_groups[0]["lr"] == cfg.adam_lr
    # no decay on norm scales
    for g in adamw.param_groups:
        if any(p.ndim < 2 for p in g["params"]):
            assert g["weight_decay"] == 0.0


def test_shampoo_routes_like_muon_and_soap_takes_everything() -> None:
    model = build_model("tiny")
    labels = [label for label, _ in build_baseline_optimizers(tiny_cfg(optimizer="shampoo"), model)]
    assert labels == ["shampoo", "adamw"]
    ((label, soap),) = build_baseline_optimizers(tiny_cfg(optimizer="soap"), model)
    n_soap = sum(len(g["params"]) for g in soap.param_groups)
    assert label == "soap" and n_soap == len(list(model.parameters()))


def test_soap_precondition_frequency_sets_when_the_eigenbasis_is_refreshed() -> None:
    """pytorch-optimizer's SOAP skips its first step (it only builds the preconditioner) and refreshes its
    eigenbasis after every ``precondition_frequency``-th update: with 1 the run equals the default (10) for
    two steps, then the third step, taken in the refreshed basis, differs."""
    torch.manual_seed(0)
    init = build_model("tiny").state_dict()
    data = pattern_batches(2, seed=1)
    params = {}
    for freq in (10, 1):
        model = build_model("tiny")
        model.load_state_dict(init)
        cfg = tiny_cfg(optimizer="soap", soap_precondition_frequency=freq)
        stepper = build_stepper(cfg, model)
        assert isinstance(stepper, BaselineStepper)
        assert stepper.optimizers[0].param_groups[0]["precondition_frequency"] == freq
        params[freq] = []
        for _ in range(3):
            stepper.step(iter(data))
            params[freq].append([p.detach().clone() for p in model.parameters()])
    for k in (0, 1):
        assert all(torch.equal(a, b) for a, b in zip(params[10][k], params[1][k], strict=True)), k
    assert not all(torch.equal(a, b) for a, b in zip(params[10][2], params[1][2], strict=True))


def test_soap_precondition_frequency_is_validated_and_keeps_old_fingerprints() -> None:
    cfg = tiny_cfg(optimizer="soap")
    assert cfg.soap_precondition_frequency == 10
    assert "soap_precondition_frequency" not in fingerprint_fields(cfg)  # runs recorded before it existed
    assert fingerprint(dataclasses.replace(cfg, soap_precondition_frequency=1)) != fingerprint(cfg)
    with pytest.raises(GnoptError, match="soap_precondition_frequency must be a positive integer"):
        tiny_cfg(optimizer="soap", soap_precondition_frequency=0)


# ------------------------------------------------------------------------------------------------------
# gradient accumulation
# ------------------------------------------------------------------------------------------------------


def test_accumulation_equals_one_big_batch() -> None:
    torch.manual_seed(0)
    model = build_model("tiny")
    (x, y), = pattern_batches(1, batch=8, seed=3)
    big_loss = accumulate_gradients(model, iter([(x, y)]), 1)
    big = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    micro = [(x[i : i + 2], y[i : i + 2]) for i in range(0, 8, 2)]
    small_loss = accumulate_gradients(model, iter(micro), 4)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, big[n], atol=1e-6, rtol=1e-5, msg=n)
    assert float(small_loss) == pytest.approx(float(big_loss), abs=1e-6)


# ------------------------------------------------------------------------------------------------------
# every baseline learns; state survives weights_only
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["adamw", "muon", "soap", "shampoo"])
def test_baseline_lowers_the_loss_and_state_is_weights_only(name: str) -> None:
    torch.manual_seed(0)
    model = build_model("tiny")
    cfg = tiny_cfg(optimizer=name, steps=8)
    stepper = build_stepper(cfg, model)
    data = pattern_batches(2, seed=1)
    with torch.no_grad():
        before = float(sum(lm_loss(model(x), y) for x, y in data)) / len(data)
    for _ in range(cfg.steps):
        out = stepper.step(iter(data))
        assert out["passes"] == 2 and out["ls_tokens"] == 0 and out["train_tokens"] == 2 * 4 * SEQ
    with torch.no_grad():
        after = float(sum(lm_loss(model(x), y) for x, y in data)) / len(data)
    assert after < before - 0.3, (name, before, after)

    buf = io.BytesIO()
    torch.save(stepper.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = build_stepper(cfg, build_model("tiny"))
    fresh.load_state_dict(state)


def test_nonfinite_gradient_skips_the_step() -> None:
    torch.manual_seed(0)
    model = build_model("tiny")
    stepper = BaselineStepper(tiny_cfg(optimizer="adamw"), model)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = stepper.step(iter(pattern_batches(2)))
    assert out["skipped"] == 1 and not math.isfinite(out["grad_norm"])
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=0, equal_nan=True, msg=n)
    assert all(p.grad is None for p in model.parameters())
