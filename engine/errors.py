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


class ConfigError(ValueError):
    """An engine setting out of its bounds (`EngineConfig`); `field` names it."""

    def __init__(self, message: str, field: str | None = None) -> None:
        self.field = field
        super().__init__(message)


class RequestError(ValueError):
    """A request the engine refuses (bad parameters, too long, unknown id): the caller's fault,
    reported without disturbing other requests. `field` names the offending input when one does."""

    def __init__(self, message: str, field: str | None = None) -> None:
        self.field = field
        super().__init__(message)


class ContextLengthError(RequestError):
    """A request whose prompt and max_tokens do not fit the model's context (`max_model_len`)."""


class EngineDeadError(RuntimeError):
    """The engine can compute nothing any more: after a failed step, a forward with no request
    in it failed too (a broken device or model). The engine process exits on it."""
