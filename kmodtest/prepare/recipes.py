"""Image recipes (``images/*.yaml``): what goes around the kernel in a router image."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from kmodtest.errors import ConfigError
from kmodtest.prepare.yamlfile import load_model


class RecipeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str = ""
    packages: tuple[str, ...] = Field(min_length=1)
    modules: tuple[str, ...] = ()
    optional_modules: tuple[str, ...] = ()
    boot_modules: tuple[str, ...] = ()
    prefer_real: tuple[str, ...] = ()
    drop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Recipe:
    name: str
    spec: RecipeSpec
    path: Path

    def digest(self) -> str:
        """Content hash: a changed recipe never reuses an image built from the old one."""
        return hashlib.sha256(
            json.dumps(self.spec.model_dump(mode="json"), sort_keys=True).encode()
        ).hexdigest()


def load_recipe(images_dir: Path, name: str) -> Recipe:
    path = images_dir / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in images_dir.glob("*.yaml"))
        raise ConfigError(
            f"no image recipe {name!r} in {images_dir}",
            f"use one of: {', '.join(known) or '(none)'}, or add {path}",
        )
    return Recipe(name, load_model(path, RecipeSpec, f"edit {path}"), path)
