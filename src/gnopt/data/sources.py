"""Where training text comes from: files, folders, Hugging Face datasets, or the embedded default corpus.

A *data spec* is one of

- a path to a text file;
- a path to a folder: every ``*.txt`` below it (recursive, sorted by relative path) is concatenated, except
  that a folder holding ``train.txt`` and ``valid.txt`` (or ``val.txt`` / ``validation.txt``) at its top
  level is read as that train/validation pair (e.g. ``shared/data/gutenberg-fiction``);
- ``hf:NAME[:CONFIG][:SPLIT]``: a Hugging Face dataset through the optional ``datasets`` package. ``NAME``
  may be a hub name (streamed, capped at ``max_chars``) or a local path: a folder written by
  ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, a ``.txt``/``.json``/``.jsonl``/``.csv``/
  ``.parquet`` file, or a folder of such files;
- ``None``: the embedded default corpus, the Python standard library's own source files (see
  :func:`stdlib_source`), real text present on every machine that runs Python, with no download.

Resolving a spec (:func:`resolve_data`) only looks at file names and ``stat`` results, which is enough for a
cache key; the text itself is read (:meth:`TextSource.read`) only when the cache misses. Text is decoded as
strict UTF-8: a bad byte is a :class:`~gnopt.errors.GnoptError` naming the file and the byte offset.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gnopt.errors import GnoptError

#: How much of the standard library makes the default corpus (top-level ``*.py`` files, in name order).
STDLIB_MAX_BYTES = 4_000_000
#: Default cap on the characters read from a Hugging Face dataset (it may be far larger than needed).
HF_MAX_CHARS = 100_000_000
VALID_NAMES: tuple[str, ...] = ("valid.txt", "val.txt", "validation.txt")
HF_TEXT_SUFFIXES: dict[str, str] = {
    ".txt": "text",
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}


@dataclass(frozen=True)
class LoadedText:
    """Text read from a source, with a human-readable account of where it came from."""

    text: str
    description: str
    n_files: int
    n_bytes: int


@dataclass(frozen=True)
class TextSource:
    """A resolved, not yet read, source of text.

    ``identity`` is JSON-serialisable and changes whenever the text may have changed (paths, sizes and
    modification times for files); it keys the token cache. ``name`` is a short slug for cache folders.
    """

    kind: str
    name: str
    description: str
    identity: dict[str, Any]
    reader: Callable[[], LoadedText] = field(repr=False, compare=False)

    def read(self) -> LoadedText:
        return self.reader()


# ---------------------------------------------------------------------------------------------------
# Plain files and folders


def decode_utf8(data: bytes, path: str | os.PathLike[str]) -> str:
    """Decode ``data`` (the bytes of ``path``) as strict UTF-8, dropping a leading byte-order mark."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise GnoptError(
            f"{path} is not valid UTF-8: invalid byte 0x{data[exc.start]:02x} at byte offset {exc.start}."
        ) from None
    return text[1:] if text.startswith("\ufeff") else text


def read_text_file(path: str | os.PathLike[str]) -> str:
    """Read ``path`` as strict UTF-8 (GnoptError if missing, unreadable or not UTF-8)."""
    p = Path(path)
    if not p.exists():
        raise GnoptError(f"data file {p} does not exist.")
    if not p.is_file():
        raise GnoptError(f"data path {p} is not a regular file.")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise GnoptError(f"cannot read data file {p}: {exc.strerror}.") from None
    return decode_utf8(data, p)


def _file_identity(paths: list[Path]) -> list[list[Any]]:
    out: list[list[Any]] = []
    for p in paths:
        st = p.stat()
        out.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    return out


def _join_documents(texts: list[str]) -> str:
    """Concatenate documents, each ending in a newline, separated by one blank line."""
    return "\n".join(t if t.endswith("\n") else t + "\n" for t in texts)


