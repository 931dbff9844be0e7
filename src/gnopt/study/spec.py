"""The experiment file of ``gnopt study``: TOML schema, validation, and the plan of runs it declares.

An experiment file has four parts (``experiments/smoke.toml`` is a complete small example)::

    [experiment]
    name = "smoke"                    # names the default output folder (runs/study-<name>)
    description = "..."
    batch_tokens = [512, 2048]        # the batch grid, in tokens per optimizer (GN: outer) step
    budget_tokens = 65536             # training tokens per run: steps = ceil(budget_tokens / batch_tokens)
    # steps = { 512 = 128, 2048 = 32 }   # ... or a step budget per batch size instead
    target_loss = "auto"              # a validation loss, or "auto" (see below)
    target_fraction = 0.667           # "auto": where in the budget the best baseline reaches the target
    evals_per_run = 16                # eval_every = ceil(steps / evals_per_run); or eval_every = N
    warmup_fraction = 0.05            # the shared warm start: 5% of the budget at the largest batch
    seeds = [0, 1, 2]                 # optional: re-run each method's best setting at the largest batch
                                      # with data seeds 1 and 2 (the first entry is [base] seed)
    seed_batch_tokens = 2048          # optional: the batch of the seed runs (default: the largest)
    stop_at_target = false            # optional: stop runs at the target (see below)

    [base]                            # TrainConfig keys shared by every run (and the warm-up)
    preset = "tiny"
    tokenizer = "bytes"
    micro_batch_size = 8
    eval_tokens = 4096
    seed = 0

    [warmup]                          # the shared AdamW warm start (TrainConfig keys)
    lr = 3e-3
    batch_tokens = 512                # default: the smallest batch of the grid

    [methods.adamw]                   # one table per method; the name is the method's label
    lr = [1e-3, 3e-3]                 # the learning-rate grid (required)
    [methods.gn-adamw-inner]
    optimizer = "gn"                  # default: the table's name, when that is an optimizer
    inner_optimizer = "adamw"         # any other TrainConfig key: fixed for every run of the method
    lr = [1e-3, 3e-3]
    adam_lr = 1e-3                    # a number (fixed) or a list (a grid: the product with lr)
    batch_tokens = [2048]             # optional: run this method at these batch sizes of the grid only
    [methods.muon]
    lr = { 512 = [0.01, 0.02], 2048 = [0.02, 0.04] }   # or one learning-rate grid per batch size

Rules the validation enforces, each with a :class:`~gnopt.errors.GnoptError` naming the file and key:

* keys that define *what is compared* are shared: data, tokenizer, vocabulary, preset, sequence length,
  micro-batch size, evaluation set, seed and device live in ``[base]`` only; the study sets ``optimizer``,
  ``lr``, ``adam_lr``, ``batch_tokens`` (and so GN's ``inner_steps``), ``steps``, ``eval_every``,
  ``init_from`` and ``out`` itself;
* at every batch size, every baseline's tuning grid is at least as large as the largest GN grid there (the
  paper's protocol: the baselines get at least GN's tuning budget);
* every run's config passes :func:`gnopt.config.resolve` (so a bad value is reported before anything runs).

``target_loss = "auto"`` is resolved when the results are analysed (:mod:`gnopt.study.analysis`): it is the
lowest validation loss that any baseline run at the largest batch has at ``target_fraction`` of its step
budget, i.e. the loss that the best baseline reaches at about two thirds of its budget there. It depends on
the baselines only, never on GN. Runs do not get ``target_loss`` in their config: steps-to-target is
computed from ``metrics.jsonl``, so the target can change without re-running anything.

Paths in the file (``data``, ``valid_data``, ``cache_dir``, a ``tokenizer`` file) are relative to the
experiment file's folder.
The warm-up run uses the data seed ``max(seed, *seeds) + 1`` (unless ``[warmup]`` sets ``seed``, which may
not be a run seed) so that the runs that start from it do not see its batches again.

**Seeds.** ``seeds = [s0, s1, ...]`` (``s0`` = ``[base]`` seed) declares seed runs: once the sweep is done,
the best setting of every method at the largest batch (chosen as the report chooses it, at seed ``s0``) is
re-run with each other seed, from the same shared warm start (:func:`plan_seed_runs`). The seed is the
run's data seed: it changes the order of the training batches and the micro-batches GN's line search
draws; the model starts from the warm start's weights in every seed. The report gives each method's
steps, passes and wall time to target per seed and each headline ratio as the median and range over seeds.
``seed_batch_tokens`` moves the seed runs to another batch of the grid (default: the largest), e.g. where the
largest is too expensive to repeat.

**Stopping at the target** (``stop_at_target = true``): a run that has reached the target has measured what
the study compares (steps, tokens, passes and wall time to target); the rest of its budget only buys its final
loss. With this option the study first runs the runs that set an ``"auto"`` target (every baseline's sweep at
the largest batch: they always run to the end), then starts every other run with ``stop_at_loss`` = the
target, so it stops (with a checkpoint) after its first evaluation at or below it. With ``--jobs`` above 1 no
such run starts while a run that sets the target is still in flight (started then, it would run unstopped to
its end): the free slots wait for the target. A stopped run's steps to target are those of the full run (its
schedule is the full budget's: stopping does not change any step it took); its "final" loss is its loss where
it stopped. If the target later moves lower (a wider grid at the largest batch), the study resumes those runs
from their checkpoints until they reach the new one. ``stop_at_loss`` is a run-control field: it is not part
of a run's fingerprint.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gnopt.config import (
    BASELINE_OPTIMIZERS,
    FIELD_TYPES,
    GN_OPTIMIZERS,
    OPTIMIZERS,
    TrainConfig,
    config_from_mapping,
    read_toml_file,
    resolve_in_folder,
)
from gnopt.errors import GnoptError

#: Fields every run must share (they define the data, the model and the evaluation): ``[base]`` only.
SHARED_FIELDS: frozenset[str] = frozenset(
    {"data", "valid_data", "tokenizer", "vocab_size", "max_tokens", "cache_dir", "preset", "seq_len",
     "micro_batch_size", "eval_tokens", "seed", "device"}
)
#: Fields the study sets for every run; they may not appear in ``[base]``, ``[warmup]`` or a method table
#: (``lr`` and ``adam_lr`` are the method's grid, ``batch_tokens`` the warm-up's batch).
STUDY_FIELDS: frozenset[str] = frozenset(
    {"optimizer", "lr", "adam_lr", "batch_tokens", "inner_steps", "steps", "eval_every", "init_from", "out",
     "target_loss", "stop_after", "quiet"}
)
#: Keys of the ``[experiment]`` table.
EXPERIMENT_KEYS: tuple[str, ...] = (
    "name", "description", "batch_tokens", "budget_tokens", "steps", "target_loss", "target_fraction",
    "evals_per_run", "eval_every", "warmup_fraction", "seeds", "seed_batch_tokens", "stop_at_target",
)
#: Keys of a method table besides TrainConfig fields.
METHOD_KEYS: tuple[str, ...] = ("optimizer", "lr", "adam_lr", "budget_tokens", "steps", "batch_tokens")
#: Keys of the ``[warmup]`` table besides TrainConfig fields.
WARMUP_KEYS: tuple[str, ...] = ("optimizer", "lr", "adam_lr", "batch_tokens", "steps")

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


# ------------------------------------------------------------------------------------------------------
# data classes
# ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """How many optimizer steps a run gets at a batch size: a token budget or an explicit step table."""

    tokens: int | None = None
    steps: Mapping[int, int] | None = None

    def steps_for(self, batch_tokens: int) -> int:
        """Steps at ``batch_tokens``: ``ceil(tokens / batch_tokens)`` or the table's entry."""
        if self.steps is not None:
            return int(self.steps[batch_tokens])
        assert self.tokens is not None
        return max(1, math.ceil(self.tokens / batch_tokens))

    def describe(self) -> str:
        if self.steps is not None:
            return "steps " + ", ".join(f"B={b}: {s}" for b, s in sorted(self.steps.items()))
        return f"{self.tokens:,} training tokens per run"


