"""Durable file operations: every file pawcam writes or moves goes through here.

    write_atomic(path, data)                      # temp beside it, fsync, rename, fsync folder
    write_atomic(path, data, durable=False)       # same, no fsyncs (bulk pictures: speed)
    with atomic_path(model_path) as tmp:          # for writers that want a path (Keras, ONNX)
        model.save(tmp)
    name = write_new(inbox, chunks, "tom.jpg")    # never replaces: "tom (1).jpg" if taken
    rename_noreplace(src, dst)                    # FileExistsError instead of replacing
    move_no_clobber(src, folder, "tom.jpg")       # across file systems too; never overwrites

Readers never see half a file: data goes to a temporary file in the target's folder, which is
renamed over the target once complete (an atomic step on POSIX file systems). ``durable=True``
also fsyncs the data before the rename and the folder after it, so the new file survives a
power cut; ``durable=False`` keeps the atomicity and skips both (for many small files whose
loss on a power cut is acceptable). Whatever fails, the temporary file is removed.

One temp-naming rule (:func:`temp_name`): ``.NAME.PID-RANDOM.tmp`` (+ the target's suffix for
writers that need it, such as Keras' ``.keras``). Hidden (a leading dot) and ending in ``.tmp``,
so the watcher's ``ignore`` patterns skip it; it names its target, so a person or a clean-up
(:func:`is_temp`) can tell what it was; the pid and the random part keep two writers of one
target apart; NAME is cut so that the whole name fits in 255 bytes.

Length: a little over 350 lines on purpose: every file operation that must not lose or clobber
data is here, so that a fix to one (temp naming, fsync order) reaches every writer.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
import secrets
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

NAME_MAX = 255
TEMP_SUFFIX = ".tmp"
#: the temp names of versions before this module (``.tmp-PID-...``): still recognised
LEGACY_TEMP_PREFIX = ".tmp-"
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_TEMP_RE = re.compile(r"^\..*\.\d+-[0-9a-f]{8}\.tmp(\.[^.]*)?$", re.DOTALL)


# -- names --------------------------------------------------------------------------------------
def temp_name(name: str, suffix: str = "") -> str:
    """The temporary name a write of ``name`` uses: ``tom.jpg`` -> ``.tom.jpg.4242-9f0c1ab2.tmp``.

    ``suffix`` is kept at the very end for writers that insist on one (Keras: ``.keras``)."""
    tail = f".{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}{suffix}"
    room = NAME_MAX - 1 - len(os.fsencode(tail))
    return "." + os.fsdecode(os.fsencode(name)[:room]) + tail


def is_temp(name: str) -> bool:
    """Whether ``name`` is a temporary file of :func:`temp_name` (or of an older version)."""
    return name.startswith(LEGACY_TEMP_PREFIX) or bool(_TEMP_RE.match(name))


def fit_name(name: str, limit: int) -> str:
    """``name`` cut to at most ``limit`` bytes (file systems allow 255), keeping a short suffix,
    so that `` (12)`` and ``.error.txt`` still fit."""
    raw = os.fsencode(name)
    if len(raw) <= limit:
        return name
    dot = name.rfind(".")
    suffix = name[dot:] if 0 < dot and len(os.fsencode(name[dot:])) <= 16 else ""
    stem = os.fsencode(name[:len(name) - len(suffix)])[:limit - len(os.fsencode(suffix))]
    return os.fsdecode(stem) + suffix


def numbered_name(name: str, n: int) -> str:
    """``photo.jpg``, 1 -> ``photo (1).jpg``; ``README``, 2 -> ``README (2)``; ``.x``, 1 -> ``.x (1)``."""
    if n == 0:
        return name
    dot = name.rfind(".")
    if dot <= 0:
        return f"{name} ({n})"
    return f"{name[:dot]} ({n}){name[dot:]}"


def free_name(name: str, taken: Callable[[str], bool], limit: int = 100_000) -> str:
    """The first of ``name``, ``name (1)``, ``name (2)`` ... for which ``taken`` is False."""
    for n in range(limit):
        candidate = numbered_name(name, n)
        if not taken(candidate):
            return candidate
    raise FileExistsError(f"no free name for {name!r} after {limit} tries")


# -- fsync --------------------------------------------------------------------------------------
def fsync_dir(path: Path) -> None:
    """Make a folder's entries (new names, renames, unlinks) durable; best effort (some file
    systems cannot open or fsync a folder: then there is nothing more to do)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """fsync a file that someone else wrote (a library's ``save(path)``); a symlink is not
    followed. Errors are raised: unflushed data is a failed write."""
    if os.path.islink(path):
        return
    fd = os.open(path, os.O_RDONLY | _O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _unlink_quietly(path: Path | str, dir_fd: int | None = None) -> None:
    try:
        os.unlink(path, dir_fd=dir_fd)
    except OSError:
        pass


# -- atomic writes ------------------------------------------------------------------------------
def write_atomic(path: Path, data: bytes, durable: bool = True,
                 sync_folder: bool | None = None) -> Path:
    """Replace ``path`` with ``data`` atomically: readers see the old file or the new one, never
    half. ``durable``: fsync the data before the rename and the folder after it.
    ``sync_folder=False`` leaves the folder's fsync to the caller (once for many files: the
    daemon fsyncs its pictures' folder once per batch, before the commit)."""
    path = Path(path)
    tmp = path.with_name(temp_name(path.name))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _O_CLOEXEC, 0o644)
    try:
        try:
            _write_all(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    if durable if sync_folder is None else sync_folder:
        fsync_dir(path.parent)
    return path


@contextmanager
def atomic_path(path: Path, durable: bool = True, keep_suffix: bool = False) -> Iterator[Path]:
    """A temp path to write ``path`` through, for writers that take a path (``model.save``,
    ``onnx.save``, ``shutil.copyfile``): on a clean exit it is fsync'ed (``durable``) and
    renamed over ``path``; on an exception it is removed and ``path`` is untouched.
    ``keep_suffix``: the temp name ends in ``path``'s suffix too (Keras wants ``.keras``)."""
    path = Path(path)
    tmp = path.with_name(temp_name(path.name, path.suffix if keep_suffix else ""))
    try:
        yield tmp
        if durable:
            fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.isdir(tmp) and not os.path.islink(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            _unlink_quietly(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


def write_new(folder: Path, chunks: Iterable[bytes], name: str, durable: bool = True) -> str:
    """Write ``chunks`` into ``folder`` as ``name``, or ``name (1)``, ``name (2)`` ... if taken:
    never replaces a file, and a watcher of ``folder`` sees one complete file appear (the temp
    name is hidden). Returns the name used. An exception (also one raised by ``chunks``, e.g. a
    size limit) leaves nothing behind. ``folder`` itself may be a symlink; nothing below it is
    followed."""
    tmp = temp_name(name)
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | _O_CLOEXEC)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _O_CLOEXEC,
                     0o644, dir_fd=dir_fd)
        try:
            try:
                for block in chunks:
                    _write_all(fd, block)
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            for n in range(10_000):
                final = numbered_name(name, n)
                try:
                    rename_noreplace(Path(folder) / tmp, final, dst_dir_fd=dir_fd)
                    break
                except FileExistsError:
                    continue
            else:  # pragma: no cover - 10,000 files of one name
                raise FileExistsError(f"no free name for {name!r}")
        except BaseException:
            _unlink_quietly(tmp, dir_fd=dir_fd)
            raise
        if durable:
            try:
                os.fsync(dir_fd)
            except OSError:
                pass
        return final
    finally:
        os.close(dir_fd)


# -- renames and moves that never replace -------------------------------------------------------
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100
_libc = None


def _renameat2():
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            getattr(_libc, "renameat2")
        except (OSError, AttributeError):
            _libc = False
    return _libc.renameat2 if _libc else None


def rename_noreplace(src: Path, dst: Path | str, dst_dir_fd: int | None = None) -> None:
    """Atomic rename that fails with FileExistsError instead of replacing ``dst``.

    renameat2(RENAME_NOREPLACE) (Linux >= 3.15 on ext4, xfs, btrfs, tmpfs, ...): atomic, never
    replaces. Where the kernel or file system lacks it (EINVAL/ENOSYS/ENOTSUP: other systems,
    some network and FUSE file systems) the fallback is a check then a rename, which is NOT
    atomic: a file created at ``dst`` between the two is replaced. Into the outbox that needs
    someone else writing there; for the spool's unclaim into the inbox it needs a new drop
    under the same name in that instant (a link + unlink would avoid it but could leave the
    file under both names after a crash, i.e. two rows).
    ``dst_dir_fd``: ``dst`` is a name relative to that folder fd.
    """
    fn = _renameat2()
    if fn is not None:
        rc = fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD if dst_dir_fd is None else dst_dir_fd,
                os.fsencode(dst), _RENAME_NOREPLACE)
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), str(dst))
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(src))
    try:
        os.stat(dst, dir_fd=dst_dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        pass
    else:
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst, dst_dir_fd=dst_dir_fd)


