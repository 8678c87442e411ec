"""The export folder's staging: built hidden beside the destination, renamed into place, under a lock.

- `--force` replaces only a folder that holds this tool's manifest.json; anything else is refused, naming what is
  inside it, so a mistyped --output never deletes a user's files.
- A lock file beside the destination makes a second export to the same folder fail at once, and the commit
  refuses a destination that appeared meanwhile: never two successes for one folder.
- An interrupted export leaves no folder that looks complete; a staging folder a killed run left behind is removed
  by the next export to the same destination.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from partialnet.errors import DeployError, UsageError
from partialnet.files import DIR_MODE, write_error

MANIFEST = "manifest.json"
EXPORT_KEYS = ("variant", "input_size", "preprocess", "artifacts")  # what every manifest this tool writes holds


def is_export_folder(folder: Path) -> bool:
    """Does `folder` hold a manifest.json written by `deploy export`?"""
    try:
        doc = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and all(k in doc for k in EXPORT_KEYS)


def describe_contents(folder: Path, limit: int = 5) -> str:
    """'a.txt, notes/ and 3 more': what a folder holds, briefly."""
    try:
        entries = sorted(folder.iterdir())
    except OSError as e:
        return f"unreadable: {e.strerror}"
    if not entries:
        return "nothing"
    shown = ", ".join(p.name + ("/" if p.is_dir() else "") for p in entries[:limit])
    return shown + (f" and {len(entries) - limit} more" if len(entries) > limit else "")


def _refuse_unless_replaceable(dest: Path) -> None:
    if not dest.is_dir():
        raise UsageError(f"{dest} exists and is not a folder; choose another --output.")
    if any(dest.iterdir()) and not is_export_folder(dest):
        raise UsageError(
            f"{dest} is not an export folder (no manifest.json from 'deploy export'; it holds "
            f"{describe_contents(dest)}); --force replaces only export folders. Choose another --output, or move "
            f"its contents away yourself."
        )


def _refuse_holding(dest: Path, what: str, path: Path) -> None:
    if path == dest or dest in path.parents:
        raise UsageError(f"--output {dest} {what} ({path}); replacing it would lose that. Choose another --output.")


class FolderLock:
    """An exclusive, non-blocking lock on `.NAME.lock` beside a folder; the kernel drops it if the process dies."""

    def __init__(self, dest: Path):
        self.path = dest.with_name(f".{dest.name}.lock")
        self.dest = dest
        self._fd: int | None = None

    def acquire(self) -> "FolderLock":
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise write_error(self.path, e) from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise DeployError(
                        f"another 'deploy export' is writing {self.dest} right now (it holds {self.path}); wait for it "
                        f"to finish, or choose another --output."
                    ) from None
                raise write_error(self.path, e) from e
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # else the previous holder unlinked it between our open and our lock: take the new one
                self._fd = fd
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return self
            os.close(fd)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None


class ExportStaging:
    """A hidden folder beside `dest` that becomes `dest` on commit and disappears on failure.

    `inputs` are paths the export reads (checkpoint, data): a destination holding one of them is refused.
    """

    def __init__(self, dest: Path, force: bool, inputs: Iterable[str | Path | None] = ()):
        dest = Path(dest)
        shown = dest
        dest = Path(os.path.abspath(dest))
        if dest == Path(dest.anchor) or dest == Path.home():
            raise UsageError(f"--output {shown} is {dest}; an export needs a folder of its own.")
        cwd = Path.cwd()
        if dest == cwd or dest in cwd.parents:
            raise UsageError(f"--output {shown} is the current folder{'' if dest == cwd else ' or holds it'} ({dest}); "
                             f"an export is a new folder of its own: pass a name such as exports/model.")
        for p in inputs:
            if p:
                _refuse_holding(dest, "holds an input of this export", Path(os.path.abspath(p)))
        if (dest.exists() or dest.is_symlink()) and not force:
            raise UsageError(f"{shown} exists; pass --force to overwrite it, or choose another --output.")
        if dest.exists() and force:
            _refuse_unless_replaceable(dest)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise write_error(dest.parent, e) from e
        self.dest, self.force, self.shown = dest, force, shown
        self.lock = FolderLock(dest).acquire()
        try:
            # Under the lock: re-check (another export may have just committed), and clear what killed runs left.
            if dest.exists() and not force:
                raise UsageError(f"{shown} exists; pass --force to overwrite it, or choose another --output.")
            for stale in dest.parent.glob(f".{dest.name}.*.partial"):
                shutil.rmtree(stale, ignore_errors=True)
            try:
                self.path = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
            except OSError as e:
                raise write_error(dest.parent, e) from e
            os.chmod(self.path, DIR_MODE)
        except BaseException:
            self.lock.release()
            raise

    def commit(self) -> None:
        """Rename the staging folder onto the destination; refuse one that appeared (or changed kind) meanwhile."""
        try:
            old = None
            if self.dest.exists() or self.dest.is_symlink():
                if not self.force:
                    raise DeployError(
                        f"{self.shown} appeared while this export ran (made by another process); it was kept and this "
                        f"export discarded. Choose another --output, or pass --force to replace it."
                    )
                _refuse_unless_replaceable(self.dest)
                old = self.dest.with_name(f".{self.dest.name}.old-{os.getpid()}")
                os.replace(self.dest, old)
            os.replace(self.path, self.dest)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            self.discard()
            raise
        self.lock.release()

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self.lock.release()
