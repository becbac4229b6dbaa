"""Named POSIX shared-memory segments for the multiprocessing transport.

Ownership rule: the process that creates a segment registers its name with
multiprocessing's resource tracker (shared by the whole spawn tree, so the
names are unlinked even if every process is killed) and is the only one that
unlinks it; other processes map it without registering. Python 3.11's
`SharedMemory(name)` registers on attach too, which would unlink or warn
twice, hence these few functions over `_posixshmem`, as `SharedMemory` uses.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
from multiprocessing import resource_tracker
from typing import Any, Sequence

import _posixshmem
import numpy as np

ALIGN = 64
SHM_DIR = "/dev/shm"


def create(name: str, size: int) -> mmap.mmap:
    """A new segment of `size` bytes (space reserved now, so a full /dev/shm fails here, not with SIGBUS)."""
    size = max(int(size), 1)
    fd = _posixshmem.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
    try:
        resource_tracker.register("/" + name, "shared_memory")
        os.ftruncate(fd, size)
        if hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as e:
                raise OSError(
                    e.errno,
                    f"cannot reserve {size:,} bytes of shared memory ({SHM_DIR}): {e.strerror}; "
                    "free some or enlarge it (e.g. docker run --shm-size=...)",
                ) from None
        return mmap.mmap(fd, size)
    except BaseException:
        unlink(name)
        raise
    finally:
        os.close(fd)


def _owned(path: str) -> bool:
    try:
        return os.stat(path).st_uid == os.getuid()
    except OSError:  # gone meanwhile
        return False


def attach(name: str) -> mmap.mmap:
    """Maps an existing segment; its creator keeps ownership of the name."""
    fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
    try:
        return mmap.mmap(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def unlink(name: str, tracked: bool = True) -> None:
    """Removes the name (mappings stay valid); a no-op if it is already gone. `tracked=False`: a segment made
    by a process outside this one's resource tracker (a Ray actor's)."""
    try:
        _posixshmem.shm_unlink("/" + name)
    except FileNotFoundError:
        return
    if tracked:
        resource_tracker.unregister("/" + name, "shared_memory")


def sweep(prefix: str, tracked: bool = True) -> list[str]:
    """Unlinks every segment of this user whose name starts with `prefix`; returns their names. (Another
    user's, named alike to get in the way, are not this server's to remove, even where it could.)"""
    try:
        names = [n for n in os.listdir(SHM_DIR) if n.startswith(prefix) and _owned(os.path.join(SHM_DIR, n))]
    except OSError:
        return []
    for name in names:
        unlink(name, tracked)
    return names


def write_text(name: str, text: str) -> None:
    """A new segment holding `text` (a note for other processes, e.g. why a shard is not coming back)."""
    data = text.encode()
    buf = create(name, len(data))
    buf[: len(data)] = data
    buf.close()


def read_text(name: str) -> str | None:
    """The text `write_text` left in segment `name`, or None if there is none (or only another user's)."""
    if not _owned(os.path.join(SHM_DIR, name)):
        return None
    try:
        buf = attach(name)
    except FileNotFoundError:
        return None
    try:
        return bytes(buf).decode(errors="replace")
    finally:
        buf.close()


def layout(specs: Sequence[tuple[tuple[int, ...], Any]]) -> tuple[list[int], int]:
    """Aligned byte offsets of arrays `(shape, dtype)` packed in one buffer, and its size."""
    offsets, end = [], 0
    for shape, dtype in specs:
        offset = -(-end // ALIGN) * ALIGN
        offsets.append(offset)
        end = offset + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    return offsets, max([end, *offsets, 1])


def views(buf: mmap.mmap, specs, offsets) -> list[np.ndarray]:
    """Numpy arrays over `buf`, all with one `.base`: a byte array over it, alive while any array made from them is.

    They hold `buf` exported (`np.frombuffer`; `np.ndarray(buffer=buf)` would
    not): while one lives, `buf.close()` raises BufferError instead of unmapping.
    """
    whole = np.frombuffer(buf, np.uint8)
    out = []
    for (shape, dtype), o in zip(specs, offsets):
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        out.append(whole[o : o + n].view(dtype).reshape(shape))
    return out


@dataclasses.dataclass
class SharedLeaves:
    """Arrays written once into a segment, for another process to copy out (`load`)."""

    name: str
    specs: list

    @classmethod
    def write(cls, name: str, specs, arrays) -> "SharedLeaves":
        offsets, size = layout(specs)
        buf = create(name, size)
        try:
            vs = views(buf, specs, offsets)
            for i, x in enumerate(arrays):
                np.copyto(vs[i], np.asarray(x, vs[i].dtype))
            del vs
        finally:
            buf.close()
        return cls(name, list(specs))

    def load(self) -> list[np.ndarray]:
        buf = attach(self.name)
        try:
            vs = views(buf, self.specs, layout(self.specs)[0])
            out = [np.array(v) for v in vs]
            del vs
        finally:
            buf.close()
        return out