def _same_file(a: Path, st) -> bool:
    try:
        other = os.lstat(a)
    except OSError:
        return False
    return (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino)


def move_no_clobber(src: Path, folder: Path, name: str, also_free: Iterable[str] = (),
                    deferred: list[tuple[Path, Path]] | None = None) -> Path:
    """Move ``src`` (a file or a symlink, never followed) into ``folder`` as ``name``, or
    ``name (1)``, ``name (2)`` ... so that nothing is ever overwritten. Works across file
    systems (copy, fsync, rename, unlink). ``also_free``: suffixes that must be free too
    (the failure sidecar). Idempotent after a crash between link and unlink: a name that is
    already this very file is reused. With ``deferred`` (a list), a hard-linked ``src`` is not
    unlinked yet: ``(src, dst)`` is appended for :func:`complete_moves`, which makes a whole
    batch's new names durable with one fsync per folder before unlinking the old ones."""
    folder.mkdir(parents=True, exist_ok=True)
    suffixes = tuple(also_free)
    name = fit_name(name, NAME_MAX - 6 - max((len(x) for x in suffixes), default=0))
    st = os.lstat(src)

    def taken(candidate: str) -> bool:
        return any(os.path.lexists(folder / (candidate + s)) for s in ("", *suffixes))

    use_link = True
    n = 0
    while True:
        dst = folder / numbered_name(name, n)
        if _same_file(dst, st):             # linked before a crash, not yet unlinked
            if deferred is not None:
                deferred.append((src, dst))
            else:
                os.unlink(src)
            return dst
        if taken(dst.name):
            n += 1
            continue
        try:
            if use_link:
                # link + unlink rather than rename: the inbox watch then sees a deletion, not an
                # unpaired IN_MOVED_FROM (which watchdog holds back 0.5 s, delaying later events)
                try:
                    os.link(src, dst, follow_symlinks=False)
                except OSError as exc:
                    if exc.errno in (errno.EEXIST, errno.EXDEV):
                        raise
                    use_link = False  # not the owner (protected_hardlinks), no hard links, ...
                    continue
                if deferred is not None:
                    deferred.append((src, dst))
                else:
                    fsync_dir(folder)   # the new name is durable before the old one goes
                    os.unlink(src)
            else:
                rename_noreplace(src, dst)
            return dst
        except FileExistsError:
            n += 1
            continue  # lost a race? the next name
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            return _copy_across(src, folder, name, taken)


