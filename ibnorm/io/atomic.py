"""Write output directories atomically and survive faults.

* The work happens in a temporary sibling ``.NAME.tmp-PID-RANDOM`` that carries a marker file
  (PID and process start time); it becomes ``NAME`` by one rename only if the work succeeds.
* SIGTERM is turned into ``KeyboardInterrupt`` during the work, so ``kill`` cleans up like Ctrl-C.
  SIGKILL and power loss cannot be caught: a later run in the same directory (or ``ibnorm clean``)
  removes temporary directories whose process is gone, recognised by the marker.
* ``--out`` may not be, contain or sit inside the source; it may not be (or contain) the current directory.
* Parent directories created for the output are removed again on failure.
* Files get the mode ``open()`` would give them under the process umask (0644 by default):
  safetensors' writer creates its files 0600.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..errors import OutputError, OutputExistsError

MARKER = ".ibnorm-tmp.json"
_TMP_INFIX = ".tmp-"
_OLD_INFIX = ".old-"
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


# ----------------------------------------------------------------------------- processes


def process_start_time(pid: int) -> float | None:
    """The start time of process ``pid`` (seconds since the epoch), or None if there is no such process."""
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # psutil.NoSuchProcess, AccessDenied, or psutil missing
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return -1.0  # exists, owned by someone else
        return -1.0


def _alive(pid: int, started: float | None) -> bool:
    now = process_start_time(pid)
    if now is None:
        return False
    if now < 0 or started is None:
        return True  # cannot tell a reused PID apart: keep the directory
    return abs(now - started) < 1.0  # a different start time: the PID was reused, the writer is gone


def current_umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:  # os.umask can only be read by setting it
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


_UMASK_LOCK = threading.Lock()


# ----------------------------------------------------------------------------- SIGTERM


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt (so cleanup runs as for Ctrl-C).

    Only the main thread can install signal handlers; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ----------------------------------------------------------------------------- path checks


def _within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_out_path(out: str | Path, source: str | Path | None = None) -> Path:
    """The absolute output path; refuses an output that is, contains or sits inside the source, or that is
    (or contains) the current directory (replacing it with ``--force`` would delete the user's working directory)."""
    out_abs = Path(os.path.abspath(out))
    resolved = Path(os.path.realpath(out_abs))
    cwd = Path(os.path.realpath(os.getcwd()))
    if _within(cwd, resolved):
        raise OutputError(f"--out {out} is the current directory or contains it; choose a new directory")
    if out_abs.name in ("", ".", ".."):
        raise OutputError(f"--out {out} has no directory name")
    if source is not None and Path(source).exists():
        src = Path(os.path.realpath(source))
        if _within(resolved, src) and (src.is_dir() or resolved == src):
            raise OutputError(f"--out {out} is inside the source {source}; write the output elsewhere")
        if _within(src, resolved):
            raise OutputError(f"--out {out} contains the source {source}; write the output elsewhere")
    return out_abs


# ----------------------------------------------------------------------------- stale temporaries


def _is_temporary_name(name: str) -> bool:
    return name.startswith(".") and (_TMP_INFIX in name or _OLD_INFIX in name)


def _read_marker(d: Path) -> dict | None:
    try:
        m = json.loads((d / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and isinstance(m.get("pid"), int) else None


def _pid_from_name(name: str) -> int | None:
    # ".NAME.old-PID-RANDOM": the previous output moved aside during the final swap
    tail = name.rsplit(_OLD_INFIX, 1)[-1].split("-", 1)[0]
    return int(tail) if tail.isdigit() else None


def is_stale(d: Path) -> bool:
    """A temporary directory left by an ibnorm process that no longer runs."""
    if not d.is_dir() or d.is_symlink() or not _is_temporary_name(d.name):
        return False
    marker = _read_marker(d)
    if marker is not None:
        return not _alive(marker["pid"], marker.get("start"))
    if _OLD_INFIX in d.name:
        pid = _pid_from_name(d.name)
        return pid is not None and process_start_time(pid) is None
    return False  # no marker: not ours, or not yet written; never delete it


@dataclass
class CleanReport:
    removed: list[str] = field(default_factory=list)
    kept_running: list[str] = field(default_factory=list)
    freed_bytes: int = 0


def _size(d: Path) -> int:
    total = 0
    for root, _, files in os.walk(d):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def clean(directory: str | Path, dry_run: bool = False) -> CleanReport:
    """Remove the temporary directories of dead ibnorm processes directly inside ``directory``."""
    root = Path(directory)
    if not root.is_dir():
        raise OutputError(f"not a directory: {directory}")
    report = CleanReport()
    for d in sorted(root.iterdir()):
        if not _is_temporary_name(d.name) or not d.is_dir():
            continue
        if is_stale(d):
            report.freed_bytes += _size(d)
            report.removed.append(str(d))
            if not dry_run:
                shutil.rmtree(d, ignore_errors=True)
        elif _read_marker(d) is not None:
            report.kept_running.append(str(d))
    return report


# ----------------------------------------------------------------------------- the atomic directory


def _make_parents(parent: Path) -> list[Path]:
    """Create ``parent`` and its missing ancestors; returns those created, deepest first."""
    created = []
    p = parent
    while not p.exists():
        created.append(p)
        p = p.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _remove_created(created)
        raise OutputError(f"cannot create {parent}: {e.strerror}") from None
    return created


def _remove_created(created: list[Path]) -> None:
    for p in created:  # deepest first; only if still empty (never remove what someone else put there)
        try:
            p.rmdir()
        except OSError:
            break


def _apply_umask(tmp: Path) -> None:
    """Give every file and directory the mode a plain ``open``/``mkdir`` would give it under the umask."""
    mask = current_umask()
    fmode, dmode = 0o666 & ~mask, 0o777 & ~mask
    os.chmod(tmp, dmode)
    for root, dirs, files in os.walk(tmp):
        for d in dirs:
            os.chmod(os.path.join(root, d), dmode)
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                os.chmod(p, fmode)


def _write_marker(tmp: Path, out: Path) -> None:
    pid = os.getpid()
    (tmp / MARKER).write_text(json.dumps({"pid": pid, "start": process_start_time(pid), "target": str(out),
                                          "created": time.time()}))


def _as_output_error(e: OSError, out: Path, tmp: Path) -> OutputError | None:
    """Disk full, read-only, permission: one line instead of a traceback (only for writes under the output)."""
    name = str(e.filename or "")
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) or (e.errno in _WRITE_ERRNOS and name.startswith(str(tmp))):
        return OutputError(f"cannot write {out}: {e.strerror or e}")
    return None


def _prepare(out: str | Path, force: bool, source: str | Path | None) -> tuple[Path, list[Path], Path]:
    out = check_out_path(out, source)
    if out.exists() or out.is_symlink():
        if not force:
            raise OutputExistsError(f"{out} already exists; pass --force to replace it")
        if not out.is_dir() or out.is_symlink():
            raise OutputExistsError(f"{out} exists and is not a directory")
    created = _make_parents(out.parent)
    clean(out.parent)  # leftovers of killed runs next to this output
    tmp = out.parent / f".{out.name}{_TMP_INFIX}{os.getpid()}-{secrets.token_hex(3)}"
    try:
        tmp.mkdir()
        _write_marker(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_created(created)
        raise OutputError(f"cannot write {out}: {e.strerror}") from None
    return out, created, tmp


def _commit(tmp: Path, out: Path) -> None:
    (tmp / MARKER).unlink()
    _apply_umask(tmp)
    if out.exists():
        old = out.parent / f".{out.name}{_OLD_INFIX}{os.getpid()}-{secrets.token_hex(3)}"
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old, out)  # put the previous output back
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


@contextmanager
def atomic_directory(out: str | Path, force: bool, *, source: str | Path | None = None) -> Iterator[Path]:
    """Yield a temporary sibling directory that becomes ``out`` only if the block succeeds.

    On any failure (exception, Ctrl-C, SIGTERM) the temporary directory and the parents created
    for it are removed and ``out`` is left as it was.  Disk-full, read-only and permission errors
    while writing become one-line :class:`OutputError`.
    """
    out, created, tmp = _prepare(out, force, source)
    try:
        with sigterm_as_interrupt():
            yield tmp
            _commit(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_created(created)
        if isinstance(e, OSError):
            err = _as_output_error(e, out, tmp)
            if err is not None:
                raise err from None
        raise
