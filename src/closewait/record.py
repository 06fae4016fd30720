"""``closewait record``: a CLOSE_WAIT recorder pinned for other processes, and its clean removal.

The recorder (``closewait.sources.recorder``) is attached and its maps pinned in a bpffs, so that
``closewait scan`` in any other process reads the exact time each socket entered CLOSE_WAIT. Many
hosts mount no bpffs at /sys/fs/bpf: then one is mounted there (only on an empty directory) and
unmounted again when the recording stops, so nothing is left behind unless ``keep`` is asked for.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from closewait.sources import pinned
from closewait.sources.recorder import (
    DEFAULT_CAPACITY,
    Recorder,
    RecorderUnavailable,
    bpffs_for,
    unmount_bpffs,
    unpin,
)

log = logging.getLogger(__name__)


@dataclass
class Recording:
    """A recorder pinned in ``pin_dir``; ``mounted`` is the bpffs ``start`` mounted for it, if any."""

    recorder: Recorder
    pin_dir: str
    mounted: str | None

    def stop(self, *, keep: bool = False) -> None:
        """Release this process's hold. Without ``keep``: unpin (the program is detached) and
        unmount the bpffs ``start`` mounted. With it, the recorder stays attached and pinned
        (remove it later with ``remove(pin_dir)``)."""
        self.recorder.close()
        if keep:
            return
        unpin(self.pin_dir)
        if self.mounted is not None and not unmount_bpffs(self.mounted):
            log.warning("left the bpffs at %s mounted: something else is pinned in it", self.mounted)


def start(pin_dir: str = pinned.DEFAULT_PIN_DIR, *, capacity: int = DEFAULT_CAPACITY) -> Recording:
    """Attach a recorder, self-test it and pin it in ``pin_dir``; RecorderUnavailable says why not.

    A recorder already pinned there is refused rather than shared: the one that pinned it would
    remove it when it stops, under this one's feet."""
    pin_dir = os.path.abspath(pin_dir)
    if pinned.is_pinned(pin_dir) is None:
        raise RecorderUnavailable(
            f"a recorder is already pinned in {pin_dir} (another closewait record, or one left by --keep: "
            "closewait record --unpin removes it)"
        )
    mounted = bpffs_for(pin_dir)
    try:
        recorder = Recorder.open(pin_dir, capacity=capacity)
    except BaseException:
        if mounted is not None:
            unmount_bpffs(mounted)
        raise
    return Recording(recorder, pin_dir, mounted)


def remove(pin_dir: str = pinned.DEFAULT_PIN_DIR) -> bool:
    """Remove a recorder pinned in ``pin_dir`` (left by ``--keep``); True if there was one."""
    return unpin(os.path.abspath(pin_dir))


__all__ = ["Recording", "remove", "start"]
