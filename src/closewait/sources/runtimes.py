"""Container names from the container runtimes' own metadata on disk (never by running their CLIs).

    podman   <graphroot>/<driver>-containers/containers.json   (containers/storage: "id", "names")
             <graphroot>/libpod/bolt_state.db                  (libpod's BoltDB: bucket "id-registry"
                                                                maps id -> name; has the containers
                                                                that have no storage layer, --rootfs)
    docker   /var/lib/docker/containers/<id>/config.v2.json   ("Name": "/web")

Debian 12's podman 4.3 keeps its state in BoltDB (SQLite arrived in podman 4.8), so a small read-only
BoltDB reader is here: bolt is a copy-on-write B+tree in fixed-size pages, two meta pages, the one
with the higher transaction id is current. A file being rewritten while it is read may be
inconsistent: every structure is bounds-checked and a bad one is "no name", never an exception.

Each file is re-read only when its (mtime, size, inode) changes, so a scan pays one ``stat`` per
runtime, not one read per container. ``root`` prefixes every path (the host's / seen from a container,
or a test's temp directory).
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Callable, Iterator

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing; mypy knows the name
if TYPE_CHECKING:
    import logging


def _log() -> logging.Logger:
    """This module's logger, importing logging only when there is something to log: every scan
    imports this module, and logging (~6 ms) is otherwise not on ``scan --json``'s fast path."""
    import logging

    return logging.getLogger(__name__)


PODMAN_GRAPHROOT = "/var/lib/containers/storage"
DOCKER_ROOT = "/var/lib/docker"
_STORAGE_DRIVERS = ("overlay", "vfs", "btrfs", "zfs", "aufs", "devmapper")


