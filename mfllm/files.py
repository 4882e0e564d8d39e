"""Writes that never leave a half-written file: temp file in the same folder, fsync, os.replace, fsync the folder.

The one copy of this mechanism: run directories, label caches, checkpoints, exports and bench results use it.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def temp_path(path: Path) -> Path:
    """A temp name beside ``path`` (same folder, so os.replace is atomic), unique per process and thread."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temp file for writing; on a clean exit it replaces ``path`` atomically, on an error it is removed."""
    path = Path(path)
    tmp = temp_path(path)
    binary = "b" in mode
    try:
        with open(tmp, mode, **({} if binary else {"encoding": encoding})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=indent) + "\n")


def fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Folders (a checkpoint, a tokenizer, a model written by save_pretrained): the same idea one level up.


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder beside ``path`` to fill; on a clean exit it replaces ``path`` (the old folder is
    renamed to ``<name>.old`` first and removed after; :func:`recover_dir` undoes a kill between the two
    renames), on an error it is removed."""
    path = Path(path)
    tmp = temp_path(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(path.name + ".old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(path: str | os.PathLike) -> None:
    """Put ``<name>.old`` back when a kill fell between :func:`atomic_dir`'s two renames."""
    path = Path(path)
    old = path.with_name(path.name + ".old")
    if not path.exists() and old.is_dir():
        os.replace(old, path)


def move_files(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move every file of a finished folder ``src`` (same file system) into ``dst``, each one atomically, and
    remove ``src``: for files written by a library into a folder that holds other files too."""
    src, dst = Path(src), Path(dst)
    _fsync_tree(src)
    for f in src.iterdir():
        os.replace(f, dst / f.name)
    fsync_dir(dst)
    shutil.rmtree(src, ignore_errors=True)


def _fsync_tree(d: Path) -> None:
    for f in d.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
