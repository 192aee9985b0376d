"""Progress reporting as a protocol the core calls; the CLI supplies text or nothing."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    active: bool  # whether anyone looks: totals are measured up front only then

    def start(self, total_bytes: int | None, total_files: int | None) -> None: ...

    def advance(self, nbytes: int = 0, files: int = 0) -> None: ...

    def finish(self) -> None: ...


class NullProgress:
    active = False

    def start(self, total_bytes: int | None, total_files: int | None) -> None:
        pass

    def advance(self, nbytes: int = 0, files: int = 0) -> None:
        pass

    def finish(self) -> None:
        pass


NULL_PROGRESS = NullProgress()