def files_source(paths: list[Path], label: str) -> TextSource:
    """A source made of the concatenation of ``paths`` (each strict UTF-8)."""
    if not paths:
        raise GnoptError(f"{label} contains no .txt files.")
    for p in paths:
        if not p.is_file():
            raise GnoptError(f"data file {p} does not exist.")

    def reader() -> LoadedText:
        texts = [read_text_file(p) for p in paths]
        nonempty = [t for t in texts if t]
        if not nonempty:
            what = f"data file {paths[0]}" if len(paths) == 1 else f"every .txt file in {label}"
            raise GnoptError(f"{what} is empty.")
        text = _join_documents(nonempty) if len(nonempty) > 1 else nonempty[0]
        n_bytes = sum(p.stat().st_size for p in paths)
        desc = f"{paths[0]}" if len(paths) == 1 else f"{len(paths)} .txt files from {label}"
        return LoadedText(text, desc, len(paths), n_bytes)

    name = paths[0].stem if len(paths) == 1 else Path(label).name
    if len(paths) == 1 and paths[0].stem in ("train", "valid", "val", "validation"):
        name = paths[0].parent.name or paths[0].stem
    desc = f"{paths[0]}" if len(paths) == 1 else f"{len(paths)} .txt files from {label}"
    return TextSource("files", name, desc, {"files": _file_identity(paths)}, reader)


def folder_text_files(folder: Path) -> list[Path]:
    """Every ``*.txt`` file below ``folder``, sorted by relative path (deterministic)."""
    return sorted(
        (p for p in folder.rglob("*.txt") if p.is_file()),
        key=lambda p: p.relative_to(folder).as_posix(),
    )


def path_source(path: str | os.PathLike[str]) -> tuple[TextSource, TextSource | None]:
    """Resolve a file or folder path to (train source, validation source if the folder provides one)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise GnoptError(f"data path {p} does not exist.")
    if p.is_file():
        if p.stat().st_size == 0:
            raise GnoptError(f"data file {p} is empty.")
        return files_source([p], str(p)), None
    if p.is_dir():
        train = p / "train.txt"
        valid = next((p / n for n in VALID_NAMES if (p / n).is_file()), None)
        if train.is_file() and valid is not None:
            for f in (train, valid):
                if f.stat().st_size == 0:
                    raise GnoptError(f"data file {f} is empty.")
            return files_source([train], str(p)), files_source([valid], str(p))
        return files_source(folder_text_files(p), str(p)), None
    raise GnoptError(f"data path {p} is neither a file nor a folder.")


# ---------------------------------------------------------------------------------------------------
# The embedded default corpus


def stdlib_source(max_bytes: int = STDLIB_MAX_BYTES) -> TextSource:
    """The default corpus: the Python standard library's top-level ``*.py`` files, in name order, until
    ``max_bytes`` (files that are not valid UTF-8 are skipped). It is real, varied English-and-code text
    that every machine with Python has, so ``gnopt train`` works offline with no ``--data``. Its exact
    content depends on the Python version, which is part of the cache key."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    candidates = sorted((p for p in stdlib.glob("*.py") if p.is_file()), key=lambda p: p.name)
    if not candidates:
        raise GnoptError(f"the Python standard library at {stdlib} has no .py files to use as a corpus.")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"

    def reader() -> LoadedText:
        texts: list[str] = []
        total = 0
        for p in candidates:
            if total >= max_bytes:
                break
            try:
                data = p.read_bytes()
                texts.append(decode_utf8(data, p))
            except (OSError, GnoptError):
                continue
            total += len(data)
        if not texts:
            raise GnoptError(f"no readable UTF-8 .py file in the Python standard library at {stdlib}.")
        desc = (
            f"embedded default corpus: the Python {version} standard library's own source "
            f"({len(texts)} top-level .py files, {total / 1e6:.1f} MB, from {stdlib})"
        )
        return LoadedText(_join_documents(texts), desc, len(texts), total)

    identity = {
        "stdlib": str(stdlib),
        "python": version,
        "max_bytes": max_bytes,
        "files": [[p.name, *_file_identity([p])[0][1:]] for p in candidates],
    }
    desc = f"embedded default corpus: the Python {version} standard library's own source (from {stdlib})"
    return TextSource("stdlib", f"python{version}-stdlib", desc, identity, reader)


# ---------------------------------------------------------------------------------------------------
# Hugging Face datasets


@dataclass(frozen=True)
class HFSpec:
    name: str
    config: str | None
    split: str | None


def parse_hf_spec(spec: str) -> HFSpec:
    """Parse ``hf:NAME[:CONFIG][:SPLIT]`` (empty fields mean "default")."""
    if not spec.startswith("hf:"):
        raise GnoptError(f"Hugging Face data spec must start with 'hf:', got {spec!r}.")
    parts = spec[3:].split(":")
    if not parts[0] or len(parts) > 3:
        raise GnoptError(f"bad Hugging Face data spec {spec!r}; expected hf:NAME[:CONFIG][:SPLIT].")
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else None
    return HFSpec(parts[0], config, split)


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise GnoptError(
            "reading hf: data needs the optional 'datasets' package; install it with pip install 'gnopt[hf]'."
        ) from None
    return datasets