@dataclass(frozen=True)
class MethodSpec:
    """One method of the study: an optimizer, fixed overrides and a learning-rate grid."""

    name: str
    optimizer: str
    lr: tuple[float, ...]  # the learning rates swept (with ``lr_by_batch``: every batch size's, in order)
    adam_lr: tuple[float | None, ...] = (None,)
    overrides: Mapping[str, Any] = field(default_factory=dict)
    budget: Budget | None = None  # None: the experiment's budget
    batch_tokens: tuple[int, ...] | None = None  # None: the experiment's whole grid; else a subset of it
    lr_by_batch: Mapping[int, tuple[float, ...]] | None = None  # one lr grid per batch size (else ``lr``)

    @property
    def is_gn(self) -> bool:
        return self.optimizer in GN_OPTIMIZERS

    def lrs_at(self, batch_tokens: int) -> tuple[float, ...]:
        """The learning rates swept at ``batch_tokens``."""
        return self.lr if self.lr_by_batch is None else tuple(self.lr_by_batch[batch_tokens])

    def grid_at(self, batch_tokens: int) -> list[tuple[float, float | None]]:
        """The (lr, adam_lr) settings swept at ``batch_tokens``."""
        return [(lr, alr) for lr in self.lrs_at(batch_tokens) for alr in self.adam_lr]

    @property
    def grid(self) -> list[tuple[float, float | None]]:
        """The (lr, adam_lr) settings swept at every batch size (one lr grid for all batches); with
        ``lr_by_batch``, every (lr, adam_lr) swept at some batch size."""
        return [(lr, alr) for lr in self.lr for alr in self.adam_lr]

    def describe_lr(self) -> str:
        """The lr grid as the report shows it: ``0.001, 0.003`` or ``64K: 0.001, 0.003; 256K: ...``."""
        if self.lr_by_batch is None:
            return ", ".join(f"{x:g}" for x in self.lr)
        return "; ".join(f"{_short_tokens(b)}: " + ", ".join(f"{x:g}" for x in lrs)
                         for b, lrs in sorted(self.lr_by_batch.items()))


