"""``TrainConfig``: every knob of a training run, its defaults, TOML loading and validation.

The config is *flat* on purpose: one name per knob, the same in the dataclass, in a TOML file
(``batch_tokens = 65536``) and on the command line (``--batch-tokens 65536``). Flags override the file,
the file overrides the defaults.

A config goes through two stages before any work starts:

1. :func:`config_from_mapping` — type-checks raw values (from TOML or argparse) and rejects unknown keys
   with the key's name (and the closest valid one).
2. :func:`resolve` — validates every field (one :class:`~gnopt.errors.GnoptError` naming the field and the
   allowed range) and fills the defaults that depend on other fields: the tokenizer and vocabulary from the
   preset, the sequence length, per-optimizer learning rates, the warmup length, ``ls_batches``.

The resolved config is what is printed, written to ``config.json`` and fingerprinted for ``--resume``.
Validation lives here, not in the training loop, so a bad value is reported before a corpus is tokenized or
an output directory touched.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from gnopt.errors import GnoptError
from gnopt.optim.line_search import LS_KINDS, LS_SOURCES, LineSearch  # torch-free: the library's own
from gnopt.optim.ns_precision import NS_PRECISIONS, TORCH_NS_PRECISION
from gnopt.optim.schedules import INNER_SCHEDULE_KINDS
from gnopt.precision import PRECISIONS, default_muon_ns_precision
from gnopt.run_folder import recorded_config

#: Baselines built by :mod:`gnopt.baselines`.
BASELINE_OPTIMIZERS: tuple[str, ...] = ("adamw", "muon", "soap", "shampoo")
#: Gauss-Newton variants built by :mod:`gnopt.gn_stepper`.
GN_OPTIMIZERS: tuple[str, ...] = ("gn", "gn-prox-linear", "gn-layerwise")
OPTIMIZERS: tuple[str, ...] = BASELINE_OPTIMIZERS + GN_OPTIMIZERS

TOKENIZERS: tuple[str, ...] = ("bpe", "bytes")
SCHEDULES: tuple[str, ...] = ("cosine", "linear", "constant")
DEVICES: tuple[str, ...] = ("cpu", "cuda", "auto")
#: The harness's inner-optimizer names (built by :func:`gnopt.gn_stepper.build_inner`).
INNER_OPTIMIZERS: tuple[str, ...] = ("muon", "adamw", "soap", "shampoo", "cg")
#: The option lists the library and :mod:`gnopt.precision` own (imported, never copied; the library's
#: ``line_search`` and ``schedules`` modules import without torch): ``PRECISIONS`` (fp32, bf16-mixed),
#: GN inner schedules, line-search kinds and sources.
GN_SCHEDULES: tuple[str, ...] = INNER_SCHEDULE_KINDS

#: Peak learning rates used when ``lr`` / ``adam_lr`` are not given: ``(lr, adam_lr)``. ``lr`` is the
#: learning rate of the optimizer's main group (for muon / shampoo / GN: the hidden 2-D matrices), and
#: ``adam_lr`` the one of the AdamW group that takes embeddings, head and norm scales (``None``: the
#: optimizer has no such group). Anchored on the CPU pilot (docs/method.md, the pilot section):
#: AdamW 3e-3 was its best (1e-2 diverged), Muon 0.02-0.1 bracketed the optimum, the GN inner Muon was
#: stable at 0.01 and diverged at 0.03.
DEFAULT_LRS: dict[str, tuple[float, float | None]] = {
    "adamw": (3e-3, None),
    "muon": (0.02, 3e-3),
    "soap": (3e-3, None),
    "shampoo": (1e-3, 3e-3),
    "gn": (0.01, 1e-3),
    "gn-prox-linear": (0.01, 1e-3),
    "gn-layerwise": (0.01, 1e-3),
}

#: Default ``lr`` of GN inner optimizers that have one group for every parameter (``adam_lr`` is unused).
GN_SINGLE_GROUP_INNER_LRS: dict[str, float] = {"adamw": 1e-3, "soap": 3e-3, "shampoo": 1e-3}

#: Fields that control *how* a run executes but not *what* it computes. They are left out of the
#: fingerprint, so a run may be resumed with another thread count, device, output path or cadence.
RUN_CONTROL_FIELDS: frozenset[str] = frozenset(
    {"out", "threads", "device", "quiet", "stop_after", "stop_at_loss", "eval_every", "ckpt_every",
     "cache_dir", "dist_timeout", "compile"}
)

#: Fields added after runs were already recorded, with the value those runs used. At that value a field is
#: left out of the fingerprint (and an old run's missing key reads as that value), so the runs recorded
#: before the field existed keep their fingerprint and can still be resumed and skipped by a study.
ADDED_FIELDS: dict[str, Any] = {
    "precision": "fp32",
    "max_tokens": None,
    # GN's fast path: an older run read the paper's line search and warm start (so resuming it under the new
    # defaults is reported as a change; `--ls-kind grid --no-warm-scale` resumes it as it was).
    "ls_kind": "grid",
    "ls_fraction": 0.125,
    "warm_scale": False,
    "soap_precondition_frequency": 10,
    "muon_ns_precision": TORCH_NS_PRECISION,  # every Muon ran torch.optim.Muon's bf16 Newton-Schulz
}
#: Added fields that only some runs use: a run that does not use one resolves it to ``None`` and computes
#: what it computed before the field existed, so ``None`` is left out of the fingerprint as well.
ADDED_OPTIONAL_FIELDS: frozenset[str] = frozenset({"muon_ns_precision"})
#: Fields whose default depends on the machine a run starts on (:func:`resolve` fills them from it). A run
#: whose folder already records a config (a resume, a study's rerun) and that leaves such a field unset
#: keeps the value it recorded (``resolve(cfg, recorded=...)``), so it goes on computing what it began
#: computing, on any machine; a recorded config without the key reads as its :data:`ADDED_FIELDS` value.
MACHINE_DEFAULT_FIELDS: tuple[str, ...] = ("muon_ns_precision",)


@dataclass
class TrainConfig:
    """All settings of one training run (see ``gnopt train --help`` for each flag).

    ``None`` means "derive it" (see :func:`resolve`); a resolved config has concrete values everywhere
    except the genuinely optional fields (``data``, ``valid_data``, ``target_loss``, ``reset_below``,
    ``ema_decay``, ``stop_after``, ``stop_at_loss``, ``cache_dir``, ``init_from``, ``adam_lr`` for
    single-group optimizers).
    """

    # --- data --------------------------------------------------------------------------------------
    data: str | None = None  # corpus path; None = the embedded default corpus (Python stdlib sources)
    valid_data: str | None = None  # validation text; None = held out from `data` by the data module
    tokenizer: str | None = None  # bpe | bytes | hf:NAME | tokenizer.json path; None = bytes for presets
    #                               with vocab 256, else bpe
    vocab_size: int | None = None  # None = the preset's (bpe), 256 (bytes), the pretrained tokenizer's
    max_tokens: int | None = None  # stream an hf: dataset up to this many training tokens (None: read it)
    cache_dir: str | None = None  # token-shard cache; None = the data module's default
    # --- model -------------------------------------------------------------------------------------
    preset: str = "cpu-small"
    seq_len: int | None = None  # None = the preset's
    init_from: str | None = None  # checkpoint or run folder whose model weights start the run
    # --- optimizer ---------------------------------------------------------------------------------
    optimizer: str = "muon"
    lr: float | None = None
    adam_lr: float | None = None
    weight_decay: float = 0.0
    warmup_steps: int | None = None  # None = ceil(5% of steps)
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # global-norm clip; 0 disables clipping (the norm is still logged)
    soap_precondition_frequency: int = 10  # SOAP (baseline and GN inner): steps between eigenbasis refreshes
    muon_ns_precision: str | None = None  # Muon's Newton-Schulz precision (baseline and GN inner): bf16 |
    #                                       fp32; None = the machine's default (resolve), None if no Muon
    skip_nonfinite: bool = True
    # --- budget and batches ------------------------------------------------------------------------
    steps: int = 200
    batch_tokens: int | None = None  # None = the multiple of the micro-batch tokens nearest 8192 (>= 1 micro)
    micro_batch_size: int = 16
    # --- evaluation, checkpoints, run control ------------------------------------------------------
    target_loss: float | None = None
    eval_every: int = 50  # 0 = evaluate only at the start and the end
    eval_tokens: int = 32768
    ckpt_every: int = 100  # 0 = checkpoint only at the end
    out: str | None = None  # None = runs/<optimizer>-<preset>
    seed: int = 0
    threads: int | None = None  # None = every core this process may use
    device: str = "auto"
    precision: str = "fp32"  # fp32 | bf16-mixed
    compile: bool = False  # torch.compile the model's training forward (baselines only)
    quiet: bool = False
    stop_after: int | None = None  # stop this invocation after that step (checkpointed; resume later)
    stop_at_loss: float | None = None  # stop after the first evaluation <= this loss (checkpointed)
    dist_timeout: float = 300.0  # seconds a data-parallel collective waits for the other ranks (torchrun)
    # --- Gauss-Newton (consumed by gnopt.gn_stepper) -----------------------------------------------
    inner_steps: int | None = None  # GN's N; None = batch_tokens / micro-batch tokens (else they must agree)
    inner_optimizer: str = "muon"
    gn_schedule: str = "constant_with_inner_cosine"
    ls_kind: str = "model"  # "grid" = the paper's search (ls_range step sizes on N fresh micro-batches)
    ls_range: int = 5
    ls_zero: bool = False
    ls_source: str = "fresh"
    ls_batches: int | None = None  # None = N (grid) or ceil(ls_fraction × N) (model)
    ls_fraction: float = 0.125
    reset_below: float | None = None
    warm_start: bool = True
    warm_scale: bool = False
    damping: float = 0.0
    prox: float = 0.0
    ema_decay: float | None = None
    cg_tol: float = 1e-4
    cg_max_iters: int = 50
    inner_clip: float = 1.0

    # --- derived quantities (valid on a resolved config) -------------------------------------------
    @property
    def micro_batch_tokens(self) -> int:
        """Tokens in one micro-batch: ``micro_batch_size × seq_len``."""
        if self.seq_len is None:
            raise GnoptError("internal: micro_batch_tokens needs a resolved config (seq_len is None).")
        return self.micro_batch_size * self.seq_len

    @property
    def n_micro(self) -> int:
        """Micro-batches per optimizer step (GN: N, the number of inner steps)."""
        if self.batch_tokens is None:
            raise GnoptError("internal: n_micro needs a resolved config (batch_tokens is None).")
        return self.batch_tokens // self.micro_batch_tokens

    @property
    def is_gn(self) -> bool:
        return self.optimizer in GN_OPTIMIZERS

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELD_TYPES: dict[str, str] = {f.name: str(f.type) for f in fields(TrainConfig)}
FIELD_NAMES: tuple[str, ...] = tuple(FIELD_TYPES)


def _base_type(type_str: str) -> tuple[str, bool]:
    """``"int | None"`` -> ``("int", True)``."""
    parts = [p.strip() for p in type_str.split("|")]
    optional = "None" in parts
    base = next(p for p in parts if p != "None")
    return base, optional


def _coerce(name: str, value: Any) -> Any:
    """Check ``value`` against the declared type of field ``name``; ints are accepted for floats."""
    base, optional = _base_type(FIELD_TYPES[name])
    if value is None:
        if optional:
            return None
        raise GnoptError(f"config field {name!r} cannot be empty.")
    if base == "bool":
        if isinstance(value, bool):
            return value
        raise GnoptError(f"config field {name!r} must be true or false, got {value!r}.")
    if base == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise GnoptError(f"config field {name!r} must be an integer, got {value!r}.")
    if base == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise GnoptError(f"config field {name!r} must be a number, got {value!r}.")
    if base == "str":
        if isinstance(value, str):
            return value
        raise GnoptError(f"config field {name!r} must be a string, got {value!r}.")
    raise GnoptError(f"internal: unsupported field type {base!r} for {name!r}.")  # pragma: no cover


def unknown_key_error(key: str, where: str) -> GnoptError:
    """An error for an unknown config key, with the closest valid key as a hint."""
    close = difflib.get_close_matches(key.replace("-", "_"), FIELD_NAMES, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return GnoptError(f"unknown config key {key!r} in {where}{hint}; valid keys: {', '.join(FIELD_NAMES)}.")


def config_from_mapping(values: Mapping[str, Any], *, base: TrainConfig | None = None,
                        where: str = "the config") -> TrainConfig:
    """A new config: ``base`` (default: the defaults) with ``values`` applied, each type-checked."""
    cfg = dataclasses.replace(base) if base is not None else TrainConfig()
    for key, value in values.items():
        if key not in FIELD_TYPES:
            raise unknown_key_error(key, where)
        setattr(cfg, key, _coerce(key, value))
    return cfg


def read_toml_file(path: str | os.PathLike[str], what: str = "config file") -> dict[str, Any]:
    """Parse a TOML file; a missing, non-UTF-8 or invalid file is a :class:`GnoptError` naming ``what``."""
    p = Path(path)
    if not p.is_file():
        raise GnoptError(f"{what} {str(p)!r} does not exist.")
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise GnoptError(f"{what} {str(p)!r} is not valid TOML: {exc}.") from None
    except UnicodeDecodeError:
        raise GnoptError(f"{what} {str(p)!r} is not UTF-8 text.") from None


def load_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a flat TOML config file (``key = value`` lines; a ``[train]`` table is accepted too)."""
    p = Path(path)
    raw = read_toml_file(p)
    if set(raw) == {"train"} and isinstance(raw["train"], dict):
        raw = raw["train"]
    for key, value in raw.items():
        if isinstance(value, dict):
            raise GnoptError(f"config file {str(p)!r}: unexpected table [{key}]; the config is flat.")
    # TOML keys may use dashes like the flags do.
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in FIELD_TYPES:
            raise unknown_key_error(key, f"config file {str(p)!r}")
        out[name] = value
    return out