def _text_column(ds: Any) -> str | None:
    """'text' if the dataset has it, else its first string column; None when the schema is unknown
    (some streamed datasets), in which case :func:`_rows_text` decides from the first row."""
    features = getattr(ds, "features", None) or {}
    names = list(features) if features else list(getattr(ds, "column_names", None) or [])
    if "text" in names:
        return "text"
    for n in names:
        if getattr(features.get(n), "dtype", None) in ("string", "large_string"):
            return n
    return None


def _rows_text(ds: Any, what: str, max_chars: int) -> tuple[str, int]:
    """Join the text column of the rows of ``ds`` as documents (one blank line apart), stopping after
    ``max_chars`` characters. Returns (text, number of rows used)."""
    column = _text_column(ds)
    texts: list[str] = []
    total = 0
    for row in ds:
        if column is None:
            column = "text" if isinstance(row.get("text"), str) else next(
                (k for k, v in row.items() if isinstance(v, str)), None
            )
            if column is None:
                raise GnoptError(f"Hugging Face dataset {what} has no text column (columns: {list(row)}).")
        t = row[column]
        if not t:
            continue
        texts.append(t)
        total += len(t) + 1
        if total >= max_chars:
            break
    return _join_documents(texts), len(texts)


def _pick_split(dd: Any, split: str | None, what: str) -> Any:
    keys = list(dd.keys())
    want = split or ("train" if "train" in keys else keys[0])
    if want not in keys:
        raise GnoptError(f"Hugging Face dataset {what} has no split {want!r}; its splits are {keys}.")
    return dd[want]


def _load_local_hf(datasets: Any, spec: HFSpec, path: Path) -> tuple[Any, Any | None]:
    """(train dataset, validation dataset or None) for a local ``save_to_disk`` folder or data files."""
    what = str(path)
    try:
        if path.is_dir() and (
            (path / "dataset_info.json").is_file()
            or (path / "state.json").is_file()
            or (path / "dataset_dict.json").is_file()
        ):
            obj = datasets.load_from_disk(str(path))
        elif path.is_file():
            builder = HF_TEXT_SUFFIXES.get(path.suffix.lower())
            if builder is None:
                raise GnoptError(
                    f"cannot read {path} as a Hugging Face dataset: use one of "
                    f"{', '.join(HF_TEXT_SUFFIXES)} or a save_to_disk folder."
                )
            # A .txt file is one document (the text builder would otherwise make one row per line).
            extra = {"sample_by": "document"} if builder == "text" else {}
            obj = datasets.load_dataset(builder, data_files=str(path), **extra)
        else:
            obj = datasets.load_dataset(str(path), spec.config)
    except GnoptError:
        raise
    except Exception as exc:
        raise GnoptError(f"cannot load Hugging Face dataset from {what}: {exc}") from None
    if isinstance(obj, datasets.DatasetDict):
        train = _pick_split(obj, spec.split, what)
        valid = None
        if spec.split is None:
            valid = next((obj[k] for k in ("validation", "valid", "val") if k in obj), None)
        return train, valid
    if spec.split not in (None, "train"):
        raise GnoptError(f"Hugging Face dataset {what} has a single split; cannot select {spec.split!r}.")
    return obj, None