@dataclass(frozen=True)
class RunSpec:
    """One training run of the study (``config`` is resolved and has ``out`` and ``init_from`` set)."""

    method: str
    optimizer: str
    batch_tokens: int
    lr: float
    adam_lr: float | None
    steps: int
    rel: str  # output folder relative to the study folder
    config: TrainConfig
    seed: int | None = None  # a seed run (:func:`plan_seed_runs`); None: a run of the sweep ([base] seed)

    @property
    def label(self) -> str:
        alr = f" adam_lr={self.adam_lr:g}" if self.adam_lr is not None else ""
        seed = f" seed={self.seed}" if self.seed is not None else ""
        return f"{self.method} B={self.batch_tokens} lr={self.lr:g}{alr}{seed}"


@dataclass(frozen=True)
class StudySpec:
    """A validated experiment file."""

    path: Path
    name: str
    description: str
    base: Mapping[str, Any]
    batch_tokens: tuple[int, ...]  # ascending
    budget: Budget
    target_loss: float | None  # None: "auto"
    target_fraction: float
    evals_per_run: int | None
    eval_every: int | None
    warmup_fraction: float
    warmup: Mapping[str, Any]
    methods: tuple[MethodSpec, ...]
    seeds: tuple[int, ...] = ()  # [experiment] seeds (the [base] seed first); () = the sweep's seed only
    seed_batch_tokens: int | None = None  # the batch of the seed runs; None: the largest
    stop_at_target: bool = False  # stop runs at the target (module docstring)

    @property
    def largest_batch(self) -> int:
        return self.batch_tokens[-1]

    @property
    def seed_batch(self) -> int:
        """The batch size of the seed runs: ``seed_batch_tokens``, or the largest batch of the grid."""
        return self.seed_batch_tokens or self.largest_batch

    def defines_target(self, run: RunSpec) -> bool:
        """Whether ``run`` is one that an ``"auto"`` target is read from: a baseline's sweep run at the
        largest batch (with ``stop_at_target``, these run first and always to the end)."""
        return (self.target_loss is None and run.seed is None and run.optimizer in BASELINE_OPTIMIZERS
                and run.batch_tokens == self.largest_batch)

    @property
    def base_seed(self) -> int:
        return int(self.base.get("seed", 0))

    @property
    def extra_seeds(self) -> tuple[int, ...]:
        """The seeds whose runs re-run each method's best setting at the largest batch."""
        return tuple(s for s in self.seeds if s != self.base_seed)

    def method(self, name: str) -> MethodSpec:
        for m in self.methods:
            if m.name == name:
                return m
        raise GnoptError(f"experiment {self.name!r} has no method {name!r}; methods: "
                         f"{', '.join(m.name for m in self.methods)}.")

    def budget_of(self, method: MethodSpec) -> Budget:
        return method.budget or self.budget

    def batches_of(self, method: MethodSpec) -> tuple[int, ...]:
        """The batch sizes ``method`` runs at: its own ``batch_tokens`` subset, or the whole grid."""
        return method.batch_tokens or self.batch_tokens

    def eval_every_for(self, steps: int) -> int:
        if self.eval_every is not None:
            return self.eval_every
        assert self.evals_per_run is not None
        return max(1, math.ceil(steps / self.evals_per_run))

    @property
    def reference_budget_tokens(self) -> int:
        """The token budget of one run at the largest batch: what the warm start is measured against."""
        b = self.largest_batch
        return self.budget.steps_for(b) * b

    def warmup_tokens(self) -> int:
        """``warmup_fraction`` × the token budget at the largest batch (the reference budget)."""
        return int(round(self.warmup_fraction * self.reference_budget_tokens))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able description (for ``study.json``)."""
        return {
            "path": str(self.path),
            "name": self.name,
            "description": self.description,
            "base": dict(self.base),
            "batch_tokens": list(self.batch_tokens),
            "budget": {"tokens": self.budget.tokens,
                       "steps": {str(k): v for k, v in (self.budget.steps or {}).items()} or None},
            "target_loss": self.target_loss if self.target_loss is not None else "auto",
            "target_fraction": self.target_fraction,
            "evals_per_run": self.evals_per_run,
            "eval_every": self.eval_every,
            "warmup_fraction": self.warmup_fraction,
            "warmup": dict(self.warmup),
            "seeds": list(self.seeds) or [self.base_seed],
            "seed_batch_tokens": self.seed_batch,
            "stop_at_target": self.stop_at_target,
            "methods": [
                {"name": m.name, "optimizer": m.optimizer,
                 "lr": (list(m.lr) if m.lr_by_batch is None
                        else {str(b): list(v) for b, v in sorted(m.lr_by_batch.items())}),
                 "adam_lr": list(m.adam_lr),
                 "overrides": dict(m.overrides),
                 "budget": None if m.budget is None else {
                     "tokens": m.budget.tokens,
                     "steps": {str(k): v for k, v in (m.budget.steps or {}).items()} or None},
                 "batch_tokens": list(spec_b) if (spec_b := m.batch_tokens) else None}
                for m in self.methods
            ],
        }


# ------------------------------------------------------------------------------------------------------
# parsing helpers
# ------------------------------------------------------------------------------------------------------


def _short_tokens(n: int) -> str:
    return f"{n // 1048576}M" if n % 1048576 == 0 else f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _positive_int(where: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise GnoptError(f"{where} must be a positive integer, got {v!r}.")
    return v


def _fraction(where: str, v: Any, *, open_low: bool = True) -> float:
    ok = _is_number(v) and math.isfinite(v) and (0 < v if open_low else 0 <= v) and v <= 1
    if not ok:
        raise GnoptError(f"{where} must be a number in {'(' if open_low else '['}0, 1], got {v!r}.")
    return float(v)


def _lr_list(where: str, v: Any) -> tuple[float, ...]:
    values = v if isinstance(v, list) else [v]
    if not values:
        raise GnoptError(f"{where} is an empty list; give at least one learning rate.")
    out: list[float] = []
    for x in values:
        if not (_is_number(x) and math.isfinite(x) and x > 0):
            raise GnoptError(f"{where} must hold positive numbers, got {x!r}.")
        out.append(float(x))
    if len(set(out)) != len(out):
        raise GnoptError(f"{where} lists a learning rate twice: {out}.")
    return tuple(out)


def _budget(where: str, table: Mapping[str, Any], batches: Sequence[int] | None,
            *, required: bool) -> Budget | None:
    has_tokens, has_steps = "budget_tokens" in table, "steps" in table
    if has_tokens and has_steps:
        raise GnoptError(f"{where}: give either budget_tokens or steps, not both.")
    if has_tokens:
        return Budget(tokens=_positive_int(f"{where}: budget_tokens", table["budget_tokens"]))
    if has_steps:
        raw = table["steps"]
        if not isinstance(raw, dict):
            raise GnoptError(f"{where}: steps must be a table of batch size = steps, e.g. "
                             "steps = { 512 = 100, 2048 = 25 }.")
        steps: dict[int, int] = {}
        for k, v in raw.items():
            try:
                b = int(k)
            except ValueError:
                raise GnoptError(f"{where}: steps key {k!r} is not a batch size in tokens.") from None
            steps[b] = _positive_int(f"{where}: steps for batch {b}", v)
        if batches is not None:
            missing = sorted(set(batches) - set(steps))
            extra = sorted(set(steps) - set(batches))
            if missing or extra:
                problems = ([f"missing {missing}"] if missing else []) + (
                    [f"not in the grid {extra}"] if extra else [])
                raise GnoptError(
                    f"{where}: steps must name exactly the batch grid {list(batches)}; {'; '.join(problems)}."
                )
        return Budget(steps=steps)
    if required:
        raise GnoptError(f"{where}: give the run length, budget_tokens = N (tokens per run) or a "
                         "steps = { batch = steps, ... } table.")
    return None


def _check_config_keys(where: str, table: Mapping[str, Any], *, extra_allowed: Sequence[str],
                       forbidden: frozenset[str], forbidden_why: str) -> dict[str, Any]:
    """TrainConfig overrides of a table (its keys that are config fields), with dashes normalised."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name in extra_allowed:
            continue
        if name not in FIELD_TYPES:
            import difflib

            close = difflib.get_close_matches(name, list(FIELD_TYPES) + list(extra_allowed), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise GnoptError(f"{where}: unknown key {key!r}{hint}.")
        if name in forbidden:
            raise GnoptError(f"{where}: {key!r} cannot be set here ({forbidden_why}).")
        if isinstance(value, dict):
            raise GnoptError(f"{where}: {key!r} must be a value, not a table.")
        out[name] = value
    return out


def _resolve_paths(values: dict[str, Any], folder: Path) -> dict[str, Any]:
    out = dict(values)
    for name in ("data", "valid_data", "cache_dir", "tokenizer"):
        v = out.get(name)
        if name == "tokenizer" and v in ("bpe", "bytes"):
            continue
        if isinstance(v, str) and v.strip() and not v.startswith("hf:"):
            p = Path(os.path.expanduser(v))
            out[name] = os.path.abspath(p if p.is_absolute() else folder / p)
    return out


# ------------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------------


def load_spec(path: str | os.PathLike[str]) -> StudySpec:
    """Read and validate an experiment file; raises :class:`GnoptError` naming the first problem."""
    p = Path(path)
    return spec_from_mapping(read_toml_file(p, "experiment file"), path=p)


def spec_from_mapping(raw: Mapping[str, Any], *, path: str | os.PathLike[str]) -> StudySpec:
    """Validate the parsed TOML of an experiment file (``path`` names it and anchors relative paths)."""
    p = Path(path).resolve()
    where = f"experiment file {str(path)!r}"
    unknown = sorted(set(raw) - {"experiment", "base", "warmup", "methods"})
    if unknown:
        raise GnoptError(f"{where}: unknown table [{unknown[0]}]; expected [experiment], [base], [warmup] "
                         "and [methods.NAME].")
    for table in ("experiment", "methods"):
        if not isinstance(raw.get(table), dict):
            raise GnoptError(f"{where}: missing the [{table}] table.")
    exp = raw["experiment"]
    for key in exp:
        if key not in EXPERIMENT_KEYS:
            import difflib

            close = difflib.get_close_matches(key, EXPERIMENT_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise GnoptError(f"{where}: unknown key {key!r} in [experiment]{hint}; valid keys: "
                             f"{', '.join(EXPERIMENT_KEYS)}.")

    name = exp.get("name", p.stem)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise GnoptError(f"{where}: [experiment] name must be lower-case letters, digits, '.', '_' or '-', "
                         f"got {name!r}.")
    description = exp.get("description", "")
    if not isinstance(description, str):
        raise GnoptError(f"{where}: [experiment] description must be a string.")

    grid = exp.get("batch_tokens")
    if not isinstance(grid, list) or not grid:
        raise GnoptError(f"{where}: [experiment] batch_tokens must be a non-empty list of batch sizes in "
                         "tokens, e.g. batch_tokens = [4096, 16384, 65536].")
    batches = tuple(sorted(_positive_int(f"{where}: [experiment] batch_tokens entry", b) for b in grid))
    if len(set(batches)) != len(batches):
        raise GnoptError(f"{where}: [experiment] batch_tokens lists a batch size twice: {list(batches)}.")
    budget = _budget(f"{where}: [experiment]", exp, batches, required=True)
    assert budget is not None

    target = exp.get("target_loss", "auto")
    if target == "auto":
        target_loss: float | None = None
    elif _is_number(target) and math.isfinite(target) and target > 0:
        target_loss = float(target)
    else:
        raise GnoptError(f"{where}: [experiment] target_loss must be a positive number or \"auto\", "
                         f"got {target!r}.")
    target_fraction = _fraction(f"{where}: [experiment] target_fraction", exp.get("target_fraction", 2 / 3))
    if "evals_per_run" in exp and "eval_every" in exp:
        raise GnoptError(f"{where}: [experiment] give either evals_per_run or eval_every, not both.")
    evals_per_run = eval_every = None
    if "eval_every" in exp:
        eval_every = _positive_int(f"{where}: [experiment] eval_every", exp["eval_every"])
    else:
        evals_per_run = _positive_int(f"{where}: [experiment] evals_per_run", exp.get("evals_per_run", 20))
    warmup_fraction = _fraction(f"{where}: [experiment] warmup_fraction", exp.get("warmup_fraction", 0.05))
    seeds: tuple[int, ...] = ()
    if "seeds" in exp:
        raw_seeds = exp["seeds"]
        if not isinstance(raw_seeds, list) or not raw_seeds or not all(
                isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in raw_seeds):
            raise GnoptError(f"{where}: [experiment] seeds must be a non-empty list of non-negative integers "
                             f"(data seeds), e.g. seeds = [0, 1, 2], got {raw_seeds!r}.")
        if len(set(raw_seeds)) != len(raw_seeds):
            raise GnoptError(f"{where}: [experiment] seeds lists a seed twice: {raw_seeds}.")
        seeds = tuple(raw_seeds)
    seed_batch: int | None = None
    if "seed_batch_tokens" in exp:
        seed_batch = _positive_int(f"{where}: [experiment] seed_batch_tokens", exp["seed_batch_tokens"])
        if seed_batch not in batches:
            raise GnoptError(f"{where}: [experiment] seed_batch_tokens = {seed_batch} is not in the batch "
                             f"grid {list(batches)}.")
        if not seeds:
            raise GnoptError(f"{where}: [experiment] seed_batch_tokens is set but seeds is not: give the "
                             "seeds of the seed runs, e.g. seeds = [0, 1, 2].")
    stop_at_target = exp.get("stop_at_target", False)
    if not isinstance(stop_at_target, bool):
        raise GnoptError(f"{where}: [experiment] stop_at_target must be true or false, got "
                         f"{stop_at_target!r}.")

    folder = Path(path).parent
    base_raw = raw.get("base", {})
    if not isinstance(base_raw, dict):
        raise GnoptError(f"{where}: [base] must be a table of TrainConfig keys.")
    base = _check_config_keys(f"{where}: [base]", base_raw, extra_allowed=(), forbidden=STUDY_FIELDS,
                              forbidden_why="the study sets it for every run")
    base = _resolve_paths(base, folder)
    base_cfg = config_from_mapping(base, where=f"{where}: [base]")
    if seeds and seeds[0] != base_cfg.seed:
        raise GnoptError(f"{where}: [experiment] seeds must begin with the sweep's seed, [base] seed = "
                         f"{base_cfg.seed} (the other seeds re-run each method's best setting at the largest "
                         f"batch), got {list(seeds)}.")

    warm_raw = raw.get("warmup", {})
    if not isinstance(warm_raw, dict):
        raise GnoptError(f"{where}: [warmup] must be a table.")
    warm_over = _check_config_keys(
        f"{where}: [warmup]", warm_raw, extra_allowed=WARMUP_KEYS,
        forbidden=(SHARED_FIELDS - {"seed"}) | STUDY_FIELDS,
        forbidden_why="it is shared by every run: set it in [base]",
    )
    warmup: dict[str, Any] = {**warm_over}
    warmup["optimizer"] = warm_raw.get("optimizer", "adamw")
    if warmup["optimizer"] not in BASELINE_OPTIMIZERS:
        raise GnoptError(f"{where}: [warmup] optimizer must be a baseline "
                         f"({', '.join(BASELINE_OPTIMIZERS)}), got {warmup['optimizer']!r}.")
    for key in ("lr", "adam_lr"):
        if key in warm_raw:
            v = warm_raw[key]
            if not (_is_number(v) and math.isfinite(v) and v > 0):
                raise GnoptError(f"{where}: [warmup] {key} must be a positive number, got {v!r}.")
            warmup[key] = float(v)
    warmup["batch_tokens"] = _positive_int(f"{where}: [warmup] batch_tokens",
                                           warm_raw.get("batch_tokens", batches[0]))
    if "steps" in warm_raw:
        warmup["steps"] = _positive_int(f"{where}: [warmup] steps", warm_raw["steps"])
    # A data order that no run replays: the warm-up's batches are not seen again by the runs of any seed.
    warmup.setdefault("seed", max((base_cfg.seed, *seeds)) + 1)
    if warmup["seed"] in (seeds or (base_cfg.seed,)):
        raise GnoptError(f"{where}: [warmup] seed = {warmup['seed']} is also a run seed, so those runs would "
                         "replay the warm start's batches; give the warm-up another seed.")

    methods_raw = raw["methods"]
    if not methods_raw:
        raise GnoptError(f"{where}: [methods] declares no method; add e.g. [methods.adamw] with lr = [...].")
    methods: list[MethodSpec] = []
    for mname, table in methods_raw.items():
        mwhere = f"{where}: [methods.{mname}]"
        if not isinstance(table, dict):
            raise GnoptError(f"{mwhere} must be a table (write [methods.{mname}] with lr = [...]).")
        if not _NAME_RE.match(mname):
            raise GnoptError(f"{mwhere}: a method name must be lower-case letters, digits, '.', '_' or '-'.")
        optimizer = table.get("optimizer", mname if mname in OPTIMIZERS else None)
        if optimizer is None:
            raise GnoptError(f"{mwhere}: {mname!r} is not an optimizer name, so give optimizer = one of "
                             f"{', '.join(OPTIMIZERS)}.")
        if optimizer not in OPTIMIZERS:
            raise GnoptError(f"{mwhere}: unknown optimizer {optimizer!r}; valid optimizers: "
                             f"{', '.join(OPTIMIZERS)}.")
        if "lr" not in table:
            raise GnoptError(f"{mwhere}: missing lr, the learning-rate grid (e.g. lr = [1e-3, 3e-3]).")
        lr_by_batch: dict[int, tuple[float, ...]] | None = None
        if isinstance(table["lr"], dict):
            lr_by_batch = {}
            for k, v in table["lr"].items():
                try:
                    b = int(k)
                except ValueError:
                    raise GnoptError(f"{mwhere}: lr key {k!r} is not a batch size in tokens; write "
                                     "lr = { 65536 = [...], 262144 = [...] }.") from None
                lr_by_batch[b] = _lr_list(f"{mwhere}: lr for batch {b}", v)
            lr = tuple(dict.fromkeys(x for _, v in sorted(lr_by_batch.items()) for x in v))
        else:
            lr = _lr_list(f"{mwhere}: lr", table["lr"])
        adam_lr: tuple[float | None, ...] = (None,)
        if "adam_lr" in table:
            adam_lr = _lr_list(f"{mwhere}: adam_lr", table["adam_lr"])
        overrides = _check_config_keys(
            mwhere, table, extra_allowed=METHOD_KEYS, forbidden=SHARED_FIELDS | STUDY_FIELDS,
            forbidden_why="it must be the same for every method (set it in [base]) or the study sets it",
        )
        mbatches: tuple[int, ...] | None = None
        if "batch_tokens" in table:
            raw_b = table["batch_tokens"]
            if not isinstance(raw_b, list) or not raw_b:
                raise GnoptError(f"{mwhere}: batch_tokens must be a non-empty list of batch sizes from the "
                                 f"experiment's grid {list(batches)}, e.g. batch_tokens = [{batches[-1]}].")
            mbatches = tuple(sorted({_positive_int(f"{mwhere}: batch_tokens entry", b) for b in raw_b}))
            if len(mbatches) != len(raw_b):
                raise GnoptError(f"{mwhere}: batch_tokens lists a batch size twice: {raw_b}.")
            outside = sorted(set(mbatches) - set(batches))
            if outside:
                raise GnoptError(f"{mwhere}: batch_tokens {outside} not in the experiment's grid "
                                 f"{list(batches)} ([experiment] batch_tokens).")
        if lr_by_batch is not None:
            runs_at = set(mbatches or batches)
            if set(lr_by_batch) != runs_at:
                missing, extra = sorted(runs_at - set(lr_by_batch)), sorted(set(lr_by_batch) - runs_at)
                problems = ([f"missing {missing}"] if missing else []) + (
                    [f"not a batch it runs at {extra}"] if extra else [])
                raise GnoptError(f"{mwhere}: a per-batch lr table must name exactly the batch sizes the "
                                 f"method runs at {sorted(runs_at)}; {'; '.join(problems)}.")
        mbudget = _budget(mwhere, table, mbatches or batches, required=False)
        methods.append(MethodSpec(name=mname, optimizer=optimizer, lr=lr, adam_lr=adam_lr,
                                  overrides=overrides, budget=mbudget, batch_tokens=mbatches,
                                  lr_by_batch=lr_by_batch))

    for b in batches:
        gn_at = [(len(m.grid_at(b)), m.name) for m in methods if m.is_gn and b in (m.batch_tokens or batches)]
        if not gn_at:
            continue
        n_gn, gn_name = max(gn_at)
        for m in methods:
            if not m.is_gn and b in (m.batch_tokens or batches) and len(m.grid_at(b)) < n_gn:
                raise GnoptError(
                    f"{where}: [methods.{m.name}] sweeps {len(m.grid_at(b))} setting(s) at batch {b} but "
                    f"{gn_name} sweeps {n_gn}; the protocol gives every baseline at least GN's tuning budget."
                )

    spec = StudySpec(
        path=p, name=name, description=description, base=base, batch_tokens=batches, budget=budget,
        target_loss=target_loss, target_fraction=target_fraction, evals_per_run=evals_per_run,
        eval_every=eval_every, warmup_fraction=warmup_fraction, warmup=warmup, methods=tuple(methods),
        seeds=seeds, seed_batch_tokens=seed_batch, stop_at_target=stop_at_target,
    )
    # Build (and resolve) every run once, so any invalid value surfaces now, naming its table.
    warmup_run(spec, Path("<out>"))
    plan_runs(spec, Path("<out>"))
    plan_seed_runs(spec, Path("<out>"), seed_standin_settings(spec))
    return spec


# ------------------------------------------------------------------------------------------------------
# the plan
# ------------------------------------------------------------------------------------------------------


def _resolved(values: Mapping[str, Any], where: str) -> TrainConfig:
    try:
        # A run folder that already holds the run keeps its machine-dependent defaults (resume, skip).
        return resolve_in_folder(config_from_mapping(values, where=where))
    except GnoptError as exc:
        raise GnoptError(f"{where}: {exc}") from None


def lr_dirname(lr: float, adam_lr: float | None) -> str:
    """Run folder name of a grid point: ``lr0.003`` or ``lr0.02-alr0.003``."""
    return f"lr{lr:g}" + (f"-alr{adam_lr:g}" if adam_lr is not None else "")


def warmup_run(spec: StudySpec, out: Path) -> RunSpec:
    """The shared warm-start run (``out/warmup``): AdamW on ``warmup_fraction`` of the budget."""
    w = dict(spec.warmup)
    b = int(w.pop("batch_tokens"))
    steps = int(w.pop("steps", 0)) or max(1, math.ceil(spec.warmup_tokens() / b))
    values = {**spec.base, **w, "batch_tokens": b, "steps": steps,
              "eval_every": spec.eval_every_for(steps), "out": str(out / "warmup")}
    cfg = _resolved(values, f"experiment {spec.name!r}: [warmup]")
    return RunSpec(method="warmup", optimizer=cfg.optimizer, batch_tokens=b, lr=float(cfg.lr or 0.0),
                   adam_lr=cfg.adam_lr if "adam_lr" in w else None, steps=steps, rel="warmup", config=cfg)


def _method_run(spec: StudySpec, m: MethodSpec, out: Path, b: int, lr: float, alr: float | None,
                seed: int | None = None) -> RunSpec:
    """One run of method ``m`` at batch ``b`` and setting (lr, adam_lr), from the shared warm start: a run of
    the sweep (``seed`` None: the ``[base]`` seed) or a seed run (``-seed<seed>`` folder, that data seed)."""
    steps = spec.budget_of(m).steps_for(b)
    rel = f"runs/{m.name}/B{b}/{lr_dirname(lr, alr)}" + (f"-seed{seed}" if seed is not None else "")
    values: dict[str, Any] = {
        **spec.base, **m.overrides, "optimizer": m.optimizer, "lr": lr, "batch_tokens": b, "steps": steps,
        "eval_every": spec.eval_every_for(steps), "init_from": str(out / "warmup"), "out": str(out / rel),
    }
    if alr is not None:
        values["adam_lr"] = alr
    if seed is not None:
        values["seed"] = seed
    where = f"[methods.{m.name}] " + (f"seed {seed}" if seed is not None else f"at batch_tokens={b}")
    cfg = _resolved(values, f"experiment {spec.name!r}: {where}")
    return RunSpec(method=m.name, optimizer=m.optimizer, batch_tokens=b, lr=lr, adam_lr=alr, steps=steps,
                   rel=rel, config=cfg, seed=seed)


def plan_runs(spec: StudySpec, out: Path, *, only: Sequence[str] | None = None) -> list[RunSpec]:
    """Every run of the study, in order: method (file order), batch size (ascending), grid point.

    ``only``: restrict to these method names (each must exist).
    """
    if only:
        for n in only:
            spec.method(n)  # raises for an unknown name
    return [_method_run(spec, m, out, b, lr, alr) for m in spec.methods if not (only and m.name not in only)
            for b in spec.batches_of(m) for lr, alr in m.grid_at(b)]


def seed_standin_settings(spec: StudySpec) -> dict[str, tuple[float, float | None]]:
    """Each method's first setting at the seed batch: what the plan counts for its seed runs until the
    sweep has chosen the best ones."""
    b = spec.seed_batch
    return {m.name: m.grid_at(b)[0] for m in spec.methods if b in spec.batches_of(m)}


def plan_seed_runs(spec: StudySpec, out: Path, settings: Mapping[str, tuple[float, float | None]],
                   *, only: Sequence[str] | None = None) -> list[RunSpec]:
    """The seed runs: for every method with a setting in ``settings`` (its best (lr, adam_lr) at the seed
    batch, chosen from the sweep) and every extra seed of ``[experiment] seeds``, that setting re-run at the
    seed batch (``seed_batch_tokens``, default the largest) with that data seed, from the same shared warm
    start, into ``runs/<method>/B<batch>/<lr folder>-seed<seed>``. Methods that do not run at the seed batch
    get none.
    """
    b = spec.seed_batch
    return [_method_run(spec, m, out, b, *settings[m.name], seed=seed) for m in spec.methods
            if m.name in settings and b in spec.batches_of(m) and not (only and m.name not in only)
            for seed in spec.extra_seeds]


def with_threads(cfg: TrainConfig, threads: int | None) -> TrainConfig:
    """``cfg`` with another thread count (a run-control field: it does not change the fingerprint)."""
    return cfg if threads is None else dataclasses.replace(cfg, threads=threads)