def complete_moves(deferred: list[tuple[Path, Path]]) -> None:
    """Finish deferred link-moves: fsync each destination folder once, then unlink sources."""
    for folder in {dst.parent for _, dst in deferred}:
        fsync_dir(folder)
    for src, _ in deferred:
        try:
            os.unlink(src)
        except FileNotFoundError:
            pass
    deferred.clear()


class SpecialFileRemoved(OSError):
    """A FIFO, socket or device could not be moved to another file system and was removed."""


def _copy_across(src: Path, folder: Path, name: str, taken) -> Path:
    """The cross-file-system half of :func:`move_no_clobber`: copy (or re-create the symlink)
    under a temp name in ``folder``, fsync, rename to a free name, fsync, unlink ``src``."""
    tmp = folder / temp_name(src.name)
    st = os.lstat(src)
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), tmp)
    elif stat.S_ISREG(st.st_mode):
        try:
            shutil.copyfile(src, tmp, follow_symlinks=False)
            fsync_file(tmp)
        except BaseException:
            _unlink_quietly(tmp)
            raise
    else:  # FIFO, socket, device: nothing to copy across file systems
        os.unlink(src)
        raise SpecialFileRemoved(errno.EXDEV, "special file removed (cannot be copied to "
                                 "another file system)", str(src))
    try:
        while True:
            dst = folder / free_name(name, taken)
            try:
                rename_noreplace(tmp, dst)
                break
            except FileExistsError:
                continue
    except BaseException:
        _unlink_quietly(tmp)
        raise
    fsync_dir(folder)
    os.unlink(src)
    return dst
