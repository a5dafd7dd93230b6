"""Read raw rows from files, folders, `datasets` folders or the Hugging Face Hub.

`read_rows(spec)` yields `(Source, row)` pairs in file order, where `row` is either a `dict` (the
raw record, untouched) or a `DataError` (a line that could not be read). Bad lines are yielded,
not raised, so that the caller (`validate.validate_rows`) can apply `on_invalid: error|skip`
after seeing every problem with its file:line. Problems that make the whole source unusable
raise `DataError` instead: a missing path, an unsupported suffix, an empty folder, or a dataset
that `datasets` cannot load raise when `read_rows` is called; a JSON array that does not parse
raises when iteration starts (before the first row). Hub and `datasets` rows are read from the
loaded Arrow table, so they have a row index and no line.

What `spec` may be, checked in this order:

- an existing file, by suffix (optionally with `.gz`):
  - `.jsonl` / `.ndjson`: one JSON object a line; Source.line = 1-based line; blank lines skipped.
  - `.json`: a JSON array of objects (Source.row = index, Source.line = line where the element
    starts, or None when elements share lines, as in minified JSON); an object holding one list
    of objects (`{"data": [...]}`; row index only); a single object (one row); or JSON Lines
    saved under a `.json` name (detected, read as `.jsonl`). JSON is parsed whole, so prefer
    JSONL for files of many GB.
  - `.csv` / `.tsv`: a header row, then one record per row (Source.line = first line of the record).
  - `.parquet`: row index only (Source.line is None).
  - `.txt`: one document per non-empty line, as `{text_field: line}`.
- an existing folder: a `datasets` folder (`dataset_info.json`, `state.json` or
  `dataset_dict.json` inside) goes through `datasets.load_from_disk`; any other folder is read
  file by file (supported suffixes above, recursively, sorted by relative path; each file is its
  own Source.file; hidden files and others such as README.md are ignored).
- anything else: a dataset name for `datasets.load_dataset(spec, split=..., **hub_kwargs)`, which
  also covers builders such as `"json"` with `hub_kwargs={"data_files": ...}`.

`split` picks a split of a `datasets` folder or Hub dataset; when omitted, "train" is used if
present, else the only split. Plain files have one split: `split` must be None or "train".

Text is decoded as strict UTF-8: a line with invalid bytes becomes a per-row DataError (never
silently replaced). A UTF-8 byte-order mark at the start of a file is ignored.

The small pure helpers at the end (`select_rows`, `split_rows`, `mix_datasets`) work on any
list (raw rows, examples) and are deterministic for a given seed.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import os
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from lmpipeline.data.types import DataError, Source

T = TypeVar("T")

# What read_rows yields: a raw record, or the reason its line could not be read.
Row = tuple[Source, "dict[str, Any] | DataError"]

JSONL_SUFFIXES = {".jsonl", ".ndjson"}
JSON_SUFFIXES = {".json"}
CSV_SUFFIXES = {".csv", ".tsv"}
PARQUET_SUFFIXES = {".parquet"}
TEXT_SUFFIXES = {".txt"}
DATA_SUFFIXES = JSONL_SUFFIXES | JSON_SUFFIXES | CSV_SUFFIXES | PARQUET_SUFFIXES | TEXT_SUFFIXES

DATASETS_FOLDER_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")

_BOM = b"\xef\xbb\xbf"
_WS = re.compile(r"[ \t\n\r]*")
_TOO_DEEP = "nested too deeply to read (Python's JSON parser stops at about 1,000 levels of lists/objects)"
# Lone surrogates are what `surrogateescape` turns undecodable bytes into.
_SURROGATE = re.compile("[\udc80-\udcff]")


def read_rows(
    spec: str | os.PathLike,
    *,
    split: str | None = None,
    text_field: str = "text",
    hub_kwargs: dict[str, Any] | None = None,
) -> Iterator[Row]:
    """An iterator of `(Source, dict | DataError)`, one per record of `spec` (see the module docstring).

    Raises DataError for a missing local path, an unsupported file type, an empty folder, or a
    dataset that cannot be loaded, at call time (not on first iteration) so the caller can name
    the config key; a JSON array that does not parse raises when iteration starts. Never raises
    for a single bad line.
    """
    path = Path(os.path.expanduser(str(spec)))
    if path.is_file():
        _check_file_split(path, split)
        _check_suffix(path)
        return _read_file(path, text_field)
    if path.is_dir():
        if any((path / marker).is_file() for marker in DATASETS_FOLDER_MARKERS):
            return _read_datasets_folder(path, split)
        _check_file_split(path, split)
        return _read_folder(path, _folder_files(path), text_field)
    if _looks_like_local_path(str(spec)):
        raise DataError(f"file not found: {spec} (looked for {path.resolve()})")
    return _read_hub(str(spec), split, hub_kwargs or {})


def _looks_like_local_path(spec: str) -> bool:
    # A Hub name is "name" or "owner/name"; anything with a data suffix or a path prefix is a
    # file the user expected to exist, and "not found on the Hub" would mislead them.
    if spec.startswith(("/", "./", "../", "~", "\\")) or os.path.isabs(spec):
        return True
    suffixes = Path(spec).suffixes
    return any(s.lower() in DATA_SUFFIXES or s.lower() == ".gz" for s in suffixes)


def _check_file_split(path: Path, split: str | None) -> None:
    if split not in (None, "train"):
        raise DataError(
            f"split '{split}' was asked of {path}, but local files have a single split; "
            "point at the file that holds that split, or use a ratio split"
        )


def _data_suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix.lower() == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    if not data.strip():  # said plainly, not as "no format detected in 0 rows"
        raise DataError(f"{path} is empty" if not data else f"{path} holds only blank lines: there are no rows to read")
    return data


def _check_suffix(path: Path) -> None:
    suffix = _data_suffix(path)
    if suffix not in DATA_SUFFIXES:
        raise DataError(
            f"unsupported file type '{suffix or path.name}' for {path}; "
            f"supported: {', '.join(sorted(DATA_SUFFIXES))} (optionally .gz)"
        )


def _read_file(path: Path, text_field: str) -> Iterator[Row]:
    rows = 0
    for row in _read_file_rows(path, text_field):
        rows += 1
        yield row
    if rows == 0:  # a CSV header alone, an empty JSON list: said plainly, by name
        raise DataError(f"{path} holds no rows")


def _read_file_rows(path: Path, text_field: str) -> Iterator[Row]:
    suffix = _data_suffix(path)
    name = str(path)
    if suffix in JSONL_SUFFIXES:
        yield from _read_jsonl(_read_bytes(path), name)
    elif suffix in JSON_SUFFIXES:
        yield from _read_json(_read_bytes(path), name)
    elif suffix in CSV_SUFFIXES:
        yield from _read_csv(_read_bytes(path), name, delimiter="\t" if suffix == ".tsv" else ",")
    elif suffix in PARQUET_SUFFIXES:
        yield from _read_parquet(path, name)
    else:
        yield from _read_text(_read_bytes(path), name, text_field)


def _split_lines(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes without the newline) for each line."""
    if data.startswith(_BOM):
        data = data[len(_BOM) :]
    # Splitting on b"\n" only (not splitlines) keeps line numbers the same as an editor's, even
    # when a record contains \x0b, \x1c or other characters that str.splitlines treats as breaks.
    for number, raw in enumerate(data.split(b"\n"), start=1):
        yield number, raw.rstrip(b"\r")