def _file_key(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class _CachedFile:
    """A file parsed again only when it changes, checked (stat) at most once per ``recheck`` seconds.

    A plain class, not a dataclass: every scan that names owners makes seven of these, and making
    the dataclass (its generated methods compiled at import) cost more than all of their work."""

    __slots__ = ("checked_at", "key", "parse", "path", "recheck", "value")

    def __init__(self, path: str, parse: Callable[[bytes], dict[str, str]], recheck: float) -> None:
        self.path = path
        self.parse = parse
        self.recheck = recheck
        self.key: tuple[int, int, int] | None = None
        self.value: dict[str, str] = {}
        self.checked_at: float | None = None

    def get(self) -> dict[str, str]:
        now = time.monotonic()
        if self.checked_at is not None and now - self.checked_at < self.recheck:
            return self.value
        self.checked_at = now
        key = _file_key(self.path)
        if key != self.key:
            self.key = key
            self.value = {}
            if key is not None:
                try:
                    with open(self.path, "rb") as handle:
                        self.value = self.parse(handle.read())
                except (OSError, ValueError) as err:
                    _log().debug("cannot read %s: %s", self.path, err)
        return self.value


def parse_containers_json(data: bytes) -> dict[str, str]:
    """id -> first name, from containers/storage's containers.json. ValueError if it is not one."""
    document = json.loads(data)
    if not isinstance(document, list):
        raise ValueError("containers.json is not a list")
    names = {}
    for entry in document:
        if isinstance(entry, dict) and isinstance(entry.get("id"), str):
            entry_names = entry.get("names")
            if isinstance(entry_names, list) and entry_names and isinstance(entry_names[0], str):
                names[entry["id"]] = entry_names[0]
    return names


# ---- BoltDB, read only ----------------------------------------------------------------------

_BOLT_MAGIC = 0xED0CDAED
_PAGE_HEADER = struct.Struct("<QHHI")  # id, flags, count, overflow
# magic, version, pageSize, flags, root bucket {root, sequence}, freelist, pgid, txid, checksum
_META = struct.Struct("<IIII QQ Q Q Q Q")
_BRANCH_ELEMENT = struct.Struct("<IIQ")  # pos, ksize, pgid
_LEAF_ELEMENT = struct.Struct("<IIII")  # flags, pos, ksize, vsize
_BUCKET_HEADER = struct.Struct("<QQ")  # root, sequence
_BRANCH_PAGE, _LEAF_PAGE = 0x01, 0x02
_BUCKET_LEAF_FLAG = 0x01


class BoltError(ValueError):
    """A BoltDB file that is not one, or is inconsistent (e.g. read while being rewritten)."""


class BoltReader:
    """Read-only access to the buckets of a BoltDB file held in memory (``data``)."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        # Meta page 0 gives the page size; meta page 1 sits one page in. Either may be torn by a
        # write in progress, so a valid one with the higher transaction id is current.
        first = self._meta(0)
        second = self._meta(first[2] if first else 4096)
        metas = [meta for meta in (first, second) if meta is not None]
        if not metas:
            raise BoltError("not a BoltDB file")
        _txid, self._root, self._page_size = max(metas)
        self._budget = 0

    def _meta(self, offset: int) -> tuple[int, int, int] | None:
        """(txid, root bucket page, page size) of the meta page at ``offset``, None if not valid."""
        if len(self._data) < offset + _PAGE_HEADER.size + _META.size:
            return None
        magic, version, page_size, _flags, root, _seq, _free, _pgid, txid, _sum = _META.unpack_from(
            self._data, offset + _PAGE_HEADER.size
        )
        if magic != _BOLT_MAGIC or version != 2 or page_size < 512:
            return None
        return txid, root, page_size

    def _page(self, pgid: int) -> tuple[int, int, int]:
        """(offset, flags, count) of page ``pgid``; at most one visit per page of the file per lookup,
        so a torn file whose pages point at each other cannot keep the reader busy."""
        self._budget -= 1
        if self._budget < 0:
            raise BoltError("page references loop")
        offset = pgid * self._page_size
        if offset + _PAGE_HEADER.size > len(self._data):
            raise BoltError(f"page {pgid} beyond the end of the file")
        _id, flags, count, _overflow = _PAGE_HEADER.unpack_from(self._data, offset)
        return offset, flags, count

    def _items(
        self, data: bytes, offset: int, flags: int, count: int, depth: int
    ) -> Iterator[tuple[bytes, bytes, int]]:
        """(key, value, leaf flags) of the page at ``offset`` in ``data``, descending branch pages."""
        if depth > 64:
            raise BoltError("B+tree too deep")
        base = offset + _PAGE_HEADER.size
        if flags & _LEAF_PAGE:
            for i in range(count):
                element = base + i * _LEAF_ELEMENT.size
                eflags, pos, ksize, vsize = _LEAF_ELEMENT.unpack_from(data, element)
                start = element + pos
                if start + ksize + vsize > len(data):
                    raise BoltError("leaf element beyond its page")
                yield data[start : start + ksize], data[start + ksize : start + ksize + vsize], eflags
        elif flags & _BRANCH_PAGE:
            for i in range(count):
                _pos, _ksize, pgid = _BRANCH_ELEMENT.unpack_from(data, base + i * _BRANCH_ELEMENT.size)
                child_offset, child_flags, child_count = self._page(pgid)
                yield from self._items(self._data, child_offset, child_flags, child_count, depth + 1)
        else:
            raise BoltError(f"unexpected page flags {flags:#x}")

    def _bucket_items(self, bucket_value: bytes | None) -> Iterator[tuple[bytes, bytes, int]]:
        if bucket_value is None:
            offset, flags, count = self._page(self._root)
            yield from self._items(self._data, offset, flags, count, 0)
            return
        if len(bucket_value) < _BUCKET_HEADER.size:
            raise BoltError("short bucket header")
        root, _sequence = _BUCKET_HEADER.unpack_from(bucket_value)
        if root == 0:  # an inline bucket: its one page follows the header in the value
            inline = bucket_value[_BUCKET_HEADER.size :]
            if len(inline) < _PAGE_HEADER.size:
                raise BoltError("short inline bucket")
            _id, flags, count, _overflow = _PAGE_HEADER.unpack_from(inline)
            yield from self._items(inline, 0, flags, count, 0)
            return
        offset, flags, count = self._page(root)
        yield from self._items(self._data, offset, flags, count, 0)

    def bucket(self, *names: bytes) -> dict[bytes, bytes]:
        """The plain key/value pairs of the nested bucket ``names`` (empty if there is none)."""
        self._budget = len(self._data) // self._page_size + 1
        value: bytes | None = None
        for name in names:
            found = None
            for key, item, flags in self._bucket_items(value):
                if key == name and flags & _BUCKET_LEAF_FLAG:
                    found = item
                    break
            if found is None:
                return {}
            value = found
        return {key: item for key, item, flags in self._bucket_items(value) if not flags & _BUCKET_LEAF_FLAG}


def parse_libpod_bolt(data: bytes) -> dict[str, str]:
    """id -> name from libpod's bolt_state.db (bucket ``id-registry``: container and pod ids -> names)."""
    try:
        registry = BoltReader(data).bucket(b"id-registry")
    except (BoltError, struct.error) as err:
        raise ValueError(f"bolt_state.db: {err}") from err
    return {key.decode("ascii", "replace"): value.decode("utf-8", "replace") for key, value in registry.items()}


# ---- the lookups ----------------------------------------------------------------------------


def parse_docker_config(data: bytes) -> dict[str, str]:
    document = json.loads(data)
    if not isinstance(document, dict):
        raise ValueError("config.v2.json is not an object")
    name = document.get("Name")
    return {"name": name.lstrip("/")} if isinstance(name, str) and name.strip("/") else {}


class ContainerNames:
    """Container id -> name, from podman's and docker's files under ``root``.

    ``name(runtime, id)`` is cheap to call per process: each metadata file is checked for a change
    (one ``stat``) at most once per ``recheck`` seconds and re-read only when it changed.
    """

    def __init__(
        self,
        root: str = "/",
        *,
        podman_graphroot: str = PODMAN_GRAPHROOT,
        docker_root: str = DOCKER_ROOT,
        recheck: float = 1.0,
    ) -> None:
        prefix = root.rstrip("/")
        self.podman_graphroot = prefix + podman_graphroot
        self.docker_root = prefix + docker_root
        self.recheck = recheck
        self._podman_files = [
            _CachedFile(f"{self.podman_graphroot}/{driver}-containers/containers.json", parse_containers_json, recheck)
            for driver in _STORAGE_DRIVERS
        ]
        self._podman_files.append(
            _CachedFile(f"{self.podman_graphroot}/libpod/bolt_state.db", parse_libpod_bolt, recheck)
        )
        self._docker_files: dict[str, _CachedFile] = {}

    def podman(self, container_id: str) -> str | None:
        for cached in self._podman_files:
            name = cached.get().get(container_id)
            if name:
                return name
        return None

    def docker(self, container_id: str) -> str | None:
        cached = self._docker_files.get(container_id)
        if cached is None:
            if len(self._docker_files) > 4096:
                self._docker_files.clear()
            path = f"{self.docker_root}/containers/{container_id}/config.v2.json"
            cached = _CachedFile(path, parse_docker_config, self.recheck)
            self._docker_files[container_id] = cached
        return cached.get().get("name")

    def name(self, runtime: str | None, container_id: str) -> str | None:
        """The container's name, or None if the runtime's metadata does not have it."""
        if runtime == "podman":
            return self.podman(container_id)
        if runtime == "docker":
            return self.docker(container_id)
        return None