def hf_source(spec_str: str, max_chars: int = HF_MAX_CHARS) -> tuple[TextSource, TextSource | None]:
    """Resolve ``hf:NAME[:CONFIG][:SPLIT]`` to (train source, validation source or None).

    Local paths are loaded directly (``load_from_disk`` / ``load_dataset(<builder>, data_files=...)``).
    A local ``DatasetDict`` with a ``validation`` (or ``valid``/``val``) split provides the validation text
    when no split is named. Hub names are streamed (no full download) and cut at ``max_chars``; their
    validation text is the held-out tail unless one is named explicitly (``valid_data="hf:NAME:CONFIG:
    validation"``), which keeps resolving a spec free of network calls. The text column is ``text`` or else
    the first string column.
    """
    spec = parse_hf_spec(spec_str)
    local = Path(spec.name).expanduser()
    ident: dict[str, Any] = {
        "hf": spec.name, "config": spec.config, "split": spec.split, "max_chars": max_chars
    }
    slug = "hf-" + Path(spec.name).name.replace("/", "-")

    if local.exists():
        files = sorted(local.rglob("*")) if local.is_dir() else [local]
        ident["files"] = _file_identity([f for f in files if f.is_file()])
        loaded: dict[str, tuple[str, int]] = {}

        def load_all() -> None:
            if loaded:
                return
            datasets = _import_datasets()
            train_ds, valid_ds = _load_local_hf(datasets, spec, local)
            loaded["train"] = _rows_text(train_ds, str(local), max_chars)
            if valid_ds is not None:
                loaded["valid"] = _rows_text(valid_ds, str(local), max_chars)

        def local_reader(part: str) -> LoadedText:
            load_all()
            text, rows = loaded[part]
            if not text:
                raise GnoptError(f"Hugging Face dataset {local} ({part}) holds no text.")
            desc = f"Hugging Face dataset {local} ({part}, {rows} rows)"
            return LoadedText(text, desc, rows, len(text.encode("utf-8")))

        # Whether a validation split exists is only known after loading; decide it now (cheaply, from the
        # folder layout) so the source structure, and hence the cache key, does not depend on a load.
        has_valid = spec.split is None and local.is_dir() and any(
            (local / k).is_dir() for k in ("validation", "valid", "val")
        )
        train_src = TextSource(
            "hf", slug, f"Hugging Face dataset {local}", ident, lambda: local_reader("train")
        )
        valid_src = None
        if has_valid:
            valid_src = TextSource(
                "hf", slug, f"Hugging Face dataset {local} (validation)", {**ident, "part": "valid"},
                lambda: local_reader("valid"),
            )
        return train_src, valid_src

    def hub_reader(split: str, cap: int) -> LoadedText:
        datasets = _import_datasets()
        try:
            ds = datasets.load_dataset(spec.name, spec.config, split=split, streaming=True)
            text, rows = _rows_text(ds, spec.name, cap)
        except GnoptError:
            raise
        except Exception as exc:
            raise GnoptError(
                f"cannot load Hugging Face dataset {spec.name!r} split {split!r}: {exc}"
            ) from None
        if not text:
            raise GnoptError(f"Hugging Face dataset {spec.name!r} split {split!r} holds no text.")
        desc = f"Hugging Face dataset {spec.name}" + (f" ({spec.config})" if spec.config else "")
        return LoadedText(text, f"{desc}, split {split}, {rows} rows", rows, len(text.encode("utf-8")))

    train_split = spec.split or "train"
    train_src = TextSource(
        "hf", slug, f"Hugging Face dataset {spec.name}", ident, lambda: hub_reader(train_split, max_chars)
    )
    return train_src, None


# ---------------------------------------------------------------------------------------------------
# Streamed Hugging Face datasets (a token budget: ``--max-tokens``)

#: Names of a dataset's own validation split, in order of preference.
VALID_SPLITS: tuple[str, ...] = ("validation", "valid", "val")


@dataclass(frozen=True)
class StreamedDataset:
    """The streamed splits of an ``hf:`` dataset: ``train`` (an ``IterableDataset``) and its own validation
    split ``valid`` (``None`` when it has none or a split was named)."""

    train: Any
    valid: Any | None
    train_split: str
    valid_split: str | None
    description: str


def hf_stream_identity(spec_str: str) -> dict[str, Any]:
    """What keys the cache for a streamed ``hf:`` spec (files' sizes and times for a local path; the name
    for the Hub, whose datasets do not change under a name in practice). No network."""
    spec = parse_hf_spec(spec_str)
    ident: dict[str, Any] = {"hf": spec.name, "config": spec.config, "split": spec.split, "streamed": True}
    local = Path(spec.name).expanduser()
    if local.exists():
        files = sorted(local.rglob("*")) if local.is_dir() else [local]
        ident["files"] = _file_identity([f for f in files if f.is_file()])
    return ident


def hf_stream_source(spec_str: str) -> TextSource:
    """A :class:`TextSource` that only names and keys a streamed ``hf:`` spec (its text is never read
    whole: :mod:`gnopt.data.stream` streams it)."""
    spec = parse_hf_spec(spec_str)

    def reader() -> LoadedText:
        raise GnoptError(f"internal: the streamed dataset {spec_str} cannot be read whole.")

    return TextSource("hf", "hf-" + Path(spec.name).name, f"Hugging Face dataset {spec.name} (streamed)",
                      hf_stream_identity(spec_str), reader)


