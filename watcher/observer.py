"""File-system events -> plain notices on a thread-safe queue. No policy here.

The watchdog observer thread calls :class:`NoticeHandler`, which only translates each event into
``Notice(kind, path)`` and puts it on a ``queue.SimpleQueue``; the daemon's main loop decides
what a notice means (settling, ignore rules, batching). Kinds:

``seen``      a file was created or written to (it may still be in progress)
``complete``  a file was closed after writing, or renamed into place (complete now)
``gone``      a file was deleted or renamed away
``dir``       a folder appeared (created or renamed in): scan it
``dir_gone``  a folder was deleted or renamed away
"""
from __future__ import annotations

import logging
import os
import queue
from dataclasses import dataclass

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)

log = logging.getLogger(__name__)

SEEN, COMPLETE, GONE, DIR, DIR_GONE = "seen", "complete", "gone", "dir", "dir_gone"

EVENTS = [DirCreatedEvent, DirDeletedEvent, DirMovedEvent, FileClosedEvent, FileCreatedEvent,
          FileDeletedEvent, FileModifiedEvent, FileMovedEvent]


@dataclass(frozen=True)
class Notice:
    kind: str
    path: str  # absolute


def _str(path: str | bytes) -> str:
    return os.fsdecode(path) if isinstance(path, bytes) else path


class NoticeHandler(FileSystemEventHandler):
    def __init__(self, notices: "queue.SimpleQueue[Notice]") -> None:
        self.notices = notices

    def dispatch(self, event: FileSystemEvent) -> None:  # one entry point for every event
        put = self.notices.put
        src = _str(event.src_path)
        if isinstance(event, (FileMovedEvent, DirMovedEvent)):
            dest = _str(event.dest_path)
            if event.is_directory:
                if src:
                    put(Notice(DIR_GONE, src))
                if dest:
                    put(Notice(DIR, dest))
            else:
                if src:
                    put(Notice(GONE, src))
                if dest:
                    put(Notice(COMPLETE, dest))
        elif isinstance(event, FileClosedEvent):
            put(Notice(COMPLETE, src))
        elif isinstance(event, (FileCreatedEvent, FileModifiedEvent)):
            put(Notice(SEEN, src))
        elif isinstance(event, FileDeletedEvent):
            put(Notice(GONE, src))
        elif isinstance(event, DirCreatedEvent):
            put(Notice(DIR, src))
        elif isinstance(event, DirDeletedEvent):
            put(Notice(DIR_GONE, src))


def start_observer(inbox: str, kind: str, poll_seconds: float,
                   notices: "queue.SimpleQueue[Notice]"):
    """Start a recursive observer on ``inbox``; returns it (call ``.stop()`` and ``.join()``)."""
    handler = NoticeHandler(notices)
    if kind == "polling":
        from watchdog.observers.polling import PollingObserver

        observer = PollingObserver(timeout=poll_seconds)
    else:
        try:
            from watchdog.observers.inotify import InotifyObserver

            # full events: a file renamed in from outside the inbox is a move (complete at once),
            # not a creation
            observer = InotifyObserver(generate_full_events=True)
        except (ImportError, OSError) as exc:  # not Linux, or no inotify instances left
            from watchdog.observers import Observer

            log.info("inotify unavailable (%s); using the platform's default observer", exc)
            observer = Observer()
    try:
        observer.schedule(handler, inbox, recursive=True, event_filter=EVENTS)
        observer.daemon = True
        observer.start()
    except OSError as exc:  # e.g. inotify watch limit (fs.inotify.max_user_watches) reached
        if kind == "polling":
            raise
        log.warning("cannot watch %s natively (%s); falling back to the polling observer",
                    inbox, exc)
        return start_observer(inbox, "polling", poll_seconds, notices)
    return observer
