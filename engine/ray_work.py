"""The work list of a Ray run: one input per line in a file, cut into chunks by byte range.

    total, offsets = write_list(inputs, run_dir / "inputs.list", step=32)
    items = chunks(offsets, step=32, per_chunk=256)   # [{first, start, end}, ...] for Ray Data
    seq, follow, path = decode_line(line)             # on the actor, reading its chunk

The driver writes the list as it lists the inputs (never holding them all); Ray Data carries
only the chunks' three numbers; each actor reads its own byte range back
(:mod:`engine.ray_actor`). A line is ``seq TAB follow TAB base64(path)``, so any file name
(newlines, undecodable bytes) survives.
"""
from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Iterable


def encode_line(seq: int, path: Path, follow: bool) -> bytes:
    return b"%d\t%d\t%s\n" % (seq, int(follow), base64.b64encode(os.fsencode(path)))


def decode_line(line: bytes) -> tuple[int, bool, str]:
    seq, follow, raw = line.rstrip(b"\n").split(b"\t")
    return int(seq), follow == b"1", os.fsdecode(base64.b64decode(raw))


def write_list(inputs: Iterable[tuple[Path, bool]], list_path: Path,
               step: int) -> tuple[int, list[int]]:
    """Write ``inputs`` to ``list_path``; return the count and the byte offset of every
    ``step``-th line (and of the end), for cutting the list into chunks afterwards."""
    offsets = [0]
    n = 0
    with open(list_path, "wb") as fh:
        for path, follow in inputs:
            n += 1
            fh.write(encode_line(n, path, follow))
            if n % step == 0:
                offsets.append(fh.tell())
        if n % step:
            offsets.append(fh.tell())
    return n, offsets


def chunks(offsets: list[int], step: int, per_chunk: int) -> list[dict[str, int]]:
    """``{first, start, end}``: the first job number and byte range of each chunk of
    ``per_chunk`` lines (a multiple of ``step``), from :func:`write_list`'s offsets."""
    k = max(1, per_chunk // step)
    last = len(offsets) - 1
    return [{"first": i * step + 1, "start": offsets[i], "end": offsets[min(i + k, last)]}
            for i in range(0, last, k)]
