"""The exactly-once protocol, all of it: claim, commit, finalize, recover. See README.md,
"Exactly once, across crashes"; the daemon (watcher.daemon) only calls these steps in order.

    inbox/cats/tom.jpg
      -- claim (one fsync'ed manifest per batch, then an atomic rename) -->      Spool.claim
    inbox/.pawcam-processing/<job_id>          + inbox/.pawcam-processing/batch-<id>.json
      -- classify; pictures fsync'ed; ResultsCsv.append (one write + fsync)     Spool.commit
         == the commit point -->
    outbox/processed/cats/tom.jpg  (or deleted)   |   outbox/failed/cats/tom.jpg + tom.jpg.error.txt
      -- manifest deleted once every file of the batch is finalized              Spool.finish

THE rule, decided in one place (:meth:`Spool.settle`, used at start-up and when resuming from
a storage fault): a claimed file whose job id is in the CSV was committed, so it is only
finalized (moved per its recorded status); one whose id is not is classified again under the
same job id (its pictures are simply rewritten). :meth:`Spool.recover` rebuilds the batches a
crash left from their manifests; a manifest entry without a file was either finalized or never
claimed (the file is still in the inbox and is found again).

Longer than the house's ~350 lines on purpose: the protocol is kept whole in one file (claim,
unclaim, commit, finish, settle, recover and the lock), so that README's "Exactly once" section
maps to it and a change to one step is made next to the others it must agree with.
"""
from __future__ import annotations

import errno
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from engine.durable import (SpecialFileRemoved, complete_moves, fsync_dir, is_temp,
                            move_no_clobber, rename_noreplace, write_atomic)
from engine.results import Result, ResultsCsv
from engine.text import printable, shown
from watcher.health import transient

log = logging.getLogger(__name__)

MANIFEST_PREFIX = "batch-"
MANIFEST_SUFFIX = ".json"
SIDECAR_SUFFIX = ".error.txt"
LOCK_NAME = ".lock"


# -- claimed batches ----------------------------------------------------------------------------
@dataclass
class Item:
    job_id: str
    input_path: str           # inbox-relative, '/'-separated: the CSV's input_path (the
    #                           manifests keep the key "rel": files older versions wrote)
    path: Path                # the claimed file, inside the processing area
    ready_at: float = 0.0     # monotonic time it became ready (for latency figures)


@dataclass
class ClaimedBatch:
    batch_id: str
    manifest: Path
    items: list[Item] = field(default_factory=list)
    recovered: bool = False
    #: a file of this batch could not be moved out at recovery: the manifest must outlive the
    #: batch's other files so that the next start still knows that file's job id
    keep_manifest: bool = False


