"""The engine's error types: one per kind of failure a caller can act on."""

from __future__ import annotations

from pathlib import Path


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded.

    The message always names the file, and the tensor or config field when there is one,
    so that a user can fix the checkpoint without reading our code.
    """

    def __init__(self, path: Path | str, message: str) -> None:
        self.path = Path(path)
        super().__init__(f"{self.path}: {message}")
