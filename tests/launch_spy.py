"""Recording the launches of a Triton kernel, for tests that check which kernel variant ran."""

from __future__ import annotations

from typing import Any

import pytest


class LaunchSpy:
    """Stands in for a `@triton.jit` kernel in its launcher's module: records each launch's grid,
    positional and keyword arguments (tile sizes, NUM_SPLITS...), then launches the real kernel
    (unless `run` is False: then the launch only records, and the outputs stay unwritten)."""

    def __init__(self, kernel: Any, run: bool = True) -> None:
        self.kernel = kernel
        self.run = run
        self.launches: list[tuple[tuple[int, ...], tuple[Any, ...], dict[str, Any]]] = []

    def __getitem__(self, grid: tuple[int, ...]):
        def launch(*args: Any, **kwargs: Any) -> Any:
            self.launches.append((tuple(grid), args, kwargs))
            return self.kernel[grid](*args, **kwargs) if self.run else None

        return launch

    @classmethod
    def install(cls, monkeypatch: pytest.MonkeyPatch, module: Any, name: str, run: bool = True) -> LaunchSpy:
        spy = cls(getattr(module, name), run)
        monkeypatch.setattr(module, name, spy)
        return spy
