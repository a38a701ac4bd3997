"""Atomic writes under our own temporary names: the one helper that persistence, the vector store
and the report writers share.

Every file actclust writes first goes to a temporary entry beside its destination (the same file
system, so that ``os.replace`` swaps it in atomically), named ``.<stem>.<32 hex>.actclust-tmp`` so
that no other program's file is ever taken for one of ours. Its writer holds an exclusive
``flock`` on the entry while it works; the kernel drops the lock when the writer's process dies,
so an entry of ours that nobody holds is a leftover of a killed writer, and :func:`clean`
removes exactly those (a live writer's entry, in this process or another, is left alone). The
next write into a folder calls it, so a killed writer's bytes stay on disk only until then.

A written file is fsynced before the rename and its folder after it; it gets the permissions of
any file the user creates (``0o666`` less the umask). An ``OSError`` becomes a
:class:`~actclust.exceptions.StorageError` that names the path and what to do
(:func:`storage_error`), and a failed write removes its temporary entry. POSIX only: where
``fcntl`` is missing, :func:`clean` removes nothing.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import os
import re
import shutil
import stat
import uuid
import weakref
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

from ..exceptions import ActClustError, DiskFullError, RunExistsError, StorageError, StoragePermissionError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

__all__ = ["TEMP_SUFFIX", "is_temp", "temp_path", "Hold", "clean", "temp_dir", "make_temp_dir", "write", "discard_dir",
           "write_into", "publish", "fsync_dir", "file_mode", "storage_error", "guard", "check_can_write", "sha256_file"]

TEMP_SUFFIX = ".actclust-tmp"
_TEMP_RE = re.compile(r"^\.(?P<stem>.+)\.[0-9a-f]{32}" + re.escape(TEMP_SUFFIX) + "$")
_CHUNK = 1 << 20

Content = Union[bytes, str, Callable[[Callable[[bytes], None]], None]]


def is_temp(name: str, stem: Optional[str] = None) -> bool:
    """Whether ``name`` is one of our temporary entries (of ``stem``, when given)."""
    m = _TEMP_RE.match(name)
    return m is not None and (stem is None or m.group("stem") == stem)


def temp_path(parent, stem: str) -> Path:
    """A fresh temporary name of ours in ``parent``, for an entry that will become ``stem``."""
    return Path(parent) / f".{stem}.{uuid.uuid4().hex}{TEMP_SUFFIX}"


def file_mode() -> int:
    """The permissions of a file the user creates: ``0o666`` less the umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


class Hold:
    """An exclusive ``flock`` on a file or folder (``shared``: a shared one, which only exclusive ones wait for), held
    until :meth:`release`, until this object is collected, or until the process ends (the kernel drops it then, also
    after ``kill -9``)."""

    def __init__(self, path, *, wait: bool = True, fd: Optional[int] = None, shared: bool = False):
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)) if fd is None else fd
        # closed with this object from now on: an interrupt between the lock and a later finalizer leaked the locked
        # descriptor, and the next save into the folder waited for it forever
        self._close = weakref.finalize(self, os.close, self.fd)
        if fcntl is not None:
            try:
                fcntl.flock(self.fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
            except BaseException:
                self._close()
                raise

    @classmethod
    def attempt(cls, path) -> Optional["Hold"]:
        """The hold on ``path``, one of our temporary entries (a file or a folder), if nobody else holds it now;
        ``None`` if someone does, it is gone, or it is not a file or folder of ours (a link, a FIFO, a device: left
        alone, never followed nor opened for reading, where a FIFO's open waited for a writer forever)."""
        if fcntl is None:  # pragma: no cover - cannot tell: treat as held
            return None
        try:  # an entry of ours: neither a link followed nor a FIFO waited on (its open blocks for a writer)
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
                         | getattr(os, "O_NONBLOCK", 0))
        except OSError:  # gone, a link (ELOOP), not ours to open
            return None
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            os.close(fd)
            return None
        try:
            return cls(path, wait=False, fd=fd)  # closes fd if the lock is taken
        except OSError:  # held (BlockingIOError)
            return None

    @property
    def held(self) -> bool:
        return self._close.alive

    def release(self) -> None:
        self._close()


def _size(path: Path) -> int:
    if path.is_dir() and not path.is_symlink():
        return sum(_size(p) for p in path.iterdir())
    try:
        return path.lstat().st_size
    except OSError:
        return 0


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean(directory, stem: Optional[str] = None) -> int:
    """Remove our temporary entries in ``directory`` (of ``stem``, when given) that no live writer
    holds; returns the bytes freed. Never touches a name that is not ours."""
    directory = Path(directory)
    freed = 0
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    for name in names:
        if not is_temp(name, stem):
            continue
        path = directory / name
        hold = Hold.attempt(path)
        if hold is None:
            continue
        try:
            freed += _size(path)
            _remove(path)
        finally:
            hold.release()
    return freed


