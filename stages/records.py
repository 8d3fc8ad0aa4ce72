"""Reading PubMedQA-format rows from the hub or a local file, cleaning them, splitting them.

Pure functions on lists of dicts, used by stages/prepare.py and tested on their own.
"""

from __future__ import annotations

import ast
import errno
import hashlib
import json
import math
import os
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path

from stages.errors import UserError
from stages.modeling import is_hub_id

REQUIRED_COLUMNS = ("QUESTION", "CONTEXTS", "LONG_ANSWER")
LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")
DROP_REASONS = (
    "missing_question", "missing_answer", "short_question", "short_answer",
    "duplicate_id", "duplicate_question", "too_long",
)
DECISIONS = ("yes", "no", "maybe")  # PubMedQA's final_decision labels


def is_local_source(source: str) -> bool:
    """An existing path is always local; so is a file name and anything that cannot be a hub id."""
    return source.endswith(LOCAL_SUFFIXES) or not is_hub_id(source)


def read_records(source: str, split: str, revision: str | None) -> list[dict]:
    """Rows of `source`: a local .json/.jsonl/.parquet/.csv file, or a hub dataset id."""
    if "://" in source:  # as a path, https://x/y.json would become https:/x/y.json and "not exist"
        raise UserError(f"data.source = {source}: URLs are not read; download the file first (e.g. "
                        f"curl -L -o data/mine.json '{source}') and set data.source to its path")
    if is_local_source(source):
        return _read_local(Path(source).expanduser())
    return _read_hub(source, split, revision)


def _as_records(loaded, path: Path) -> list[dict]:
    if isinstance(loaded, dict) and all(isinstance(v, dict) for v in loaded.values()):
        return [{"pubid": key, **value} for key, value in loaded.items()]  # the original PubMedQA release
    if isinstance(loaded, list) and all(isinstance(item, dict) for item in loaded):
        return loaded
    raise UserError(
        f"data.source = {path}: expected a list of records ({{\"QUESTION\": ..., ...}}) or a dict of records "
        f"keyed by id, found {_shape(loaded)}"
    )


def _shape(loaded) -> str:
    if isinstance(loaded, dict):
        key, value = next(((k, v) for k, v in loaded.items() if not isinstance(v, dict)), (None, None))
        return f"a dict whose value for {key!r} is {type(value).__name__}"
    if isinstance(loaded, list):
        index = next(i for i, item in enumerate(loaded) if not isinstance(item, dict))
        return f"a list whose item {index} is {type(loaded[index]).__name__}"
    return type(loaded).__name__


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError as exc:
                raise UserError(f"data.source = {path}: line {number} is not valid JSON ({exc})") from None
            if not isinstance(rows[-1], dict):
                raise UserError(f"data.source = {path}: line {number} is {type(rows[-1]).__name__}, not a record")
    return rows


def _read_local(path: Path) -> list[dict]:
    if path.is_dir():
        raise UserError(f"data.source = {path}: is a folder; point it at a {', '.join(LOCAL_SUFFIXES)} file")
    if not path.exists():
        raise UserError(f"data.source = {path}: {_why_missing(path)}")
    if path.suffix not in LOCAL_SUFFIXES:
        raise UserError(f"data.source = {path}: unsupported file type; use one of {', '.join(LOCAL_SUFFIXES)}")
    try:
        if path.suffix == ".json":
            return _as_records(json.loads(path.read_text(encoding="utf-8")), path)
        if path.suffix == ".jsonl":
            return _read_jsonl(path)
        import pandas as pd

        frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, dtype=str)
        return [{k: _from_table(v) for k, v in row.items()} for row in frame.to_dict("records")]
    except UnicodeDecodeError:
        raise UserError(
            f"data.source = {path}: not UTF-8 text (Excel on Korean Windows saves cp949/EUC-KR); re-save it "
            "as UTF-8 (Excel: 'CSV UTF-8', or: iconv -f cp949 -t utf-8 IN > OUT)"
        ) from None
    except (OSError, ValueError) as exc:  # unreadable file or malformed JSON/CSV/parquet
        raise UserError(f"data.source = {path}: cannot be read ({type(exc).__name__}: {exc})") from None


def _why_missing(path: Path) -> str:
    """What is wrong with a path that does not exist: nothing there, or a link that leads nowhere."""
    try:
        path.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a symlink loop (a link that leads back to itself); point data.source at the file"
    if path.is_symlink():
        return f"a symbolic link to {os.readlink(path)}, which does not exist"
    return "no such file or folder"


def _from_table(value):
    """Undo what a CSV or parquet file does to list columns and missing values.

    pandas writes a list cell as Python's repr (`['a', 'b']`), other tools as JSON (`["a", "b"]`).
    """
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, str) and value.startswith("[") and value.endswith("]"):
        for parse in (json.loads, ast.literal_eval):
            try:
                decoded = parse(value)
            except (ValueError, SyntaxError):
                continue
            if isinstance(decoded, list):
                return decoded
    return value


def decision(value) -> str | None:
    """yes / no / maybe from a final_decision cell (any case, spaces), else None."""
    text = normalize_text(value) if isinstance(value, str) else None
    return text.lower() if text and text.lower() in DECISIONS else None


def _read_hub(source: str, split: str, revision: str | None) -> list[dict]:
    import datasets

    from stages.modeling import load_errors

    with load_errors("data.source", source):
        dataset = datasets.load_dataset(source, split=split, revision=revision)
    return dataset.to_list()


