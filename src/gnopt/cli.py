"""Command line: ``gnopt prepare | train | info | study`` (also ``python -m gnopt``).

Every user mistake surfaces as one :class:`~gnopt.errors.GnoptError` line on stderr and exit status 2 (the
same status argparse uses for a malformed command line); anything else is a bug and keeps its traceback.

``gnopt train`` flags are generated from :class:`~gnopt.config.TrainConfig` (``--batch-tokens`` sets
``batch_tokens``), so every config field has a flag and a TOML key of the same name. Flags default to
"not given" so that a flag overrides ``--config FILE.toml`` only when it is actually on the command line.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Sequence
from typing import Any

from gnopt.config import (
    DEVICES,
    FIELD_TYPES,
    GN_SCHEDULES,
    INNER_OPTIMIZERS,
    LS_SOURCES,
    OPTIMIZERS,
    PRECISIONS,
    SCHEDULES,
    TOKENIZERS,
    TrainConfig,
    _base_type,
    config_from_mapping,
    load_toml,
)
from gnopt.errors import GnoptError

#: Help for each TrainConfig field (the flag is ``--`` + the name with dashes).
FIELD_HELP: dict[str, str] = {
    "data": "training text: a .txt file, a folder of .txt files (a folder with train.txt + valid.txt is "
    "used as that split), or hf:NAME[:CONFIG][:SPLIT]; default: the embedded corpus (Python stdlib sources)",
    "valid_data": "validation text (default: the folder's valid.txt, else the held-out tail of --data)",
    "tokenizer": f"one of {', '.join(TOKENIZERS)}, a pretrained Hugging Face tokenizer.json (a path), or "
    "hf:NAME to download one (e.g. hf:google-t5/t5-base; vocabularies up to 65,536) (default: bytes for "
    "presets with a 256 vocab, else bpe)",
    "vocab_size": "BPE vocabulary size (default: the preset's; a pretrained tokenizer brings its own)",
    "max_tokens": "stream an hf: --data up to this many training tokens (resumable; validation from the "
    "dataset's own validation split), instead of reading it into memory",
    "cache_dir": "token cache root (default: $GNOPT_CACHE or ~/.cache/gnopt)",
    "preset": "model size preset (tiny, cpu-small, cpu-medium, 45m, 150m)",
    "seq_len": "sequence length (default: the preset's)",
    "init_from": "start from the model weights of this checkpoint (a checkpoint.pt or a run folder); "
    "the optimizer state starts fresh",
    "optimizer": f"one of {', '.join(OPTIMIZERS)}",
    "lr": "peak learning rate (muon/shampoo/GN: of the hidden 2-D matrices; default depends on --optimizer)",
    "adam_lr": "peak AdamW learning rate of embedding, head and norm scales (muon, shampoo, GN)",
    "weight_decay": "decoupled weight decay of 2-D tensors (default 0)",
    "warmup_steps": "linear warmup steps (default: 5%% of --steps)",
    "schedule": f"decay after warmup: {', '.join(SCHEDULES)}",
    "min_lr_ratio": "final learning rate as a fraction of the peak (cosine/linear)",
    "grad_clip": "global gradient-norm clip, 0 = off",
    "soap_precondition_frequency": "SOAP (the baseline and GN's inner soap): steps between refreshes of its "
    "eigenbasis (default 10, the SOAP paper's and arXiv 2510.09378's; 1 = every step, for runs of few steps)",
    "muon_ns_precision": "precision of Muon's Newton-Schulz iteration (the muon baseline and GN's inner "
    "muon alike): bf16 (torch.optim.Muon's) or fp32 (several times faster on a CPU without native bf16); "
    "default: bf16 on CUDA, else see docs/hardware.md. A resumed run keeps the one it recorded",
    "skip_nonfinite": "skip (and log) a step whose gradient norm is not finite",
    "steps": "optimizer steps",
    "batch_tokens": "tokens per optimizer step, a multiple of micro-batch-size × seq-len (default: the "
    "multiple nearest 8192)",
    "micro_batch_size": "sequences per micro-batch (gradient accumulation / GN inner step)",
    "target_loss": "validation loss whose first crossing is recorded (steps_to_target, tokens_to_target)",
    "eval_every": "evaluate every N steps (0 = only at the start and the end)",
    "eval_tokens": "validation tokens per evaluation (a fixed set)",
    "ckpt_every": "checkpoint every N steps (0 = only at the end)",
    "out": "output directory (default: runs/<optimizer>-<preset>)",
    "seed": "seed for torch, numpy, random and the batch order",
    "threads": "torch CPU threads (default: every available core)",
    "device": f"one of {', '.join(DEVICES)}",
    "precision": f"one of {', '.join(PRECISIONS)}: bf16-mixed runs the model's passes under bf16 autocast "
    "(weights, optimizer states and losses stay float32; on CUDA also TF32 for float32 matmuls)",
    "quiet": "no progress bar and no per-evaluation lines",
    "compile": "torch.compile the model's training forward (baseline optimizers only; not part of the run's "
    "identity)",
    "stop_after": "stop this invocation after step N (checkpointed, continue with --resume)",
    "stop_at_loss": "stop this invocation after the first evaluation whose validation loss is <= this "
    "(checkpointed; continue with --resume and a lower value, or none, to train on)",
    "dist_timeout": "seconds a data-parallel (torchrun) collective waits for the other ranks before failing",
    "inner_steps": "GN: inner steps N per outer step (sets batch_tokens = N × micro-batch tokens)",
    "inner_optimizer": f"GN inner optimizer: {', '.join(INNER_OPTIMIZERS)}",
    "gn_schedule": f"GN inner learning-rate schedule: {', '.join(GN_SCHEDULES)}",
    "ls_kind": "GN line search: model (alpha from the GN model, confirmed by the loss; default) or grid "
               "(the paper's: ls_range step sizes on N fresh micro-batches)",
    "ls_range": "GN line search: number of step sizes alpha in the grid (model: its smallest alpha)",
    "ls_zero": "GN line search: also try alpha = 0",
    "ls_source": f"GN line-search micro-batches: {', '.join(LS_SOURCES)}",
    "ls_batches": "GN line-search micro-batches (default: N for grid, ceil(ls_fraction x N) for model)",
    "ls_fraction": "GN model line search: fraction of N fresh micro-batches it uses (default 1/8)",
    "reset_below": "GN: reset the inner iterate when the chosen alpha is below this",
    "warm_start": "GN: start the inner loop from the previous (1-alpha)-scaled iterate",
    "warm_scale": "GN: scale that carried iterate by the model's best factor in [0, 1] (default off)",
    "damping": "GN: Levenberg-Marquardt damping",
    "prox": "GN: proximal weight mu (adds mu/2 ||theta_hat - theta_t||^2 to the inner objective)",
    "ema_decay": "GN: evaluate with an EMA of the weights with this decay",
    "cg_tol": "GN CG inner solver: relative residual tolerance",
    "cg_max_iters": "GN CG inner solver: iteration cap",
    "inner_clip": "GN: inner gradient-norm clip, 0 = off",
}
assert set(FIELD_HELP) == set(FIELD_TYPES), set(FIELD_HELP) ^ set(FIELD_TYPES)


class _Parser(argparse.ArgumentParser):
    """argparse, but errors raise instead of printing + exiting, so :func:`main` reports them uniformly.

    Negative numbers in scientific notation (``--lr -1e-3``) are read as values, not as options, so they
    reach the config validation and get its message ("lr must be positive ...").
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

    def error(self, message: str) -> None:  # type: ignore[override]
        raise GnoptError(f"{self.prog}: {message} (see {self.prog} --help).")


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    py_types = {"int": int, "float": float, "str": str}
    for name, type_str in FIELD_TYPES.items():
        base, _ = _base_type(type_str)
        flag = "--" + name.replace("_", "-")
        help_text = FIELD_HELP[name]
        if base == "bool":
            if name == "quiet":
                p.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=help_text)
            else:
                p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=help_text)
        else:
            p.add_argument(flag, dest=name, type=py_types[base], default=argparse.SUPPRESS,
                           metavar=base.upper() if base != "str" else "VALUE", help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gnopt", description="Gauss-Newton training of language models.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="{prepare,train,info,study}", parser_class=_Parser)

    p_train = sub.add_parser("train", help="train a model (flags override --config)")
    p_train.add_argument("--config", metavar="FILE.toml", help="TOML file with TrainConfig keys")
    p_train.add_argument("--resume", action="store_true",
                         help="continue the run in --out from its checkpoint")
    p_train.add_argument("--overwrite", action="store_true",
                         help="replace a different (or the same) run in --out instead of refusing")
    _add_train_flags(p_train)

    p_prep = sub.add_parser("prepare", help="tokenize and cache a corpus, print its statistics")
    p_info = sub.add_parser("info", help="parameter counts of a preset (and data statistics with --data)")
    for p in (p_prep, p_info):
        for name in ("data", "valid_data", "tokenizer", "vocab_size", "max_tokens", "cache_dir", "preset"):
            base, _ = _base_type(FIELD_TYPES[name])
            p.add_argument("--" + name.replace("_", "-"), dest=name, type=int if base == "int" else str,
                           default=argparse.SUPPRESS, help=FIELD_HELP[name])
    p_info.add_argument("--seq-len", dest="seq_len", type=int, default=argparse.SUPPRESS,
                        help=FIELD_HELP["seq_len"])
    from gnopt.study.cli import add_study_parser  # light: no torch import

    add_study_parser(sub)
    return parser