def _decode_line(raw: bytes, name: str, row: int, line: int) -> str | DataError:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return DataError(
            f"invalid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
            "re-save the file as UTF-8",
            Source(name, row, line),
        )


def _read_jsonl(data: bytes, name: str) -> Iterator[Row]:
    row = 0
    for line, raw in _split_lines(data):
        if not raw.strip():
            continue
        source = Source(name, row, line)
        row += 1
        text = _decode_line(raw, name, source.row, line)
        if isinstance(text, DataError):
            yield source, text
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            yield source, DataError(f"not valid JSON: {e.msg} (column {e.colno})", source)
            continue
        except RecursionError:
            yield source, DataError(_TOO_DEEP, source)
            continue
        yield source, _as_record(value, source)


def _as_record(value: Any, source: Source) -> dict | DataError:
    if isinstance(value, dict):
        return value
    return DataError(f"expected a JSON object, found {_json_type(value)}", source)


def _json_type(value: Any) -> str:
    return {
        dict: "an object", list: "an array", str: "a string", bool: "a boolean",
        int: "a number", float: "a number", type(None): "null",
    }.get(type(value), type(value).__name__)


def _read_json(data: bytes, name: str) -> Iterator[Row]:
    if data.startswith(_BOM):
        data = data[len(_BOM) :]
    # surrogateescape keeps undecodable bytes as lone surrogates, so one bad byte spoils only the
    # element that holds it instead of the whole file.
    text = data.decode("utf-8", errors="surrogateescape")
    start = _WS.match(text).end()
    if start == len(text):
        return
    if text[start] == "[":
        yield from _read_json_array(text, start, name)
        return
    try:
        value = json.loads(text)
    except RecursionError:
        raise DataError(_TOO_DEEP, Source(name, 0, 1)) from None
    except json.JSONDecodeError as e:
        if _first_line_is_json(text, start):
            # JSON Lines saved as .json (common): read it line by line.
            yield from _read_jsonl(data, name)
            return
        raise DataError(
            f"not valid JSON: {e.msg}", Source(name, 0, e.lineno)
        ) from None
    if isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list)]
        if len(value) == 1 and lists and all(isinstance(x, dict) for x in lists[0]):
            records = [(Source(name, i), item) for i, item in enumerate(lists[0])]
        else:
            records = [(Source(name, 0, 1), value)]
        for source, record in records:
            if _SURROGATE.search(json.dumps(record, ensure_ascii=False)):
                yield source, DataError("invalid UTF-8 bytes in this record; re-save the file as UTF-8", source)
            else:
                yield source, record
        return
    raise DataError(f"expected a JSON array or object in {name}, found {_json_type(value)}")


