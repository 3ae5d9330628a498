"""Matrix cells: one row each of kernel source x arch x NIC models, loaded from ``kernels/*.yaml``.

The YAML is validated once, at load, so a typo fails before any VM is booted and the error
names the file, the line and the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kmodtest.arches import ARCHES, Arch
from kmodtest.errors import ConfigError
from kmodtest.nics import NICS
from kmodtest.prepare.yamlfile import load_located

# the NIC "model" of a cell's passthrough case: host NICs handed to the guest through VFIO
PASSTHROUGH_NIC = "vfio-pci"
_ID = re.compile(r"^[a-z0-9][a-z0-9.-]*$")
_PCI_ADDRESS = re.compile(r"^(?:([0-9a-f]{4}):)?([0-9a-f]{2}):([0-1][0-9a-f])\.([0-7])$")


def pci_address(value: str) -> str:
    """A host PCI address in full form (``0000:03:00.0``); ``03:00.0`` gets domain 0000."""
    match = _PCI_ADDRESS.match(value.strip().lower())
    if not match:
        raise ValueError(f"{value!r} is not a PCI address like 0000:03:00.0 (see lspci -D)")
    domain, bus, slot, function = match.groups()
    return f"{domain or '0000'}:{bus}:{slot}.{function}"


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


# OpenWrt targets kmodtest boots: the arch each needs, and its boot paths (the first is the
# default). x86/64: ``direct`` takes /boot/vmlinuz and GRUB's command line out of the combined
# image's partition 1 and boots it with the disk attached; ``firmware`` boots the disk as
# shipped (SeaBIOS -> GRUB). armsr/armv8: ``initramfs`` is the initramfs kernel alone;
# ``kernel-rootfs`` is kernel.bin with the ext4 rootfs as /dev/vda.
OPENWRT_TARGETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "x86/64": ("x86_64", ("direct", "firmware")),
    "armsr/armv8": ("arm64", ("initramfs", "kernel-rootfs")),
}


class LocalFile(_Strict):
    """A file of the user's own OpenWrt build (``bin/targets/...``), pinned by its sha256."""

    path: Path
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class OpenWrtSource(_Strict):
    """An OpenWrt image: a release from ``images/openwrt-releases.yaml``, or a local build.

    ``version`` names a release of the manifest (files, sha256 and kernel come from there);
    ``files`` instead names the user's own image files by role (combined, initramfs, kernel,
    rootfs) with the sha256 each must have.
    """

    kind: Literal["openwrt"]
    target: str
    version: str | None = None
    files: dict[str, LocalFile] | None = None
    kernel: str | None = None  # a local build's kernel version (releases: from the manifest)
    boot: str | None = None  # default: the target's first boot path

    @field_validator("target")
    @classmethod
    def _known_target(cls, value: str) -> str:
        if value not in OPENWRT_TARGETS:
            raise ValueError(
                f"unknown OpenWrt target {value!r}; known: {', '.join(OPENWRT_TARGETS)}"
            )
        return value

    @model_validator(mode="after")
    def _one_origin_and_known_boot(self) -> OpenWrtSource:
        if (self.version is None) == (self.files is None):
            raise ValueError("give either version (a release) or files (a local build)")
        if self.files is not None and not self.kernel:
            raise ValueError("a local build needs kernel: its kernel version (e.g. 6.6.119)")
        boots = OPENWRT_TARGETS[self.target][1]
        if self.boot is not None and self.boot not in boots:
            raise ValueError(
                f"boot {self.boot!r} is not one of {self.target}'s: {', '.join(boots)}"
            )
        return self

    @property
    def boot_path(self) -> str:
        return self.boot or OPENWRT_TARGETS[self.target][1][0]


SourceSpec = Annotated[DebianSource | LocalSource | OpenWrtSource, Field(discriminator="kind")]


class PassthroughSpec(_Strict):
    """Host NICs by PCI address: the router's LAN and WAN ports, and the ports cabled to them.

    The one-VM topology stays: ``client`` and ``server`` are the endpoints' ports (network
    namespaces in the same guest), each cabled back to back to ``lan`` and ``wan``.
    """

    lan: str
    client: str
    wan: str
    server: str

    @field_validator("lan", "client", "wan", "server")
    @classmethod
    def _address(cls, value: str) -> str:
        return pci_address(value)

    def by_port(self) -> dict[str, str]:
        return {"lan": self.lan, "client": self.client, "wan": self.wan, "server": self.server}