# ------------------------------------------------------------------------------------------------------
# validation and resolution
# ------------------------------------------------------------------------------------------------------


def _choice(name: str, value: str, choices: tuple[str, ...], what: str | None = None) -> None:
    if value not in choices:
        raise GnoptError(f"unknown {what or name} {value!r}; valid {what or name}s: {', '.join(choices)}.")


def _positive(name: str, value: float | int | None, *, allow_zero: bool = False) -> None:
    if value is None:
        return
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = "non-negative" if allow_zero else "positive"
        raise GnoptError(f"{name} must be {bound} and finite, got {value!r}.")


def _in_range(name: str, value: float | None, lo: float, hi: float, *, hi_open: bool = False) -> None:
    if value is None:
        return
    ok = math.isfinite(value) and lo <= value and (value < hi if hi_open else value <= hi)
    if not ok:
        bracket = ")" if hi_open else "]"
        raise GnoptError(f"{name} must lie in [{lo}, {hi}{bracket}, got {value!r}.")


def _preset_table() -> dict[str, Any]:
    from gnopt.model import PRESETS  # local: keeps `import gnopt.config` light

    return PRESETS


def resolve(cfg: TrainConfig, recorded: Mapping[str, Any] | None = None) -> TrainConfig:
    """Validate ``cfg`` and return a copy with every derived default filled in.

    Raises :class:`GnoptError` naming the first invalid field. Paths are made absolute so that the
    fingerprint does not depend on the working directory. ``recorded`` is the config a run folder already
    holds (``config.json``'s ``"config"``, :func:`gnopt.train.recorded_config`): the
    :data:`MACHINE_DEFAULT_FIELDS` that ``cfg`` leaves unset take their value from it, not from this machine.
    """
    presets = _preset_table()
    _choice("optimizer", cfg.optimizer, OPTIMIZERS)
    _choice("preset", cfg.preset, tuple(presets))
    _choice("schedule", cfg.schedule, SCHEDULES)
    _choice("device", cfg.device, DEVICES)
    _choice("precision", cfg.precision, tuple(PRECISIONS))
    if cfg.compile and cfg.optimizer in GN_OPTIMIZERS:
        raise GnoptError(
            f"--compile works with the baseline optimizers ({', '.join(BASELINE_OPTIMIZERS)}) only: a "
            "compiled model does not carry Gauss-Newton's forward-mode (dual-tensor) tangents, so its "
            f"products would be wrong; drop --compile for --optimizer {cfg.optimizer}."
        )
    _choice("inner_optimizer", cfg.inner_optimizer, INNER_OPTIMIZERS, "inner optimizer")
    _choice("gn_schedule", cfg.gn_schedule, GN_SCHEDULES, "GN schedule")
    _choice("ls_source", cfg.ls_source, LS_SOURCES, "line-search source")
    _choice("ls_kind", cfg.ls_kind, LS_KINDS, "line-search kind")
    r = dataclasses.replace(cfg)
    preset = presets[r.preset]
    if r.tokenizer is not None and r.tokenizer not in TOKENIZERS:  # a pretrained tokenizer
        if r.tokenizer.startswith("hf:"):
            if not r.tokenizer[3:].strip():
                raise GnoptError("bad tokenizer 'hf:'; expected hf:NAME, e.g. hf:google-t5/t5-base.")
        else:
            p = Path(os.path.expanduser(r.tokenizer))
            if not (p.is_file() or (p / "tokenizer.json").is_file()):
                raise GnoptError(
                    f"unknown tokenizer {r.tokenizer!r}: not {', '.join(TOKENIZERS)}, hf:NAME or an existing "
                    "tokenizer.json file."
                )
            r.tokenizer = os.path.abspath(p)
        if r.vocab_size is not None:
            raise GnoptError(
                f"vocab_size={r.vocab_size} cannot be combined with the pretrained tokenizer {r.tokenizer}: "
                "its vocabulary is the tokenizer's own."
            )
    elif r.tokenizer is None:
        r.tokenizer = "bytes" if (r.vocab_size or preset.vocab_size) <= 256 else "bpe"
    if r.tokenizer not in TOKENIZERS:
        pass  # pretrained: vocab_size stays None (the tokenizer's, known once it is loaded)
    elif r.tokenizer == "bytes":
        if r.vocab_size not in (None, 256):
            raise GnoptError(
                f"the bytes tokenizer has a fixed vocabulary of 256; got vocab_size={r.vocab_size}."
            )
        r.vocab_size = 256
    else:
        if r.vocab_size is None:
            r.vocab_size = preset.vocab_size
        if not 257 <= r.vocab_size <= 65536:
            raise GnoptError(
                f"vocab_size for the bpe tokenizer must lie in [257, 65536] (tokens are stored as uint16), "
                f"got {r.vocab_size}."
            )
    if r.seq_len is None:
        r.seq_len = preset.seq_len
    for name in ("seq_len", "micro_batch_size"):  # needed by the batch_tokens default below
        if getattr(r, name) < 1:
            raise GnoptError(f"{name} must be a positive integer, got {getattr(r, name)}.")
    micro = r.micro_batch_size * r.seq_len
    if r.inner_steps is not None:
        if r.inner_steps < 1:
            raise GnoptError(f"inner_steps must be a positive integer, got {r.inner_steps}.")
        if r.batch_tokens is None:
            r.batch_tokens = r.inner_steps * micro
        elif r.batch_tokens != r.inner_steps * micro:
            raise GnoptError(
                f"inner_steps={r.inner_steps} and batch_tokens={r.batch_tokens} disagree: GN's batch is "
                f"inner_steps × micro-batch tokens = {r.inner_steps} × {micro}; give only one of them."
            )
    if r.batch_tokens is None:
        r.batch_tokens = max(1, round(8192 / micro)) * micro
    for name in ("seq_len", "steps", "batch_tokens", "micro_batch_size", "eval_tokens", "ls_range",
                 "cg_max_iters"):
        value = getattr(r, name)
        if value < 1:
            raise GnoptError(f"{name} must be a positive integer, got {value}.")
    if r.max_tokens is not None and r.max_tokens < 1:
        raise GnoptError(f"max_tokens must be a positive integer, got {r.max_tokens}.")
    if r.max_tokens is not None and not (r.data or "").startswith("hf:"):
        raise GnoptError(
            f"max_tokens streams a Hugging Face dataset: data must be hf:NAME[:CONFIG][:SPLIT] (hf:PATH for "
            f"a local file), got {r.data!r}."
        )
    if r.soap_precondition_frequency < 1:
        raise GnoptError("soap_precondition_frequency must be a positive integer (steps between refreshes "
                         f"of SOAP's eigenbasis), got {r.soap_precondition_frequency}.")
    if r.muon_ns_precision is not None:
        _choice("muon_ns_precision", r.muon_ns_precision, tuple(NS_PRECISIONS),
                "Muon Newton-Schulz precision")
    if not uses_muon(r):
        r.muon_ns_precision = None  # no Newton-Schulz runs: the run computes the same whatever was given
    elif r.muon_ns_precision is None:
        kept = _recorded_default(recorded, "muon_ns_precision")
        r.muon_ns_precision = kept if kept in NS_PRECISIONS else default_muon_ns_precision(r.device)
    if r.ls_batches is not None and r.ls_batches < 1:
        raise GnoptError(f"ls_batches must be a positive integer, got {r.ls_batches}.")
    for name in ("eval_every", "ckpt_every", "seed"):
        if getattr(r, name) < 0:
            raise GnoptError(f"{name} must be >= 0, got {getattr(r, name)}.")
    if r.threads is not None and r.threads < 1:
        raise GnoptError(f"threads must be >= 1, got {r.threads}.")
    _positive("dist_timeout", r.dist_timeout)
    if r.stop_after is not None and not 1 <= r.stop_after <= r.steps:
        raise GnoptError(f"stop_after must lie in [1, steps={r.steps}], got {r.stop_after}.")
    if r.stop_at_loss is not None and not (math.isfinite(r.stop_at_loss) and r.stop_at_loss > 0):
        raise GnoptError(f"stop_at_loss must be a positive finite validation loss, got {r.stop_at_loss}.")

    micro_tokens = r.micro_batch_size * r.seq_len
    if r.batch_tokens % micro_tokens != 0:
        raise GnoptError(
            f"batch_tokens={r.batch_tokens} is not a multiple of the micro-batch tokens "
            f"micro_batch_size × seq_len = {r.micro_batch_size} × {r.seq_len} = {micro_tokens}."
        )
    if r.eval_tokens < r.seq_len:
        raise GnoptError(f"eval_tokens={r.eval_tokens} is smaller than one sequence (seq_len={r.seq_len}).")

    default_lr, default_adam_lr = DEFAULT_LRS[r.optimizer]
    if r.optimizer in GN_OPTIMIZERS and r.inner_optimizer in GN_SINGLE_GROUP_INNER_LRS:
        # One learning rate for every parameter: the inner optimizer's own scale, not Muon's.
        default_lr, default_adam_lr = GN_SINGLE_GROUP_INNER_LRS[r.inner_optimizer], None
    if r.lr is None:
        r.lr = default_lr
    if r.adam_lr is None:
        r.adam_lr = default_adam_lr
    _positive("lr", r.lr)
    _positive("adam_lr", r.adam_lr)
    _positive("weight_decay", r.weight_decay, allow_zero=True)
    _in_range("min_lr_ratio", r.min_lr_ratio, 0.0, 1.0)
    _positive("grad_clip", r.grad_clip, allow_zero=True)
    _positive("target_loss", r.target_loss)
    if r.warmup_steps is None:
        r.warmup_steps = math.ceil(0.05 * r.steps)
    if not 0 <= r.warmup_steps <= r.steps:
        raise GnoptError(f"warmup_steps must lie in [0, steps={r.steps}], got {r.warmup_steps}.")

    # Gauss-Newton knobs: validated for every optimizer so a typo in a shared config file shows early.
    if not (math.isfinite(r.ls_fraction) and 0.0 < r.ls_fraction <= 1.0):
        raise GnoptError(f"ls_fraction must lie in (0, 1], got {r.ls_fraction!r}.")
    if r.ls_batches is None:  # the library's rule: N for the grid, ⌈ls_fraction·N⌉ for the model search
        fraction = r.ls_fraction if r.ls_kind == "model" else None  # ls_fraction is the model search's
        n = r.batch_tokens // micro_tokens
        r.ls_batches = LineSearch(kind=r.ls_kind, fraction=fraction).batches_for(n)
    _in_range("reset_below", r.reset_below, 0.0, 1.0)
    _positive("damping", r.damping, allow_zero=True)
    _positive("prox", r.prox, allow_zero=True)
    _in_range("ema_decay", r.ema_decay, 0.0, 1.0, hi_open=True)
    _positive("cg_tol", r.cg_tol)
    _positive("inner_clip", r.inner_clip, allow_zero=True)

    for name in ("data", "valid_data", "cache_dir", "init_from"):
        value = getattr(r, name)
        if value is not None:
            if not value.strip():
                raise GnoptError(f"{name} is an empty path.")
            # hf:NAME[:CONFIG][:SPLIT] data specs are not paths
            if name == "init_from" or not value.startswith("hf:"):
                # abspath (not Path.absolute) also folds "..", so equal paths compare equal
                setattr(r, name, os.path.abspath(os.path.expanduser(value)))
    if r.out is None:
        r.out = str(Path("runs") / f"{r.optimizer}-{r.preset}")
    if not r.out.strip():
        raise GnoptError("out is an empty path.")
    return r