def _first_line_is_json(text: str, start: int) -> bool:
    end = text.find("\n", start)
    first = text[start : end if end != -1 else len(text)]
    try:
        return isinstance(json.loads(first), dict)
    except (json.JSONDecodeError, RecursionError):
        return False


def _read_json_array(text: str, start: int, name: str) -> Iterator[Row]:
    """Parse the array element by element to learn the line each element starts on.

    Everything is parsed before the first row is yielded, so a broken file raises one DataError
    (with its line and column) instead of failing half-way through a run.
    """
    decoder = json.JSONDecoder()
    elements: list[tuple[int, int, int, Any]] = []  # (line, start offset, end offset, value)
    pos = _WS.match(text, start + 1).end()
    line, line_pos = 1, 0
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            line += text.count("\n", line_pos, pos)
            line_pos = pos
            try:
                value, end = decoder.raw_decode(text, pos)
            except RecursionError:
                raise DataError(_TOO_DEEP, Source(name, len(elements), line)) from None
            except json.JSONDecodeError as e:
                raise DataError(
                    f"not valid JSON (array element {len(elements)}): {e.msg} at line {e.lineno} "
                    f"column {e.colno}; the file cannot be read past this point",
                    Source(name, len(elements), e.lineno),
                ) from None
            elements.append((line, pos, end, value))
            pos = _WS.match(text, end).end()
            if text.startswith(",", pos):
                pos = _WS.match(text, pos + 1).end()
                continue
            if text.startswith("]", pos):
                pos += 1
                break
            lineno = text.count("\n", 0, pos) + 1
            raise DataError(
                f"not valid JSON: expected ',' or ']' after array element {len(elements) - 1}",
                Source(name, len(elements) - 1, lineno),
            )
    if _WS.match(text, pos).end() != len(text):
        lineno = text.count("\n", 0, pos) + 1
        raise DataError("not valid JSON: extra data after the array", Source(name, len(elements), lineno))
    # Minified arrays put many elements on one line; a row index says more than "file:1" there.
    one_per_line = len({line for line, _, _, _ in elements}) == len(elements)
    for i, (line, begin, end, value) in enumerate(elements):
        source = Source(name, i, line if one_per_line else None)
        if _SURROGATE.search(text, begin, end):
            yield source, DataError("invalid UTF-8 bytes in this record; re-save the file as UTF-8", source)
        else:
            yield source, _as_record(value, source)