def open_hf_stream(spec_str: str) -> StreamedDataset:
    """Open ``hf:NAME[:CONFIG][:SPLIT]`` as streamed splits (nothing is downloaded beyond what is read).

    Hub names use ``load_dataset(NAME, CONFIG, streaming=True)``; local paths are streamed too (a
    ``save_to_disk`` folder through ``to_iterable_dataset``, a ``.txt`` file one paragraph per row, a
    ``.json``/``.jsonl``/``.csv``/``.parquet`` file one row per record, a folder through its own layout).
    A failure (offline, unknown name or config, no such split) is one :class:`GnoptError` line.
    """
    spec = parse_hf_spec(spec_str)
    datasets = _import_datasets()
    local = Path(spec.name).expanduser()
    what = str(local) if local.exists() else repr(spec.name)
    try:
        if local.is_dir() and any((local / f).is_file() for f in
                                  ("dataset_info.json", "state.json", "dataset_dict.json")):
            obj = datasets.load_from_disk(str(local))
            if isinstance(obj, datasets.DatasetDict):
                obj = datasets.IterableDatasetDict({k: v.to_iterable_dataset() for k, v in obj.items()})
            else:
                obj = obj.to_iterable_dataset()
        elif local.is_file():
            builder = HF_TEXT_SUFFIXES.get(local.suffix.lower())
            if builder is None:
                raise GnoptError(f"cannot stream {local} as a Hugging Face dataset: use one of "
                                 f"{', '.join(HF_TEXT_SUFFIXES)} or a save_to_disk folder.")
            extra = {"sample_by": "paragraph"} if builder == "text" else {}
            obj = datasets.load_dataset(builder, data_files=str(local), streaming=True, **extra)
        else:
            obj = datasets.load_dataset(str(local) if local.exists() else spec.name, spec.config,
                                        streaming=True)
    except GnoptError:
        raise
    except Exception as exc:
        lines = str(exc).strip().splitlines()
        cfg = f" ({spec.config})" if spec.config else ""
        raise GnoptError(f"cannot open Hugging Face dataset {what}{cfg} for streaming: "
                         f"{type(exc).__name__}: {lines[0] if lines else ''}") from None
    label = f"Hugging Face dataset {local if local.exists() else spec.name}" + (
        f" ({spec.config})" if spec.config else "")
    if not isinstance(obj, (datasets.IterableDatasetDict, datasets.DatasetDict, dict)):
        if spec.split not in (None, "train"):
            raise GnoptError(f"Hugging Face dataset {what} has a single split; cannot select {spec.split!r}.")
        return StreamedDataset(obj, None, "train", None, label)
    train_split = spec.split or ("train" if "train" in obj else next(iter(obj)))
    train = _pick_split(obj, train_split, what)
    valid_split = None
    if spec.split is None:
        valid_split = next((k for k in VALID_SPLITS if k in obj), None)
    return StreamedDataset(train, obj[valid_split] if valid_split else None, train_split, valid_split, label)


def row_text_getter(what: str) -> Callable[[dict[str, Any]], str]:
    """A function from a row to its text: the ``text`` column, else the row's first string column (decided
    on the first row, since a streamed dataset's schema may be unknown up front)."""
    column: list[str] = []

    def get(row: dict[str, Any]) -> str:
        if not column:
            name = "text" if isinstance(row.get("text"), str) else next(
                (k for k, v in row.items() if isinstance(v, str)), None)
            if name is None:
                raise GnoptError(f"Hugging Face dataset {what} has no text column (columns: {list(row)}).")
            column.append(name)
        return row[column[0]] or ""

    return get


# ---------------------------------------------------------------------------------------------------


def resolve_data(
    data: str | os.PathLike[str] | None,
    valid_data: str | os.PathLike[str] | None = None,
    *,
    max_chars: int = HF_MAX_CHARS,
) -> tuple[TextSource, TextSource | None]:
    """Resolve a data spec (and an optional explicit validation spec) to (train, validation or None).

    ``None`` for validation means: hold out the tail of the training text.
    """
    if data is None or (isinstance(data, str) and data.strip() == ""):
        train, valid = stdlib_source(), None
    elif isinstance(data, str) and data.startswith("hf:"):
        train, valid = hf_source(data, max_chars)
    else:
        train, valid = path_source(data)
    if valid_data is not None:
        if isinstance(valid_data, str) and valid_data.startswith("hf:"):
            vtrain, _ = hf_source(valid_data, max_chars)
            valid = vtrain
        else:
            vtrain, vvalid = path_source(valid_data)
            valid = vvalid if vvalid is not None else vtrain
    return train, valid
