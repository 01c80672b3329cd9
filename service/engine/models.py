"""Served model versions: what a loaded version is, and the repository of them by name."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from service.engine.batcher import Batcher
from service.engine.errors import ModelNotFound, VersionNotFound
from service.engine.metadata import ModelMetadata
from service.engine.state_pool import SlotPool


@dataclass(eq=False)
class ServedModel:
    """A loaded model version: metadata, runtime, state pool and batcher."""

    metadata: ModelMetadata
    batcher: Batcher

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def version(self) -> int:
        return self.metadata.version

    @property
    def pool(self) -> SlotPool:
        return self.batcher.pool

    @property
    def provider(self) -> str:
        return self.batcher.runtime.provider

    def describe(self) -> dict[str, Any]:
        """Metadata plus the execution providers actually in use."""
        return {
            **self.metadata.public_dict(),
            "provider": self.provider,
            "providers": self.batcher.runtime.providers,
        }


class ModelRepository:
    """Served models by name and version."""

    def __init__(self, models: Sequence[ServedModel]) -> None:
        self._models: dict[str, dict[int, ServedModel]] = {}
        for model in models:
            self._models.setdefault(model.name, {})[model.version] = model

    def __bool__(self) -> bool:
        """Whether any model version serves."""
        return bool(self._models)

    def __iter__(self) -> Iterator[ServedModel]:
        for name in sorted(self._models):
            yield from (self._models[name][v] for v in sorted(self._models[name]))

    def versions(self, name: str) -> list[ServedModel]:
        if name not in self._models:
            raise ModelNotFound(name, self._models)
        return [self._models[name][v] for v in sorted(self._models[name])]

    def get(self, name: str, version: int | None = None) -> ServedModel:
        """The model version, or the highest version when ``version`` is None."""
        versions = self._models.get(name)
        if versions is None:
            raise ModelNotFound(name, self._models)
        if version is None:
            return versions[max(versions)]
        if version not in versions:
            raise VersionNotFound(name, version, versions)
        return versions[version]