def _read_csv(data: bytes, name: str, delimiter: str) -> Iterator[Row]:
    if data.startswith(_BOM):
        data = data[len(_BOM) :]
    text = io.StringIO(data.decode("utf-8", errors="surrogateescape"), newline="")
    reader = csv.reader(text, delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as e:
        raise DataError(f"cannot parse the CSV header: {e}", Source(name, 0, 1)) from None
    row = 0
    line = reader.line_num + 1  # first line of the next record
    while True:
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            # The csv module cannot resynchronise after a broken record; stop with one error.
            yield Source(name, row, line), DataError(f"cannot parse CSV: {e}", Source(name, row, line))
            return
        source = Source(name, row, line)
        line = reader.line_num + 1
        if not values:
            continue
        row += 1
        if any(_SURROGATE.search(v) for v in values):
            yield source, DataError("invalid UTF-8 bytes in this record; re-save the file as UTF-8", source)
        elif len(values) != len(header):
            yield source, DataError(
                f"record has {len(values)} fields but the header has {len(header)}", source
            )
        else:
            yield source, dict(zip(header, values))


def _read_parquet(path: Path, name: str) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"cannot read parquet file {path}: {e}") from None
    row = 0
    for batch in pf.iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            yield Source(name, row), record
            row += 1


def _read_text(data: bytes, name: str, text_field: str) -> Iterator[Row]:
    row = 0
    for line, raw in _split_lines(data):
        if not raw.strip():
            continue
        source = Source(name, row, line)
        row += 1
        text = _decode_line(raw, name, source.row, line)
        if isinstance(text, DataError):
            yield source, text
        elif "\x00" in text:
            yield source, DataError("line contains NUL bytes (is this a binary file?)", source)
        else:
            yield source, {text_field: text}


def _folder_files(path: Path) -> list[Path]:
    files = sorted(
        (p for p in path.rglob("*") if p.is_file() and _data_suffix(p) in DATA_SUFFIXES
         and not any(part.startswith(".") for part in p.relative_to(path).parts)),
        key=lambda p: p.relative_to(path).as_posix(),
    )
    if not files:
        raise DataError(
            f"folder {path} holds no data files ({', '.join(sorted(DATA_SUFFIXES))}) "
            "and is not a `datasets` save_to_disk folder"
        )
    return files


def _read_folder(path: Path, files: list[Path], text_field: str) -> Iterator[Row]:
    for file in files:
        yield from _read_file(file, text_field)


def _pick_split(splits: Sequence[str], split: str | None, what: str) -> str:
    if split is not None:
        if split not in splits:
            raise DataError(f"{what} has no split '{split}'; it has: {', '.join(splits)}")
        return split
    if "train" in splits:
        return "train"
    if len(splits) == 1:
        return splits[0]
    raise DataError(f"{what} has several splits ({', '.join(splits)}); choose one with split")


def _iter_dataset(dataset: Any, name: str) -> Iterator[Row]:
    for i, record in enumerate(dataset):
        yield Source(name, i), record


def _read_datasets_folder(path: Path, split: str | None) -> Iterator[Row]:
    # A plain function (not a generator) so that loading errors surface at read_rows() time.
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises FileNotFoundError, ValueError, pyarrow errors...
        raise DataError(f"cannot load the `datasets` folder {path}: {e}") from None
    if isinstance(loaded, datasets.DatasetDict):
        chosen = _pick_split(list(loaded.keys()), split, f"datasets folder {path}")
        return _iter_dataset(loaded[chosen], f"{path}:{chosen}")
    _check_file_split(path, split)
    return _iter_dataset(loaded, str(path))