def _given(ns: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    return {n: getattr(ns, n) for n in names if hasattr(ns, n)}


def _cmd_train(ns: argparse.Namespace) -> int:
    from gnopt.config import resolve_in_folder, to_toml
    from gnopt.distributed import env_rank
    from gnopt.train import train

    values: dict[str, Any] = {}
    where = "the command line"
    if ns.config is not None:
        values.update(load_toml(ns.config))
    flags = _given(ns, tuple(FIELD_TYPES))
    cfg = config_from_mapping(values, where=f"config file {ns.config!r}") if values else TrainConfig()
    cfg = config_from_mapping(flags, base=cfg, where=where)
    cfg = resolve_in_folder(cfg, overwrite=ns.overwrite)  # what train() runs (a resumed run keeps its own)
    logging.getLogger("gnopt").setLevel(logging.WARNING if cfg.quiet else logging.INFO)
    main_rank = env_rank() == 0  # under torchrun only rank 0 prints
    if main_rank:
        print("# gnopt train: resolved config (TOML; reusable with --config)")
        print(to_toml(cfg), end="", flush=True)
    summary = train(cfg, resume=ns.resume, overwrite=ns.overwrite)
    if main_rank:
        print(
            f"done: {summary['steps']} steps, {summary['tokens']} tokens, final val loss "
            f"{summary['final_val_loss']:.4f}, steps to target {summary['steps_to_target']}, "
            f"{summary['wall_seconds']:.1f}s -> {summary['out']}",
            flush=True,
        )
    return 0


def _data_cfg(ns: argparse.Namespace) -> TrainConfig:
    """A resolved config holding just the data/model fields given to prepare/info."""
    from gnopt.config import resolve
    from gnopt.model import PRESETS

    given = _given(ns, ("data", "valid_data", "tokenizer", "vocab_size", "max_tokens", "cache_dir", "preset",
                        "seq_len"))
    cfg = config_from_mapping(given, where="the command line")
    # No training happens here: make the batch fields trivially valid for any preset / seq_len.
    seq_len = cfg.seq_len or (PRESETS[cfg.preset].seq_len if cfg.preset in PRESETS else 1)
    cfg.micro_batch_size, cfg.batch_tokens, cfg.eval_tokens = 1, max(seq_len, 1), max(seq_len, 1)
    return resolve(cfg)


def _print_stats(stats: dict[str, Any]) -> None:
    width = max(len(k) for k in stats) if stats else 0
    for key, value in stats.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        print(f"  {key:<{width}}  {value}")


def _cmd_prepare(ns: argparse.Namespace) -> int:
    from gnopt.train import load_data

    cfg = _data_cfg(ns)
    prepared = load_data(cfg)
    from gnopt.data import data_statistics

    print(f"data ({'cache hit' if prepared.cache_hit else 'tokenized now'}):")
    _print_stats(data_statistics(prepared))
    return 0


def _cmd_info(ns: argparse.Namespace) -> int:
    from gnopt.model import build_model, count_parameters

    cfg = _data_cfg(ns)
    vocab = cfg.vocab_size
    prepared = None
    if getattr(ns, "data", None) is not None:
        from gnopt.train import load_data

        prepared = load_data(cfg)
        vocab = prepared.vocab_size
    model = build_model(cfg.preset, vocab_size=vocab, seq_len=cfg.seq_len, device="meta")
    mc = model.config
    print(f"preset {cfg.preset}: d_model={mc.d_model} n_layers={mc.n_layers} n_heads={mc.n_heads} "
          f"d_ff={mc.d_ff} seq_len={mc.seq_len} vocab_size={mc.vocab_size}")
    counts = count_parameters(model)
    width = max(len(k) for k in counts)
    for key, n in counts.items():
        print(f"  {key:<{width}}  {n:>12,}")
    if prepared is not None:
        from gnopt.data import data_statistics

        print("data:")
        _print_stats(data_statistics(prepared))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gnopt`` console script; returns the exit status (2 for user errors)."""
    parser = build_parser()
    try:
        try:
            ns = parser.parse_args(list(argv) if argv is not None else None)
        except SystemExit as exc:  # --help / --version-style exits
            return int(exc.code or 0)
        if ns.version:
            from gnopt import __version__

            print(f"gnopt {__version__}")
            return 0
        if ns.command is None:
            parser.print_help(sys.stderr)
            return 2
        from gnopt.torch_version import check as check_torch

        check_torch()
        # Data preparation reports progress through `logging` ("data: preparing ..."): show it on stderr.
        logging.basicConfig(level=logging.INFO, format="gnopt: %(message)s", stream=sys.stderr)
        if ns.command == "study":
            from gnopt.study.cli import cmd_study

            return cmd_study(ns)
        handler = {"train": _cmd_train, "prepare": _cmd_prepare, "info": _cmd_info}[ns.command]
        return handler(ns)
    except GnoptError as exc:
        sys.stdout.flush()
        print(f"gnopt: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("gnopt: interrupted", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