def content_hash(records: list[dict]) -> str:
    """sha256 of the rows as canonical JSON: the same data gives the same hash from any source."""
    canonical = json.dumps(records, ensure_ascii=False, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def normalize_text(value) -> str | None:
    if not isinstance(value, str):
        return None
    return unicodedata.normalize("NFC", value).strip()


def _contexts(value) -> list[str]:
    paragraphs = [value] if isinstance(value, str) else list(value or [])
    cleaned = (normalize_text(p) for p in paragraphs)
    return [p for p in cleaned if p]


def _row_id(record: dict, question: str, answer: str) -> str:
    for key in ("pubid", "id", "ID"):
        if record.get(key) not in (None, ""):
            return str(record[key])
    # No id column: a stable one from the content, the same on every machine.
    return "h" + hashlib.sha256(f"{question}\n{answer}".encode("utf-8")).hexdigest()[:12]


def clean_records(records: list[dict], min_chars: int) -> tuple[list[dict], Counter, int]:
    """Normalise and filter rows; return the kept rows, the drop count per reason, and how many kept
    rows had a final_decision other than yes/no/maybe (kept without it)."""
    if not records:
        raise UserError("data.source holds no rows")
    missing = [c for c in REQUIRED_COLUMNS if all(c not in r for r in records)]
    if missing:
        raise UserError(f"data.source has no column {', '.join(missing)}; expected {', '.join(REQUIRED_COLUMNS)}")
    dropped = Counter({reason: 0 for reason in DROP_REASONS})
    kept, seen_ids, seen_questions, invalid_decisions = [], set(), set(), 0
    for record in records:
        question = normalize_text(record.get("QUESTION"))
        answer = normalize_text(record.get("LONG_ANSWER"))
        reason = None
        if not question:
            reason = "missing_question"
        elif not answer:
            reason = "missing_answer"
        elif len(question) < min_chars:
            reason = "short_question"
        elif len(answer) < min_chars:
            reason = "short_answer"
        else:
            row_id = _row_id(record, question, answer)
            if row_id in seen_ids:
                reason = "duplicate_id"
            elif question in seen_questions:
                reason = "duplicate_question"
        if reason:
            dropped[reason] += 1
            continue
        seen_ids.add(row_id)
        seen_questions.add(question)
        row = {"id": row_id, "question": question, "contexts": _contexts(record.get("CONTEXTS")), "answer": answer}
        label = record.get("final_decision")
        if decision(label) is not None:
            row["final_decision"] = decision(label)
        elif label not in (None, ""):  # kept without a label: never a stratum or a score of its own
            invalid_decisions += 1
        kept.append(row)
    if not kept:
        raise UserError(f"no rows left after cleaning (dropped: {dict(+dropped)}); check data.min_chars and the columns")
    return kept, dropped, invalid_decisions


def split_counts(n_rows: int, val_size: float, test_size: float, dropped: Counter | None = None
                 ) -> tuple[int, int, int]:
    """(train, validation, test) row counts; a size < 1 is a fraction, >= 1 a count. `dropped`
    (clean_records' drop counts) only makes the message say where the other rows went."""
    def count(size):
        return int(size) if size >= 1 else int(round(size * n_rows))

    n_val, n_test = count(val_size), count(test_size)
    n_train = n_rows - n_val - n_test
    if min(n_train, n_val, n_test) < 1:
        empty = [name for name, n in (("train", n_train), ("validation", n_val), ("test", n_test)) if n < 1]
        drops = ", ".join(f"{reason} {n:,}" for reason, n in (dropped or {}).items() if n)
        raise UserError(
            f"{n_rows:,} usable row{'s' if n_rows != 1 else ''} after cleaning and de-duplication"
            f"{f' (dropped: {drops})' if drops else ''}; data.val_size = {val_size} and data.test_size = "
            f"{test_size} take {n_val:,} validation and {n_test:,} test rows and leave the {' and '.join(empty)} "
            f"split{'s' if len(empty) > 1 else ''} empty: every split needs at least one row"
        )
    return n_train, n_val, n_test


def _rank(seed: int, row_id: str) -> str:
    # A hash, not a PRNG: the order is the same on every machine, Python and library version.
    return hashlib.sha256(f"{seed}:{row_id}".encode("utf-8")).hexdigest()


def split_rows(rows: list[dict], val_size: float, test_size: float, seed: int, dropped: Counter | None = None
               ) -> dict[str, list[dict]]:
    """Seeded train/validation/test split, stratified by final_decision when rows have it.

    Each stratum is shuffled by hash; every row then gets the position (k + 0.5) / n_stratum, and
    sorting all rows by it interleaves the strata evenly, so any prefix (test, then validation)
    holds each answer class in proportion.
    """
    n_train, n_val, n_test = split_counts(len(rows), val_size, test_size, dropped)
    strata = defaultdict(list)
    for row in rows:
        strata[row.get("final_decision", "")].append(row)
    placed = []
    for members in strata.values():
        members.sort(key=lambda r: _rank(seed, r["id"]))
        placed += [((k + 0.5) / len(members), _rank(seed, r["id"]), r) for k, r in enumerate(members)]
    ordered = [row for _, _, row in sorted(placed, key=lambda item: item[:2])]
    splits = {
        "train": ordered[n_test + n_val:],
        "validation": ordered[n_test:n_test + n_val],
        "test": ordered[:n_test],
    }
    return {name: sorted(members, key=lambda r: r["id"]) for name, members in splits.items()}