def _read_hub(name: str, split: str | None, hub_kwargs: dict[str, Any]) -> Iterator[Row]:
    # A plain function (not a generator) so that loading errors surface at read_rows() time.
    import datasets

    try:
        loaded = datasets.load_dataset(name, split=split, **hub_kwargs)
    except Exception as e:  # network, auth, missing config, builder errors: all end here
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        hint = (
            " Offline mode is on (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE), so only cached datasets load."
            if offline else " Check the name, your network and, for gated datasets, `hf auth login`."
        )
        raise DataError(
            f"could not load dataset '{name}': it is not a local file or folder "
            f"({Path(name).resolve()} does not exist) and datasets.load_dataset failed: "
            f"{type(e).__name__}: {e}.{hint}"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        chosen = _pick_split(list(loaded.keys()), split, f"dataset '{name}'")
        return _iter_dataset(loaded[chosen], f"{name}:{chosen}")
    if isinstance(loaded, datasets.Dataset):
        return _iter_dataset(loaded, f"{name}:{split}" if split else name)
    raise DataError(
        f"dataset '{name}' loaded as {type(loaded).__name__}; streaming datasets are not "
        "supported here (drop `streaming` from hub_kwargs)"
    )


# ---------------------------------------------------------------------------------------------
# Selection, splitting and mixing. Pure functions of (rows, seed).


def select_rows(
    rows: Iterable[T], *, max_samples: int | None = None, shuffle: bool = False, seed: int = 42
) -> list[T]:
    """Optionally shuffle (seeded), then keep the first `max_samples` rows."""
    out = list(rows)
    if shuffle:
        random.Random(seed).shuffle(out)
    if max_samples is not None:
        if max_samples < 0:
            raise DataError(f"max_samples must be >= 0, got {max_samples}")
        out = out[:max_samples]
    return out


def split_rows(
    rows: Iterable[T],
    *,
    ratio: float | Sequence[float] | dict[str, float] | None = None,
    seed: int = 42,
    shuffle: bool = True,
) -> dict[str, list[T]]:
    """Split rows into named parts, e.g. {"train": [...], "validation": [...]}.

    `ratio` is one of:
      - None: everything is "train";
      - a float in (0, 1): that fraction goes to "validation", the rest to "train";
      - a sequence of 2 or 3 fractions summing to 1: train/validation[/test];
      - a dict name -> fraction summing to 1 (the first name takes the rounding remainder).
    Rows are shuffled with `seed` first unless `shuffle=False`. Every non-first part gets
    round(fraction * n) rows, at least 1 when its fraction is positive; the first part must end
    up non-empty, or DataError is raised.
    """
    items = list(rows)
    if ratio is None:
        return {"train": items}
    if isinstance(ratio, (int, float)) and not isinstance(ratio, bool):
        if not 0 < ratio < 1:
            raise DataError(f"a split ratio must be between 0 and 1 (exclusive), got {ratio}")
        parts = {"train": 1 - ratio, "validation": float(ratio)}
    elif isinstance(ratio, dict):
        parts = {str(k): float(v) for k, v in ratio.items()}
    else:
        names = ["train", "validation", "test"]
        if not 2 <= len(ratio) <= 3:
            raise DataError(f"a split ratio list needs 2 or 3 fractions, got {list(ratio)}")
        parts = dict(zip(names, (float(r) for r in ratio)))
    if any(v < 0 for v in parts.values()) or not math.isclose(sum(parts.values()), 1.0, abs_tol=1e-6):
        raise DataError(f"split fractions must be >= 0 and sum to 1, got {parts}")
    if shuffle:
        random.Random(seed).shuffle(items)
    names = list(parts)
    sizes = {n: (max(1, round(parts[n] * len(items))) if parts[n] > 0 else 0) for n in names[1:]}
    first = len(items) - sum(sizes.values())
    if first <= 0:
        raise DataError(
            f"cannot split {len(items)} rows into {parts}: '{names[0]}' would be empty"
        )
    out, pos = {names[0]: items[:first]}, first
    for n in names[1:]:
        out[n] = items[pos : pos + sizes[n]]
        pos += sizes[n]
    return out


def mix_datasets(
    datasets_and_weights: Sequence[tuple[Sequence[T], float]],
    *,
    seed: int = 42,
    total: int | None = None,
) -> list[T]:
    """Mix several datasets so that dataset i makes up weight_i / sum(weights) of the result.

    The result has `total` rows (default: the sum of the datasets' sizes). Dataset i contributes
    n_i rows (largest-remainder rounding so the n_i sum to `total`): when n_i <= its size, a
    seeded sample without replacement; when larger, whole copies plus a sample for the rest
    (upsampling, never more than one extra copy of any row per pass). The mixture is then
    shuffled with `seed`. Weights need not sum to 1; each must be > 0.
    """
    if not datasets_and_weights:
        return []
    weights = [float(w) for _, w in datasets_and_weights]
    if any(w <= 0 or math.isnan(w) for w in weights):
        raise DataError(f"mixing weights must be > 0, got {weights}")
    for i, (rows, _) in enumerate(datasets_and_weights):
        if len(rows) == 0:
            raise DataError(f"dataset {i} in the mixture is empty")
    if total is None:
        total = sum(len(rows) for rows, _ in datasets_and_weights)
    if total < 0:
        raise DataError(f"mixture total must be >= 0, got {total}")
    wsum = sum(weights)
    exact = [total * w / wsum for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    rng = random.Random(seed)
    mixed: list[T] = []
    for (rows, _), n in zip(datasets_and_weights, counts):
        copies, rest = divmod(n, len(rows))
        mixed.extend(list(rows) * copies)
        mixed.extend(rng.sample(list(rows), rest))
    rng.shuffle(mixed)
    return mixed