# ------------------------------------------------------------------------------------------------------
# fingerprint (resume compatibility) and printing
# ------------------------------------------------------------------------------------------------------


def uses_muon(cfg: TrainConfig) -> bool:
    """Whether the run steps with Muon: the ``muon`` baseline, or GN with the inner ``muon``."""
    return cfg.optimizer == "muon" or (cfg.optimizer in GN_OPTIMIZERS and cfg.inner_optimizer == "muon")


def resolve_in_folder(cfg: TrainConfig, *, overwrite: bool = False) -> TrainConfig:
    """:func:`resolve` for a run about to use its folder ``out``: the machine-dependent defaults it leaves
    unset are the ones the folder records (:data:`MACHINE_DEFAULT_FIELDS`), unless ``overwrite`` (a new run
    in that folder) or the folder records none. ``gnopt train`` and the study resolve every run this way."""
    resolved = resolve(cfg)
    recorded = None if overwrite else recorded_config(resolved.out or "")
    return resolved if recorded is None else resolve(cfg, recorded)


def _recorded_default(recorded: Mapping[str, Any] | None, name: str) -> Any:
    """A :data:`MACHINE_DEFAULT_FIELDS` value as ``recorded`` holds it (a missing key: the value runs had
    before the field existed); None without a recorded config, or where the recorded run used no Muon."""
    if recorded is None:
        return None
    return recorded.get(name, ADDED_FIELDS[name])