class Spool:
    """Claims files out of the inbox and puts them where they belong afterwards."""

    def __init__(self, inbox: Path, processing: Path, processed: Path, failed: Path,
                 delete_on_success: bool = False) -> None:
        self.inbox = inbox
        self.processing = processing
        self.processed = processed
        self.failed = failed
        self.delete_on_success = delete_on_success
        processing.mkdir(exist_ok=True)

    def lock(self) -> int:
        """Take the inbox for this process (flock on the processing area's lock file); a second
        daemon on the same inbox would take over files this one is working on. Returns the fd
        to keep open; raises BlockingIOError with the holder's pid in the message."""
        import fcntl

        fd = os.open(self.processing / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise BlockingIOError(f"another pawcam watch (pid {holder}) is using this inbox")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    # -- claim --------------------------------------------------------------------------------
    def claim(self, batch_id: str, entries: list[tuple[str, str, float]]) -> ClaimedBatch:
        """Claim ``(job_id, rel, ready_at)`` entries: manifest first (fsync'ed), then renames.

        Files that vanished meanwhile are skipped quietly; other rename failures are logged
        and skipped (they stay in the inbox and are tried again at the next rescan).
        """
        manifest = self.processing / f"{MANIFEST_PREFIX}{batch_id}{MANIFEST_SUFFIX}"
        body = {"batch": batch_id, "entries": [{"job_id": j, "rel": r} for j, r, _ in entries]}
        write_atomic(manifest, json.dumps(body, ensure_ascii=True).encode("ascii"))
        batch = ClaimedBatch(batch_id, manifest)
        folders: dict[str, int | OSError] = {}   # rel folder -> fd opened without symlinks
        try:
            for job_id, rel, ready_at in entries:
                folder, _, name = rel.rpartition("/")
                if folder not in folders:
                    folders[folder] = self._open_folder(folder)
                fd = folders[folder]
                try:
                    if isinstance(fd, OSError):
                        raise fd
                    os.rename(name, self.processing / job_id, src_dir_fd=fd)
                except FileNotFoundError:
                    log.debug("%s vanished before it could be claimed", shown(rel))
                    continue
                except OSError as exc:
                    log.warning("cannot claim %s (left in the inbox): %s", shown(rel),
                                exc.strerror or exc)
                    continue
                batch.items.append(Item(job_id, rel, self.processing / job_id, ready_at))
            # make the renames durable before any result can be committed for them
            fsync_dir(self.processing)
            for fd in folders.values():
                if not isinstance(fd, OSError):
                    try:
                        os.fsync(fd)
                    except OSError:
                        pass
        finally:
            for fd in folders.values():
                if not isinstance(fd, OSError):
                    os.close(fd)
        if not batch.items:
            self.drop_manifest(batch)
        return batch

    def _open_folder(self, rel_folder: str) -> int | OSError:
        """An fd of the inbox folder ``rel_folder`` reached component by component without
        following a symlink (the inbox itself may be one), or the error: a folder swapped for a
        symlink after its files were seen must not make the claim take files from elsewhere."""
        flags = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(self.inbox, flags)
        except OSError as exc:
            return exc
        for part in (p for p in rel_folder.split("/") if p):
            try:
                if part in (".", ".."):
                    raise OSError(errno.EINVAL, "'.' or '..' in the path")
                try:
                    sub = os.open(part, flags | os.O_NOFOLLOW, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise OSError(exc.errno, f"{part!r} on its path is not a folder "
                                      "(a symbolic link? links are never followed)") from None
                    raise
            except OSError as exc:
                os.close(fd)
                return exc
            os.close(fd)
            fd = sub
        return fd

    def unclaim(self, batch: ClaimedBatch) -> None:
        """Give a claimed, unprocessed batch back to the inbox (clean stop). Like the claim,
        never through a folder that has become a symlink (the file then stays for recovery)."""
        for item in batch.items:
            folder, _, name = item.input_path.rpartition("/")
            try:
                if folder:
                    (self.inbox / folder).mkdir(parents=True, exist_ok=True)
                fd = self._open_folder(folder)
                if isinstance(fd, OSError):
                    raise fd
                try:
                    rename_noreplace(item.path, name, dst_dir_fd=fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                log.info("%s stays in the processing area for the next start (%s)",
                         shown(item.input_path), exc.strerror or exc)
                return  # keep the manifest: recovery will take it
        fsync_dir(self.processing)
        self.drop_manifest(batch)

    def drop_manifest(self, batch: ClaimedBatch) -> None:
        try:
            os.unlink(batch.manifest)
        except FileNotFoundError:
            pass

    # -- finalize -----------------------------------------------------------------------------
    def finalize(self, item: Item, ok: bool, error: str = "",
                 deferred: list[tuple[Path, Path]] | None = None) -> str:
        """After the commit: move (or delete) the claimed file; returns where it went.
        ``deferred``: see :func:`engine.durable.move_no_clobber` (then call
        :func:`engine.durable.complete_moves`)."""
        if ok and self.delete_on_success:
            try:
                os.unlink(item.path)
            except FileNotFoundError:
                pass
            return "deleted"
        root = self.processed if ok else self.failed
        suffixes = () if ok else (SIDECAR_SUFFIX,)
        rel_parent, _, name = item.input_path.rpartition("/")
        try:
            try:
                dst = move_no_clobber(item.path, root / rel_parent, name, suffixes, deferred)
            except SpecialFileRemoved:
                raise
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM,
                                 errno.EIO):
                    raise
                # e.g. processed/sub is a file from an earlier drop named "sub": flatten it
                flat = item.input_path.replace("/", "__")
                log.info("cannot place %s under %s (%s); using %s", shown(item.input_path),
                         root,
                         exc.strerror or exc, shown(flat))
                dst = move_no_clobber(item.path, root, flat, suffixes, deferred)
        except SpecialFileRemoved:
            return "removed (a FIFO, socket or device cannot be moved to another file system)"
        if ok:
            return str(dst)
        text = (f"{printable(item.input_path)}\n"
                f"job_id: {item.job_id}\n"
                f"error: {printable(error) or 'unknown error'}\n")
        try:
            write_atomic(dst.with_name(dst.name + SIDECAR_SUFFIX), text.encode("utf-8"),
                         durable=False)
        except OSError as exc:
            log.warning("cannot write the failure note for %s: %s", shown(item.input_path), exc)
        return str(dst)

    # -- commit -------------------------------------------------------------------------------
    def commit(self, csv: ResultsCsv, results: list[Result], outbox: Path) -> None:
        """THE COMMIT of a classified batch: its pictures (under ``outbox``) made durable by an
        fsync of their folders, then all its rows appended to ``csv`` in one write + fsync
        (rolled back if it fails). Before it, a crash redoes the batch under the same job ids;
        after it, the batch is only finalized. Raises OSError (nothing committed)."""
        for folder in {(outbox / p).parent for r in results for p in r.pictures.values()}:
            fsync_dir(folder)
        csv.append(results)

    def finish(self, batch: ClaimedBatch, results: list[Result]) -> "Outcome":
        """After the commit: finalize every file of ``batch`` (``results`` in the same order;
        the new names made durable with one fsync per folder), then drop the manifest.
        ``Outcome.where``: where each file went, in the batch's order."""
        deferred: list[tuple[Path, Path]] = []
        out = Outcome()
        self._move_out(batch, [(i, r.ok, r.error) for i, r in zip(batch.items, results)], out,
                       deferred)
        try:
            complete_moves(deferred)
        except OSError as exc:
            batch.keep_manifest = True
            log.error("cannot finish moving the batch's files: %s (done at the next start)", exc)
        if not out.waiting and not batch.keep_manifest:
            self.drop_manifest(batch)
        return out

    # -- recovery -----------------------------------------------------------------------------
    def settle(self, batches: list[ClaimedBatch], csv: ResultsCsv) -> "Outcome":
        """Claimed batches whose fate is unknown (a crash, a rolled-back or half-finalized
        batch): THE exactly-once rule. Files whose job id is in ``csv`` were committed and are
        only finalized (per their recorded status); the others come back in ``Outcome.redo``,
        to be classified again under the same job id."""
        outcomes = csv.outcomes({item.job_id for b in batches for item in b.items})
        out = Outcome()
        for batch in batches:
            committed = [(i, *outcomes[i.job_id]) for i in batch.items if i.job_id in outcomes]
            first, waiting = len(out.where), len(out.waiting)
            self._move_out(batch, [(i, status == "ok", error) for i, status, error in committed],
                           out)
            for (item, _, _), where in zip(committed, out.where[first:]):
                if not where.startswith("("):     # (not vanished, waiting or stuck)
                    log.info("recovered %s: already in the results; -> %s [%s]",
                             shown(item.input_path), self.shown_place(where), item.job_id)
            batch.items = [i for i in batch.items if i.job_id not in outcomes]
            if batch.items:
                for item in batch.items:   # (one summary line is logged by the caller)
                    log.debug("retrying %s: classifying it again [%s]", shown(item.input_path),
                              item.job_id)
                out.redo.append(batch)
            elif not batch.keep_manifest and len(out.waiting) == waiting:
                self.drop_manifest(batch)
        return out

    def _move_out(self, batch: ClaimedBatch, committed: list[tuple[Item, bool, str]],
                  out: "Outcome", deferred: list[tuple[Path, Path]] | None = None) -> None:
        """Finalize ``(item, ok, error)`` of committed files of ``batch``. A storage fault
        keeps the file aside (``Outcome.waiting``, ``fault``: settled again once the fault is
        gone); any other failure keeps the manifest, so that the next start moves the file on
        instead of classifying it again under a new job id (a second row). Recorded in
        ``out``."""
        waiting = []
        for item, ok, error in committed:
            try:
                where = self.finalize(item, ok, error, deferred)
                out.done += 1
            except FileNotFoundError:
                if os.path.lexists(item.path):
                    raise
                out.done += 1
                where = "(vanished from the processing area: the inbox was removed?)"
                log.warning("%s vanished from the processing area before it could be moved "
                            "out (the inbox or its processing area was removed?); its row is "
                            "in the results", shown(item.input_path))
            except OSError as exc:
                if transient(exc):
                    out.fault = out.fault or exc
                    waiting.append(item)
                    where = "(waits in the processing area until the storage fault is gone)"
                else:
                    batch.keep_manifest = True
                    out.stuck += 1
                    where = (f"(left in processing area, {exc.strerror or exc}; moved at next "
                             "start)")
                    log.error("cannot move %s out of the processing area: %s (tried again at "
                              "the next start)", shown(item.input_path), exc)
            out.where.append(where)
        if waiting:
            out.waiting.append(ClaimedBatch(batch.batch_id, batch.manifest, waiting,
                                            recovered=batch.recovered))

    def shown_place(self, where: str) -> str:
        """Where :meth:`finalize` put a file, for a log line: relative to the outbox."""
        if not where.startswith("/"):
            return where
        try:
            return printable(os.path.relpath(where, os.path.commonpath([self.processed,
                                                                         self.failed])))
        except ValueError:
            return where

    def recover(self, new_job_id: Callable[[], str], csv: ResultsCsv) -> "Outcome":
        """Start-up: the batches a crash left in the processing area, settled (see
        :meth:`settle`)."""
        return self.settle(self.left_behind(new_job_id, csv), csv)

    def left_behind(self, new_job_id: Callable[[], str], csv: ResultsCsv) -> list[ClaimedBatch]:
        """Batches a crash left in the processing area, rebuilt from their manifests.

        Temp files are removed; entries whose file is gone are dropped; claimed files that no
        manifest mentions (should not happen) are named after their job id: one that ``csv``
        already has keeps it (so :meth:`settle` only moves it on, never gives it a second row);
        any other gets a fresh job id, ``recovered/<name>`` as its path.
        """
        batches: list[ClaimedBatch] = []
        known: set[str] = set()
        data: set[str] = set()
        for entry in sorted(os.listdir(self.processing)):
            path = self.processing / entry
            if entry == LOCK_NAME:
                continue
            if is_temp(entry):
                os.unlink(path)
            elif entry.startswith(MANIFEST_PREFIX) and entry.endswith(MANIFEST_SUFFIX):
                try:
                    body = json.loads(path.read_text(encoding="ascii"))
                    batch = ClaimedBatch(body["batch"], path, recovered=True)
                    for e in body["entries"]:
                        known.add(e["job_id"])
                        item_path = self.processing / e["job_id"]
                        if os.path.lexists(item_path):
                            batch.items.append(Item(e["job_id"], e["rel"], item_path))
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    log.error("unreadable manifest %s (%s); its files are handled as unknown",
                              path, exc)
                    continue
                if batch.items:
                    batches.append(batch)
                else:
                    os.unlink(path)
            else:
                data.add(entry)
        orphans = sorted(data - known)
        if orphans:
            done = set(csv.outcomes(set(orphans)))
            batch_id = "orphans-" + new_job_id()
            entries = []
            for name in orphans:
                rel = f"recovered/{name}"
                if name in done:        # committed, but moving it out failed: keep its job id
                    job_id = name
                    log.warning("%s in the processing area had no manifest but is already in "
                                "the results; moving it on", shown(name))
                else:
                    job_id = new_job_id()
                    os.rename(self.processing / name, self.processing / job_id)
                    log.warning("%s in the processing area had no manifest; processing it as %s",
                                shown(name), shown(rel))
                entries.append((job_id, rel))
            manifest = self.processing / f"{MANIFEST_PREFIX}{batch_id}{MANIFEST_SUFFIX}"
            write_atomic(manifest, json.dumps(
                {"batch": batch_id, "entries": [{"job_id": j, "rel": r} for j, r in entries]},
                ensure_ascii=True).encode("ascii"))
            batches.append(ClaimedBatch(batch_id, manifest,
                                        [Item(j, r, self.processing / j) for j, r in entries],
                                        recovered=True))
        return batches


@dataclass
class Outcome:
    """What :meth:`Spool.finish` or :meth:`Spool.settle` did with claimed files: ``where``
    each committed file went (in order), ``done`` how many were finalized, ``stuck`` how many
    could not be moved (the next start tries again), ``waiting`` the committed files a storage
    ``fault`` kept in the processing area, ``redo`` (settle) the batches to classify again
    under the same job ids."""

    where: list[str] = field(default_factory=list)
    done: int = 0
    stuck: int = 0
    waiting: list[ClaimedBatch] = field(default_factory=list)
    redo: list[ClaimedBatch] = field(default_factory=list)
    fault: OSError | None = None

    @property
    def redo_count(self) -> int:
        return sum(len(b.items) for b in self.redo)
