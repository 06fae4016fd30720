"""One /proc file read whole through a directory descriptor, OSError as it comes.

Shared by ``process`` (which maps the error to closewait's own) and ``owner_check``'s child process,
which may import nothing but the standard library's C modules after the fork and so cannot use
``process`` (it imports the model).
"""

from __future__ import annotations

import os


def read_at(dir_fd: int, name: str) -> bytes:
    """The bytes of ``name`` under the directory ``dir_fd`` (a /proc/PID), read to its end."""
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
