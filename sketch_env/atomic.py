"""Writing outputs safely: atomic files and directories, and the check before a command writes a directory.

- `atomic_write` (and its bytes/text/JSON forms): write to a temporary file beside the target, then
  rename it over the target, so a crash or Ctrl-C leaves the previous file (or none), never a
  truncated one. `read_json_object` reads such a JSON file back (manifest.json, meta.json, run.json)
  with one-line errors.
- `replace_dir`: the same for a whole directory (a data set, an embedding export): it is built in a
  temporary sibling and swapped in at the end.
- `prepare_output_dir` / `check_output_dir`: a command may only write a directory that is new,
  empty, or already holds output of its own kind; anything else is refused with a one-line
  `DataError` unless the user passes --force. What a command wrote is told by its stamp, not by file
  names someone else's work may share (a `curve.png`, `frame_000.png`, `tune-notes/`): every directory
  a command creates or claims gets `.darp-output.json` ({"kind": ...}, `STAMP`) before anything else,
  so a run killed at any point is still recognised. A directory that is, or holds, one of the
  command's own inputs is never written, not even with --force.
- Links and mount points: `--out LINK` writes where the link points (the link stays); a mount point
  (or the working directory) is emptied and filled in place, since it cannot be renamed.

Everything is created with the user's umask (tempfile alone would make 0600 files and 0700 directories).
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from sketch_env.errors import DataError


def umask() -> int:
    """The process's umask: from /proc where Linux shows it, else by setting and restoring it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)` and rename the result onto `path`.

    DataError naming `path` when it cannot be written (a read-only directory, a full disk)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~umask())
        write(Path(tmp))
        os.replace(tmp, path)
    except OSError as e:
        raise DataError(f"{path}: cannot write ({e.strerror or e})") from None
    finally:
        if tmp is not None and os.path.lexists(tmp):
            Path(tmp).unlink(missing_ok=True)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json_object(path: str | Path, missing: str) -> dict:
    """The JSON object in file `path`. DataError with the message `missing` (what the file's absence
    means and what to do) when there is no such file, else naming the file when it is unreadable, not
    JSON or not an object."""
    path = Path(path)
    if not path.is_file():
        raise DataError(missing)
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


STAMP = ".darp-output.json"  # {"kind": OutputKind.name}: this directory is darp's output of that kind


@dataclass(frozen=True)
class OutputKind:
    """What a command writes into a directory.

    name:    the kind, as the directory's STAMP records it and messages name it ("data set", "RL run", ...).
    markers: the files (glob patterns allowed) that a finished output of this kind has (a data set's
             manifest.json): put in place last when a directory is replaced in place.
    only:    for directories replaced whole (`replace_dir`): the names such a directory holds. One
             that holds anything else is someone's other work too, and is only replaced with force.
    """

    name: str
    markers: tuple[str, ...]
    only: frozenset[str] | None = None


