"""Where shard samples come from: an image folder, a CSV or JSONL list of image files, or the
built-in dataset; how their class names are set; and a stratified held-out split.

A source is listed up front as a ``Listing``: items ``(key, image, label)`` where ``image`` is a
file path (read later, in a worker process, by ``data.shards``) or pixels (the built-in set), and
``label`` an index into ``classes`` or None for an unlabelled set. Listing first, reading later is
what lets the writer split work over processes and lets ``--holdout`` stratify before any decode.

Class names (``classes``):

- image folder: the sorted class subfolder names (a folder of images without subfolders is an
  unlabelled set);
- CSV / JSONL with labels: sorted unique label names, unless every label is an integer (a CSV
  cell such as ``3``, a JSON number; a JSON string such as ``"3"`` is a name): then the labels
  are used as they are and the classes are ``"0" .. str(max)``;
- CSV without a ``label`` column (or with an empty one), JSONL without ``"label"``: unlabelled
  (``classes`` is empty). A list where some rows have a label and others not is an error;
- ``--classes FILE`` (one name a line) fixes names and order instead: string labels must be in
  it, integer labels index it. Use it to keep indices identical across sets written separately
  (a train list and a test list where the test list lacks a class).

Every bad input raises ``SourceError`` (a ValueError) with one line naming the file or option,
the value and the fix.
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
LIST_SUFFIXES = (".csv", ".jsonl", ".ndjson")
BUILTIN = "fashion-mnist"
_INT = re.compile(r"^[+-]?\d+$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(i?))?B?\s*$", re.IGNORECASE)

# (key, image: Path | np.ndarray | bytes, label index or None)
Item = tuple[str, Any, "int | None"]
OnError = Callable[[str, Exception], None]


class SourceError(ValueError):
    """A bad source or option; the message is one line: what, the value, the fix."""


@dataclass
class Listing:
    """The samples of one source, listed but not read yet."""

    items: list[Item]
    classes: list[str]
    origins: dict[str, str] = field(default_factory=dict)  # key -> file, for messages about a sample

    @property
    def labelled(self) -> bool:
        return bool(self.classes)


def sample_key(index: int) -> str:
    """Key of the ``index``-th listed file: stable, sortable and valid in a tar."""
    return f"sample_{index:08d}"


# --------------------------------------------------------------------------------------------
# Options given as text
# --------------------------------------------------------------------------------------------


def parse_size(text: str, option: str = "--shard-bytes") -> int:
    """Bytes from ``500MB``, ``2G``, ``64KiB`` or ``1048576``: K/M/G/T are powers of 1000 (as a
    disk vendor and ``ls --si`` count), Ki/Mi/Gi/Ti powers of 1024."""
    match = _SIZE.match(str(text))
    if not match:
        raise SourceError(
            f"{option} {text!r} is not a size; write bytes with an optional K, M, G or T suffix "
            "(powers of 1000; KiB, MiB, GiB for 1024), e.g. 500MB, 2G, 1048576"
        )
    number, unit, binary = match.groups()
    power = "KMGT".find(unit.upper()) + 1 if unit else 0
    size = int(float(number) * (1024 if binary else 1000) ** power)
    if size < 1:
        raise SourceError(f"{option} {text!r} is below one byte; give a positive size such as 500MB")
    return size


def read_classes_file(path: str | os.PathLike) -> list[str]:
    """Class names from a text file, one a line (blank lines ignored), in label order."""
    file = Path(path)
    if not file.is_file():
        raise SourceError(f"--classes {file}: no such file; give a text file with one class name a line")
    names = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    if not names:
        raise SourceError(f"--classes {file} lists no class names; write one name a line")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SourceError(f"--classes {file} lists {duplicates[0]!r} twice; each class name once")
    return names


# --------------------------------------------------------------------------------------------
# Image folder: root/<class>/*.png|jpg|jpeg
# --------------------------------------------------------------------------------------------


def image_folder_classes(root: Path) -> list[str]:
    """Sorted names of the class subfolders of an image folder ``root/<class>/*.png|jpg|jpeg``."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist; expected {root}/<class>/*.png|jpg|jpeg")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"image folder {root} has no class subfolders; expected {root}/<class>/*.png|jpg|jpeg")
    return classes


def image_folder_files(root: Path, classes: Sequence[str]) -> list[tuple[Path, int]]:
    """``(file, label)`` for every image under each class folder, in a stable sorted order."""
    files = []
    for label, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                files.append((path, label))
    return files


def image_folder_samples(files: Sequence[tuple[Path, int]], on_error: OnError) -> Iterable[tuple[str, bytes, int]]:
    """``(key, file bytes, label)``; keys ``sample_{index:08d}`` follow the file order, so they are stable."""
    for index, (path, label) in enumerate(files):
        key = sample_key(index)
        try:
            data = path.read_bytes()
        except OSError as exn:
            on_error(key, exn)
            continue
        yield key, data, label


def folder_listing(root: Path, classes: Sequence[str] | None = None) -> Listing:
    """An image folder's files: ``root/<class>/*`` (labelled by subfolder), or, when ``root`` has
    no subfolders, the images directly in it (an unlabelled set). ``classes`` (from --classes)
    must name every class subfolder."""
    if root.is_dir() and not any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir()):
        return _flat_listing(root, classes)
    found = image_folder_classes(root)
    if classes is not None:
        unknown = [name for name in found if name not in classes]
        if unknown:
            raise SourceError(
                f"image folder {root}: subfolder {unknown[0]!r} is not in the --classes file; add it there or move it out"
            )
        files = [(path, list(classes).index(found[label])) for path, label in image_folder_files(root, found)]
    else:
        classes, files = found, image_folder_files(root, found)
    if not files:
        shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        raise SourceError(f"image folder {root} holds no .png/.jpg/.jpeg files in its class folders ({shown}); put images in {root}/<class>/")
    return _listing([(path, label) for path, label in files], list(classes))


def _flat_listing(root: Path, classes: Sequence[str] | None) -> Listing:
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SourceError(
            f"image folder {root} has neither class subfolders nor images; expected {root}/<class>/*.png|jpg|jpeg "
            f"(labelled) or {root}/*.png|jpg|jpeg (unlabelled)"
        )
    if classes is not None:
        raise SourceError(f"--classes given but image folder {root} has no class subfolders (an unlabelled set); drop --classes")
    return _listing([(path, None) for path in files], [])


def _listing(rows: Sequence[tuple[Any, int | None]], classes: list[str]) -> Listing:
    items = [(sample_key(i), image, label) for i, (image, label) in enumerate(rows)]
    origins = {key: str(image) for key, image, _ in items if isinstance(image, Path)}
    return Listing(items, classes, origins)


# --------------------------------------------------------------------------------------------
# CSV and JSONL lists of image files
# --------------------------------------------------------------------------------------------


@dataclass
class _Row:
    where: str  # "list.csv line 4", for messages
    path: str
    label: Any  # None (no label), str (a name or, in a CSV, maybe an integer) or int


def _csv_rows(file: Path) -> tuple[list[_Row], bool]:
    with open(file, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = [name.strip() for name in reader.fieldnames or []]
        if "path" not in header:
            raise SourceError(
                f"{file}: the header row has no 'path' column (found: {', '.join(header) or 'nothing'}); "
                "name the image column 'path' and the optional label column 'label'"
            )
        reader.fieldnames = header
        has_column = "label" in header
        rows = [
            _Row(f"{file.name} line {reader.line_num}", (row["path"] or "").strip(),
                 (row["label"] or "").strip() if has_column else None)
            for row in reader
        ]
    labelled = any(row.label for row in rows)  # an all-empty label column: unlabelled
    if not labelled:
        for row in rows:
            row.label = None
    return rows, labelled


def _jsonl_rows(file: Path) -> tuple[list[_Row], bool]:
    rows = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{file.name} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exn:
            raise SourceError(f"{where} is not JSON ({exn.msg}); write one object a line: {{\"path\": ..., \"label\": ...}}") from None
        if not isinstance(record, dict) or not isinstance(record.get("path"), str):
            raise SourceError(f"{where} has no \"path\" string; write one object a line: {{\"path\": ..., \"label\": ...}}")
        label = record.get("label")
        if isinstance(label, bool) or not isinstance(label, (str, int, type(None))):
            raise SourceError(f"{where}: label {label!r} must be a class name (string) or an integer")
        rows.append(_Row(where, record["path"], label))
    return rows, any(row.label is not None for row in rows)


def _resolve_paths(rows: Sequence[_Row], base: Path) -> list[Path]:
    """Absolute image paths; every listed file must exist (a typo should stop the write, not
    silently shrink the dataset)."""
    paths, missing = [], []
    for row in rows:
        if not row.path:
            raise SourceError(f"{row.where}: empty path; give the image file (relative to {base} or absolute)")
        path = Path(row.path).expanduser()
        path = path if path.is_absolute() else base / path
        if not path.is_file():
            missing.append((row, path))
        paths.append(path)
    if missing:
        row, path = missing[0]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise SourceError(
            f"{row.where}: image {row.path!r} not found at {path}{more}; paths are relative to the list's "
            "folder or absolute: fix the path or remove the row"
        )
    return paths


def _label_indices(rows: Sequence[_Row], classes: Sequence[str] | None, csv_text: bool) -> tuple[list[int], list[str]]:
    """Label indices and class names (see the module docstring for the rule)."""
    for row in rows:
        if row.label is None or row.label == "":
            raise SourceError(f"{row.where}: no label, but other rows have one; label every row or none")

    def is_int(label: Any) -> bool:
        return isinstance(label, int) or (csv_text and bool(_INT.match(label)))

    kinds = {is_int(row.label) for row in rows}
    if kinds == {True, False}:
        first_int = next(row for row in rows if is_int(row.label))
        first_name = next(row for row in rows if not is_int(row.label))
        raise SourceError(
            f"{first_int.where} has integer label {first_int.label!r} but {first_name.where} has class name "
            f"{first_name.label!r}; use names throughout or integers throughout"
        )
    if kinds == {True}:
        indices = [int(row.label) for row in rows]
        bad = next((row for row, i in zip(rows, indices) if i < 0 or (classes is not None and i >= len(classes))), None)
        if bad is not None:
            allowed = f"0..{len(classes) - 1} (the --classes file)" if classes is not None else "0 or more"
            raise SourceError(f"{bad.where}: label {bad.label!r} is outside {allowed}")
        return indices, list(classes) if classes is not None else [str(i) for i in range(max(indices) + 1)]
    names = list(classes) if classes is not None else sorted({row.label for row in rows})
    lookup = {name: index for index, name in enumerate(names)}
    unknown = next((row for row in rows if row.label not in lookup), None)
    if unknown is not None:
        raise SourceError(f"{unknown.where}: class {unknown.label!r} is not in the --classes file; add it there")
    return [lookup[row.label] for row in rows], names


def list_listing(file: Path, classes: Sequence[str] | None = None) -> Listing:
    """A CSV (header ``path[,label]``) or JSONL (``{"path": ..., "label": ...}``) list of images."""
    suffix = file.suffix.lower()
    rows, labelled = _csv_rows(file) if suffix == ".csv" else _jsonl_rows(file)
    if not rows:
        raise SourceError(f"{file} lists no images; add rows (path[,label])")
    paths = _resolve_paths(rows, file.parent)
    if not labelled:
        if classes is not None:
            raise SourceError(f"--classes given but {file} has no labels; add a 'label' column or drop --classes")
        return _listing([(path, None) for path in paths], [])
    indices, names = _label_indices(rows, classes, csv_text=suffix == ".csv")
    return _listing(list(zip(paths, indices)), names)


# --------------------------------------------------------------------------------------------
# Built-in dataset and the dispatcher
# --------------------------------------------------------------------------------------------


def builtin_listing(split: str, root: str | os.PathLike | None = None) -> Listing:
    """One Fashion-MNIST split as pixel arrays (keys ``{split}_{index:08d}``)."""
    from data.builtin import FASHION_MNIST_CLASSES, fashion_mnist_samples

    return Listing(list(fashion_mnist_samples(split, root)), list(FASHION_MNIST_CLASSES))


def open_listing(src: str, classes: Sequence[str] | None = None) -> Listing:
    """The listing of an image folder or a .csv/.jsonl list (the built-in set: builtin_listing)."""
    path = Path(src).expanduser()
    if path.is_dir():
        return folder_listing(path, classes)
    if path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        return list_listing(path, classes)
    if path.is_file():
        raise SourceError(
            f"SRC {src}: a {path.suffix or 'suffix-less'} file; give an image folder, a .csv or .jsonl list of images, "
            f"or '{BUILTIN}'"
        )
    raise SourceError(
        f"SRC {src} does not exist; give an image folder (SRC/<class>/*.png|jpg), a .csv or .jsonl list of images, "
        f"or '{BUILTIN}'"
    )


# --------------------------------------------------------------------------------------------
# Held-out split
# --------------------------------------------------------------------------------------------


def check_fraction(fraction: float, option: str = "--holdout") -> None:
    if not 0.0 < fraction < 1.0:
        raise SourceError(f"{option} {fraction} is outside (0, 1); give the fraction of samples to hold out, e.g. 0.1")


def holdout_split(listing: Listing, fraction: float, seed: int = 0) -> tuple[Listing, Listing]:
    """(train, val): ``fraction`` of the items to val, drawn per class when labelled (each class
    gives round(fraction * its count)), else over all items; deterministic given ``seed``.

    Both parts keep the listing's order and keys, so they are disjoint by key and by file.
    """
    check_fraction(fraction)
    rng = np.random.default_rng(seed)
    labels = np.array([-1 if label is None else label for _, _, label in listing.items])
    held = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):  # sorted, so the draws do not depend on the listing order
        members = np.flatnonzero(labels == label)
        take = int(round(fraction * len(members)))
        held[rng.permutation(members)[:take]] = True
    if held.all() or not held.any():
        raise SourceError(
            f"--holdout {fraction} of {len(labels)} samples leaves an empty "
            f"{'train' if held.all() else 'val'} split; pick a fraction that holds out at least one sample and keeps one"
        )

    def part(mask: np.ndarray) -> Listing:
        items = [item for item, keep in zip(listing.items, mask) if keep]
        keys = {key for key, _, _ in items}
        return Listing(items, listing.classes, {k: v for k, v in listing.origins.items() if k in keys})

    return part(~held), part(held)