class CellSpec(_Strict):
    id: str
    arch: str
    source: SourceSpec
    image: str = "debian-router"  # recipe name under images/
    nics: tuple[str, ...] = ("virtio-net-pci",)
    machine: str | None = None  # override the arch's QEMU machine
    cpu: str | None = None  # override the arch's QEMU cpu
    smp: int | None = Field(default=None, ge=1, le=8)  # override the arch's emulated CPUs per VM
    append: str = ""  # extra kernel command-line arguments, e.g. a driver's module option
    backend: Literal["qemu", "libvirt"] | None = None  # how VMs start (default: --backend)
    passthrough: PassthroughSpec | None = None  # adds a vfio-pci case on these host NICs
    memory_mb: int = Field(default=512, ge=128, le=8192)
    # bring your own tools: Debian packages and modules of the cell's kernel, added to the
    # image as a cached layer (kmodtest/prepare/tools.py)
    extra_packages: tuple[str, ...] = ()
    extra_modules: tuple[str, ...] = ()
    default: bool = False  # the cell `pytest vmtests/` uses without --kernel
    ci: bool = False  # run by .ci/run (sized for 90 minutes on 2 cores)
    # the GitHub Actions workflow whose jobs run this cell: "vmtests" (every push, one job per
    # cell of `kmodtest matrix`) or "nightly" (a cell whose kernel that workflow builds first,
    # like the debug cell: on a push its job would find no kernel and skip every test)
    workflow: Literal["vmtests", "nightly"] = "vmtests"

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

    @model_validator(mode="after")
    def _openwrt_target_matches_arch(self) -> CellSpec:
        if isinstance(self.source, OpenWrtSource):
            arch = OPENWRT_TARGETS[self.source.target][0]
            if self.arch != arch:
                raise ValueError(f"OpenWrt target {self.source.target} runs on arch {arch}")
        return self

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

    @property
    def smp(self) -> int:
        return self.spec.smp or self.arch.smp

    @property
    def nic_cases(self) -> tuple[str, ...]:
        """The NIC models VM cases run on: the emulated ones, then passthrough if configured."""
        return self.spec.nics + ((PASSTHROUGH_NIC,) if self.spec.passthrough else ())

    def with_passthrough(self, ports: PassthroughSpec) -> Cell:
        return replace(self, spec=self.spec.model_copy(update={"passthrough": ports}))

    @property
    def openwrt(self) -> OpenWrtSource | None:
        """The OpenWrt source of an OpenWrt cell, else None."""
        src = self.spec.source
        return src if isinstance(src, OpenWrtSource) else None


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
            known = (*NICS, PASSTHROUGH_NIC)
            for nic in wanted_nics - set(known):
                raise ConfigError(f"unknown NIC {nic!r}", f"use one of: {', '.join(known)}")
            chosen = [c for c in chosen if wanted_nics & set(c.nic_cases)]
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
    first: dict[str, str] = {}  # cell id -> where it was declared first
    defaults: list[str] = []  # where each `default: true` is
    for path in files:
        fix = f"edit {path} (schema: kmodtest/prepare/cells.py)"
        located = load_located(path, KernelsFile, fix)
        for i, spec in enumerate(located.model.cells):
            where = located.where(("cells", i, "id"))
            if spec.id in first:
                raise ConfigError(
                    f"{where}: cell id {spec.id!r} is already used at {first[spec.id]}",
                    f"{fix}: give each cell its own id",
                )
            first[spec.id] = where.rsplit(": ", 1)[0]
            if spec.default:
                if defaults:
                    raise ConfigError(
                        f"{located.where(('cells', i, 'default'))}: a second cell with "
                        f"'default: true' (the first is at {defaults[0]})",
                        "mark only the one cell `pytest vmtests/` should use without --kernel",
                    )
                defaults.append(located.where(("cells", i, "default")).rsplit(": ", 1)[0])
            cells.append(Cell(spec=spec, arch=ARCHES[spec.arch], origin=path))
    if not defaults:
        raise ConfigError(
            f"{directory}: no cell has 'default: true'",
            "mark the one cell `pytest vmtests/` should use without --kernel",
        )
    return Matrix(tuple(cells))
