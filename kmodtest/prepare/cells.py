"""Matrix cells: one row each of kernel source x arch x NIC models, loaded from ``kernels/*.yaml``.

The YAML is validated once, at load, so a typo fails before any VM is booted and the error
names the file, the line and the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kmodtest.arches import ARCHES, Arch
from kmodtest.errors import ConfigError
from kmodtest.nics import NICS
from kmodtest.prepare.yamlfile import load_model

_ID = re.compile(r"^[a-z0-9][a-z0-9.-]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DebianSource(_Strict):
    """A kernel from a Debian suite's ``linux-image-*`` package."""

    kind: Literal["debian"]
    suite: str
    kernel_package: str
    apt_options: tuple[str, ...] = ()  # e.g. 'Acquire::Check-Valid-Until "false"' for sid
    # also <suite>-updates and <suite>-security (mmdebstrap adds them for stable suites);
    # false where the mirror's indexes of those do not match their Release file
    updates: bool = True


class LocalSource(_Strict):
    """A kernel the user built: an image file plus a ``modules_install`` tree."""

    kind: Literal["local"]
    kernel_image: Path
    modules: Path
    suite: str = "trixie"  # userland packages come from this suite


SourceSpec = Annotated[DebianSource | LocalSource, Field(discriminator="kind")]


class CellSpec(_Strict):
    id: str
    arch: str
    source: SourceSpec
    image: str = "debian-router"  # recipe name under images/
    nics: tuple[str, ...] = ("virtio-net-pci",)
    machine: str | None = None  # override the arch's QEMU machine
    cpu: str | None = None  # override the arch's QEMU cpu
    append: str = ""  # extra kernel command-line arguments, e.g. a driver's module option
    memory_mb: int = Field(default=512, ge=128, le=8192)
    default: bool = False  # the cell `pytest vmtests/` uses without --kernel
    ci: bool = False  # run by .ci/run (sized for 90 minutes on 2 cores)

    @field_validator("id")
    @classmethod
    def _id_shape(cls, value: str) -> str:
        if not _ID.match(value):
            raise ValueError(
                "use lowercase letters, digits, '.' and '-' (like debian-trixie-amd64)"
            )
        return value

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str) -> str:
        if value not in ARCHES:
            raise ValueError(f"unknown arch {value!r}; known: {', '.join(ARCHES)}")
        return value

    @field_validator("nics")
    @classmethod
    def _known_nics(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        bad = [n for n in value if n not in NICS]
        if bad:
            raise ValueError(f"unknown NIC model(s) {bad}; known: {', '.join(NICS)}")
        if not value:
            raise ValueError("at least one NIC model is needed")
        return value


class KernelsFile(_Strict):
    cells: tuple[CellSpec, ...]


@dataclass(frozen=True)
class Cell:
    """A validated matrix cell with its arch record resolved."""

    spec: CellSpec
    arch: Arch
    origin: Path

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def machine(self) -> str:
        return self.spec.machine or self.arch.machine

    @property
    def cpu(self) -> str:
        return self.spec.cpu or self.arch.cpu


@dataclass(frozen=True)
class Matrix:
    cells: tuple[Cell, ...]

    def ids(self) -> list[str]:
        return [c.id for c in self.cells]

    def get(self, cell_id: str) -> Cell:
        for cell in self.cells:
            if cell.id == cell_id:
                return cell
        raise ConfigError(
            f"unknown kernel {cell_id!r}",
            f"use one of: {', '.join(self.ids())} (declared in kernels/*.yaml), or 'all'",
        )

    @property
    def default(self) -> Cell:
        return next(c for c in self.cells if c.spec.default)

    def select(
        self, kernels: str | None, arches: str | None = None, nics: str | None = None
    ) -> list[Cell]:
        """Cells named by ``--kernel ID[,ID..]|all`` (default: the default cell) and ``--arch``."""
        if not kernels:
            chosen = [self.default]
        elif kernels == "all":
            chosen = list(self.cells)
        else:
            chosen = [self.get(k.strip()) for k in kernels.split(",") if k.strip()]
        if arches:
            wanted = {a.strip() for a in arches.split(",")}
            for arch in wanted - set(ARCHES):
                raise ConfigError(f"unknown arch {arch!r}", f"use one of: {', '.join(ARCHES)}")
            chosen = [c for c in chosen if c.arch.name in wanted]
        if nics:
            wanted_nics = {n.strip() for n in nics.split(",")}
            for nic in wanted_nics - set(NICS):
                raise ConfigError(f"unknown NIC {nic!r}", f"use one of: {', '.join(NICS)}")
            chosen = [c for c in chosen if wanted_nics & set(c.spec.nics)]
        return chosen


def unbuilt_local_kernel(cell: Cell) -> str | None:
    """Why a ``kind: local`` cell cannot boot yet (its kernel is not built), else None."""
    src = cell.spec.source
    if not isinstance(src, LocalSource) or src.kernel_image.expanduser().is_file():
        return None
    return (
        f"its kernel {src.kernel_image} is not built yet; fix: the command in "
        f"{cell.origin.name} (e.g. kmodtest kernel build --debian-source trixie --debug "
        f"--out {src.kernel_image.parent})"
    )


def load_matrix(directory: Path) -> Matrix:
    """Load and cross-check every ``*.yaml`` in ``directory``."""
    files = sorted(directory.glob("*.yaml"))
    if not files:
        raise ConfigError(
            f"no kernel matrix files in {directory}",
            "add a kernels/*.yaml file or point --kernels-dir at the directory that has them",
        )
    cells: list[Cell] = []
    seen: dict[str, Path] = {}
    for path in files:
        fix = f"edit {path} (schema: kmodtest/prepare/cells.py)"
        for spec in load_model(path, KernelsFile, fix).cells:
            if spec.id in seen:
                raise ConfigError(f"{path}: cell id {spec.id!r} also in {seen[spec.id]}", fix)
            seen[spec.id] = path
            cells.append(Cell(spec=spec, arch=ARCHES[spec.arch], origin=path))
    defaults = [c.id for c in cells if c.spec.default]
    if len(defaults) != 1:
        raise ConfigError(
            f"{directory}: exactly one cell must have 'default: true', found {defaults or 'none'}",
            "mark the cell `pytest vmtests/` should use without --kernel",
        )
    return Matrix(tuple(cells))