def _still_ours(path: Path, fd: int) -> bool:
    """Whether ``path`` is still the entry ``fd`` holds: a cleaner may take a new entry in the
    instant between its creation and our lock on it, and remove it."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def make_temp_dir(parent, stem: str) -> tuple:
    """``(path, hold)``: a new temporary folder of ours in ``parent``, held by this process until
    ``hold.release()``; the caller removes or renames it."""
    while True:
        path = temp_path(parent, stem)
        path.mkdir()
        try:
            hold = Hold(path)
        except FileNotFoundError:
            continue
        except BaseException:
            path.rmdir()
            raise
        if _still_ours(path, hold.fd):
            return path, hold
        hold.release()


class MadeFolders:
    """The folders :func:`folder` made (the deepest first), and their removal."""

    def __init__(self, path: Path):
        self.path, self.made = path, []
        p = path
        while not os.path.lexists(p) and p != p.parent:
            self.made.append(p)
            p = p.parent

    def remove(self) -> None:
        """Remove the folders made, while empty (whatever another process put there stays); again: nothing."""
        for p in self.made:
            if not os.path.lexists(p):  # never made: a mkdir that failed part way (a name too long, no inodes)
                continue
            try:
                os.rmdir(p)
            except OSError:
                break
        self.made = []


@contextlib.contextmanager
def folder(path) -> Iterator[MadeFolders]:
    """``path`` made a folder (with its missing parents) for the block; if the block fails, the folders it made are
    removed again while empty, so a failed save (a full disk, an interrupt) leaves no empty folder in the user's way.
    A block holding the folder's lock calls ``.remove()`` itself before releasing it (see :func:`hold_folder`)."""
    made = MadeFolders(Path(path))
    try:
        made.path.mkdir(parents=True, exist_ok=True)  # in the block: a mkdir failing part way leaves no parents
        yield made
    except BaseException:
        made.remove()
        raise


def hold_folder(path) -> Hold:
    """The lock on the folder ``path``, made again if it went before we held it: a save that made the folder and
    failed removes it while holding this lock, and the save that waited for the lock then saves into a new one."""
    path = Path(path)
    while True:
        path.mkdir(parents=True, exist_ok=True)
        try:
            hold = Hold(path)
        except FileNotFoundError:
            continue
        if _still_ours(path, hold.fd):
            return hold
        hold.release()


@contextlib.contextmanager
def reading(path) -> Iterator[None]:
    """A shared lock on the folder ``path`` for the block, if it is one: a save into it (which holds the folder's
    lock, exclusively) waits for the block to end, and the block for a save under way, so that what the block reads
    is one save's files (a load while another process saved over the run met files removed under it: an outside
    check). Nothing where the folder does not exist, cannot be opened, or the system has no ``flock``."""
    hold = None
    if fcntl is not None and os.path.isdir(path):  # a folder only: the open of a FIFO waited for a writer forever
        try:
            hold = Hold(path, shared=True)
        except (FileNotFoundError, NotADirectoryError, PermissionError):  # gone, not readable: the reading says so
            hold = None
    try:
        yield
    finally:
        if hold is not None:
            hold.release()


@contextlib.contextmanager
def temp_dir(parent, stem: str = "staging") -> Iterator[Path]:
    """A temporary folder of ours in ``parent`` for the duration of the block, removed after it
    (whatever the caller did not move out of it)."""
    path, hold = make_temp_dir(parent, stem)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        hold.release()


def _write_fd(fd: int, content: "Content") -> str:
    h = hashlib.sha256()

    def write(buffer) -> None:
        view = memoryview(buffer).cast("B")
        h.update(view)
        while len(view):
            view = view[os.write(fd, view):]

    if callable(content):
        content(write)
    else:
        write(content.encode("utf-8") if isinstance(content, str) else content)
    os.fsync(fd)
    return h.hexdigest()