def _defining(fields: Mapping[str, Any]) -> dict[str, Any]:
    """``fields`` without what defines nothing: run-control fields, added fields at the value runs had
    before they existed, and added optional fields a run does not use (``None``)."""
    return {
        k: v for k, v in fields.items()
        if k not in RUN_CONTROL_FIELDS and not (k in ADDED_FIELDS and v == ADDED_FIELDS[k])
        and not (k in ADDED_OPTIONAL_FIELDS and v is None)
    }


def fingerprint_fields(cfg: TrainConfig) -> dict[str, Any]:
    """The fields that define what a run computes (everything but :data:`RUN_CONTROL_FIELDS`)."""
    return _defining(cfg.to_dict())


def fingerprint(cfg: TrainConfig) -> str:
    """A short stable hash of :func:`fingerprint_fields` (stored in checkpoints and ``config.json``)."""
    blob = json.dumps(fingerprint_fields(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def fingerprint_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Human-readable ``field: old -> new`` lines for the fingerprint fields that differ. Either side may be
    a recorded config or :func:`fingerprint_fields`: both are read the way the fingerprint reads them."""
    old, new = _defining(old), _defining(new)
    lines = []
    for key in sorted(set(old) | set(new)):
        a = old.get(key, ADDED_FIELDS.get(key, "<absent>"))
        b = new.get(key, ADDED_FIELDS.get(key, "<absent>"))
        if a != b:
            lines.append(f"{key}: {a!r} -> {b!r}")
    return lines


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    return repr(value)


def to_toml(cfg: TrainConfig) -> str:
    """The config as flat TOML (unset fields as comments), loadable again with ``--config``."""
    lines = []
    for key, value in cfg.to_dict().items():
        if value is None:
            lines.append(f"# {key} = (unset)")
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"
