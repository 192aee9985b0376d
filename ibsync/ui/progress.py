"""tqdm progress bars implementing ibsync.progress.Progress."""

from __future__ import annotations

import sys
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported when a bar starts: most commands never draw one
    from tqdm import tqdm


class TerminalProgress:
    """Bytes and files with rate and ETA, on stderr; safe to call from worker threads."""

    active = True

    def __init__(self, description: str) -> None:
        self.description = description
        self._bar: tqdm[Any] | None = None
        self._files = 0
        self._total_files: int | None = None
        self._lock = threading.Lock()

    def start(self, total_bytes: int | None, total_files: int | None) -> None:
        from tqdm import tqdm

        self._total_files = total_files
        self._bar = tqdm(
            total=total_bytes,
            desc=self.description,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=sys.stderr,
            dynamic_ncols=True,
            leave=False,
            mininterval=0.2,
        )

    def _postfix(self) -> None:
        if self._bar is not None:
            of = f"/{self._total_files}" if self._total_files is not None else ""
            self._bar.set_postfix_str(f"{self._files}{of} files", refresh=False)

    def advance(self, nbytes: int = 0, files: int = 0) -> None:
        if self._bar is None:
            return
        with self._lock:
            self._files += files
            if files:
                self._postfix()
            if nbytes:
                self._bar.update(nbytes)

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            self._files = 0