def stamped_kind(directory: str | Path) -> str | None:
    """The kind of darp output `directory` holds by its STAMP, or None (not darp's, or unreadable)."""
    try:
        value = json.loads((Path(directory) / STAMP).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value.get("kind") if isinstance(value, dict) and isinstance(value.get("kind"), str) else None


def stamp(directory: str | Path, kind: OutputKind) -> Path:
    """Mark `directory` as darp's output of `kind` (written atomically; DataError if it cannot be)."""
    return atomic_write_text(Path(directory) / STAMP, json.dumps({"kind": kind.name}) + "\n")


def _absolute(path: str | Path) -> Path:
    """`path` made absolute without resolving links ("." becomes the working directory's own name)."""
    return Path(os.path.abspath(path))


def _is_within(inner: Path, outer: Path) -> bool:
    """Whether `inner` is `outer` or lies inside it, links resolved."""
    inner, outer = Path(os.path.realpath(inner)), Path(os.path.realpath(outer))
    return inner == outer or outer in inner.parents


def check_output_dir(
    out: str | Path, kind: OutputKind, *, inputs: Iterable[str | Path | None] = (), force: bool = False, replace: bool = False
) -> Path:
    """Whether a command may write the directory `out`; returns it as an absolute path, or raises DataError.

    Allowed: `out` does not exist, is an empty directory, or carries the STAMP of `kind` (and, when
    the directory is to be replaced whole (`replace`), holds nothing outside `kind.only`). Anything
    else, a regular file included, only with `force`. Never allowed, whatever `force` says: `out` is,
    or holds, one of `inputs` (files or directories the command reads; None entries are skipped).
    """
    target = _absolute(out)
    for given in inputs:
        if given is None or str(given) == "":
            continue
        same = _is_within(target, given) and _is_within(given, target)
        if same or _is_within(given, target):
            raise DataError(f"{out}: {'is' if same else 'holds'} {given}, an input of this command; choose another output directory")
    _check_writable(out, target)
    if not os.path.lexists(target):
        return target
    if not target.is_dir():
        if force:
            return target
        raise DataError(f"{out}: a file is there, not a directory; choose another output directory or pass --force to replace it")
    try:
        entries = sorted(e.name for e in target.iterdir())
    except OSError as e:
        raise DataError(f"{out}: cannot read the directory ({e.strerror})") from None
    if not entries or force:
        return target
    found = stamped_kind(target)
    entries = [name for name in entries if name != STAMP]
    foreign = [name for name in entries if kind.only is not None and name not in kind.only] if replace else []
    if found == kind.name and not foreign:
        return target
    shown = ", ".join((foreign or entries)[:4]) + (", ..." if len(foreign or entries) > 4 else "")
    if found == kind.name:
        reason = f"holds {shown} besides the {kind.name}"
    elif found is not None:
        reason = f"holds a {found} written by darp, not a {kind.name}"
    else:
        reason = f"holds other work ({shown or STAMP}) and no {kind.name} written by darp"
    action = "replace it" if replace else "write into it"
    raise DataError(f"{out}: {reason}; choose another output directory, or pass --force to {action}")


def _check_writable(out, target: Path) -> None:
    """DataError when the directory `target`, or the nearest existing one above it, cannot be written."""
    probe = target
    while not probe.is_dir() and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise DataError(f"{out}: cannot write into {probe} (Permission denied)")


def prepare_output_dir(
    out: str | Path, kind: OutputKind, *, inputs: Iterable[str | Path | None] = (), force: bool = False
) -> Path:
    """`check_output_dir` for a command that writes files into `out`, then create it (with parents)
    and stamp it as `kind` (which also tells at once whether it can be written).

    With `force`, a regular file at `out` is removed first. Returns `out` as given (a Path).
    """
    target = check_output_dir(out, kind, inputs=inputs, force=force)
    try:
        if os.path.lexists(target) and not target.is_dir():
            target.unlink()
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{out}: cannot create the directory ({e.strerror})") from None
    stamp(target, kind)
    return Path(out)


def replace_dir(
    out: str | Path,
    write: Callable[[Path], None],
    kind: OutputKind | None = None,
    *,
    inputs: Iterable[str | Path | None] = (),
    force: bool = False,
) -> Path:
    """Write a whole directory at once: `write(tmp)` fills a temporary sibling that then replaces `out`.

    A crash before the swap leaves the previous `out` untouched. `kind` (with `inputs`, `force`)
    checks `out` first as `check_output_dir(..., replace=True)` does, and stamps the new directory;
    None for directories that only this project names (an export inside a run). `out` a symbolic
    link: the directory it points to is replaced, the link stays. When `out` holds the working
    directory (`--out .`) or is a mount point (neither can be renamed) the new entries are moved into
    it instead, markers and stamp last. Returns `out` (a Path).
    """
    target = _absolute(out)
    if kind is not None:
        check_output_dir(out, kind, inputs=inputs, force=force, replace=True)
    if os.path.islink(target):
        target = Path(os.path.realpath(target))
    in_place = target.is_dir() and (_is_within(Path.cwd(), target) or os.path.ismount(target))
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target if in_place else target.parent))
        os.chmod(tmp, 0o777 & ~umask())
        write(tmp)
        if kind is not None:
            stamp(tmp, kind)
        if in_place:
            _move_entries(tmp, target, (*kind.markers, STAMP) if kind is not None else ())
        elif os.path.lexists(target):
            _swap(tmp, target)
        else:
            os.replace(tmp, target)
    except OSError as e:
        raise DataError(f"{out}: cannot write the directory ({e.strerror or e})") from None
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return Path(out)


def _swap(new: Path, target: Path) -> None:
    """Put directory `new` in the place of the existing `target`, then delete the old one. On failure
    (EBUSY, EXDEV, ...) `target` is left as it was and nothing else remains beside it (should even
    moving it back fail, the old directory stays in `.NAME.old-XXXX` rather than being deleted)."""
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    try:
        os.replace(target, old / "x")
    except OSError:
        old.rmdir()
        raise
    try:
        os.replace(new, target)
    except OSError:
        os.replace(old / "x", target)
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)


def _move_entries(tmp: Path, target: Path, markers: tuple[str, ...]) -> None:
    """Make `target` hold exactly what `tmp` holds (`tmp` lies inside it), moving markers last.

    The markers go first on the way out, so a crash half-way leaves a directory that does not pass
    for a finished output.
    """
    for pattern in markers:
        for path in target.glob(pattern):
            _remove(path)
    new = {e.name for e in tmp.iterdir()}
    for entry in target.iterdir():
        if entry != tmp and entry.name not in new:
            _remove(entry)
    for name in sorted(new, key=lambda n: any(fnmatch.fnmatch(n, m) for m in markers)):
        if (target / name).is_dir() and not (target / name).is_symlink():
            shutil.rmtree(target / name)
        os.replace(tmp / name, target / name)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()