def write_into(path, content: Content) -> str:
    """Write ``content`` to the new file ``path`` (refusing an existing one) and fsync it; returns
    the SHA-256 of the bytes. ``content`` is bytes, text (UTF-8) or ``fn(write)``, which streams
    by calling ``write(buffer)``: nothing is held in memory beyond the caller's buffers."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), file_mode())
    try:
        return _write_fd(fd, content)
    finally:
        os.close(fd)


def publish(source, target, *, replace: bool = True) -> None:
    """Rename ``source`` to ``target`` (atomic within a file system) and make the rename durable. Without
    ``replace``, a ``target`` that exists by then is left as it is (``FileExistsError``): ``source`` is linked in
    under the new name, which fails where it exists, then unlinked; a check before long work left the whole work
    for a file to appear there, and the rename replaced it (an outside check: a user's notes lost to a report)."""
    if replace:
        os.replace(source, target)
    else:
        try:
            os.link(source, target)
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links: the check, then the rename (a moment's race)
            if os.path.lexists(target):
                raise RunExistsError(f"{target} exists; it is left as it is.") from None
            os.replace(source, target)
        else:
            os.unlink(source)
    fsync_dir(Path(target).parent)


def discard_dir(path) -> None:
    """Remove the folder ``path``, renamed first to a temporary entry of ours, in one step: a process killed while it
    removed the files of a run's replaced store left half of it, which no later save recognised as a leftover (the
    folder refused every save after it: an outside check); a killed removal now leaves an entry :func:`clean` removes."""
    path = Path(path)
    doomed = temp_path(path.parent, path.name)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def write(target, content: Content, *, what: str = "file", replace: bool = True) -> str:
    """Write ``target`` atomically: all of ``content`` or, after any failure or a kill, the file as
    it was. Leftovers of earlier killed writes of ``target`` are removed first. Returns the
    SHA-256 of the bytes written. Raises a :class:`StorageError` subclass on a system error, and
    :class:`RunExistsError` without ``replace`` where ``target`` exists by the time the file is complete."""
    target = Path(target)
    with guard(f"write the {what}", target):
        clean(target.parent, target.name)
        while True:
            tmp = temp_path(target.parent, target.name)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)  # ours while we write: clean() elsewhere skips it
            if _still_ours(tmp, fd):
                break
            os.close(fd)
        try:
            digest = _write_fd(fd, content)
            os.fchmod(fd, file_mode())
            try:
                publish(tmp, target, replace=replace)
            except FileExistsError:
                raise RunExistsError(f"{target} appeared while the {what} was being written, and is left as it is; "
                                     "pass overwrite=True (--overwrite) to replace it, or choose another file.") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
    return digest


def fsync_dir(path) -> None:
    """fsync a folder, so that a rename in it survives a power cut (where the file system allows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a folder
        pass
    finally:
        os.close(fd)


def sha256_file(path, on_bytes: Optional[Callable[[int], None]] = None, buffer: Optional[bytearray] = None) -> str:
    """The SHA-256 of a file, read in 1 MiB chunks into one reused buffer (``on_bytes(n)`` after each)."""
    h = hashlib.sha256()
    buf = buffer if buffer is not None else bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
            if on_bytes is not None:
                on_bytes(n)
    return h.hexdigest()


_WHAT_TO_DO = {
    "full": "free space on that disk (or quota), or write to another disk",
    "permission": "choose a folder you may write to, or change its permissions",
    "missing": "check that the folder exists and is a folder on an ordinary disk (not under /proc or /sys)",
    "other": "check the disk and the path, and try again",
}


def storage_error(e: OSError, action: str, path) -> StorageError:
    """The ActClustError for an ``OSError`` raised while trying to ``action`` ``path``."""
    code = getattr(e, "errno", None)
    reason = e.strerror or str(e)
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        cls, todo = DiskFullError, _WHAT_TO_DO["full"]
        reason = f"the disk is full ({reason})"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS) or isinstance(e, PermissionError):
        cls, todo = StoragePermissionError, _WHAT_TO_DO["permission"]
    elif code in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP):
        cls, todo = StorageError, _WHAT_TO_DO["missing"]
    else:
        cls, todo = StorageError, _WHAT_TO_DO["other"]
    err = cls(f"Could not {action} {path}: {reason}. Nothing partial was left behind; {todo}.")
    err.errno = code  # not strerror/filename: OSError would then print those instead of the message
    return err


def check_can_write(path, action: str) -> None:
    """Raise :func:`storage_error` unless something can be written at ``path`` (a folder that exists, or the nearest
    one above it that does): tried by making and removing a temporary entry there, so that a read-only, missing or
    unreachable place (a name too long, say) is said before long work, not after it."""
    path = Path(path)
    with guard(action, path):
        ancestor = next(p for p in (path, *path.parents) if p.is_dir())
        with temp_dir(ancestor, "probe"):
            pass
        longest = os.pathconf(ancestor, "PC_NAME_MAX") if hasattr(os, "pathconf") else 255
        for p in itertools.takewhile(lambda p: p != ancestor, (path, *path.parents)):  # the folders still to make
            if len(os.fsencode(p.name)) > longest:  # the save's mkdir would fail after the work (fit, report)
                raise storage_error(OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG)), action, path)


@contextlib.contextmanager
def guard(action: str, path) -> Iterator[None]:
    """Turn an ``OSError`` raised in the block into :func:`storage_error` (our own errors pass)."""
    try:
        yield
    except ActClustError:
        raise
    except OSError as e:
        raise storage_error(e, action, path) from e
