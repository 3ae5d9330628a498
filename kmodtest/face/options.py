"""One registry for the options the pytest plugin and the ``kmodtest`` command share.

Each option is declared once (flag, help, default, choices) and registered from here into
pytest (an ``addoption`` and a ``kmodtest_<name>`` ini key each) and into the CLI's argparse
subcommands; :class:`Settings` resolves the values the same way for both (command line, then
ini, then the default), so a default cannot differ between ``pytest`` and ``kmodtest``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from kmodtest.errors import ConfigError
from kmodtest.guest.boot import BOOT_TIMEOUT
from kmodtest.prepare.cache import default_cache_dir
from kmodtest.run.emulator import QEMU_CHOICES
from kmodtest.run.launcher import BACKENDS
from kmodtest.run.libvirt_launcher import DEFAULT_URI

INI_PREFIX = "kmodtest_"


@dataclass(frozen=True)
class Option:
    name: str  # the dest: args.<name>, config.getoption(name), ini kmodtest_<name>
    flag: str
    help: str
    default: Any = None
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    switch: bool = False  # a flag without a value (store_true)

    def argparse_kwargs(self) -> dict[str, Any]:
        # default None everywhere: "not given" must be told apart from "given the default"
        kwargs: dict[str, Any] = {"dest": self.name, "default": None, "help": self.help}
        if self.switch:
            kwargs["action"] = "store_true"
        else:
            kwargs.update(metavar=self.metavar, choices=self.choices)
        return kwargs


TOPOLOGIES = ("one-vm", "two-vm")
OPTIONS: dict[str, Option] = {
    o.name: o
    for o in (
        Option("kernel", "--kernel", "matrix cell(s) from kernels/*.yaml, comma separated, or "
               "'all' (default: the default cell)", metavar="ID[,ID...]|all"),
        Option("arch", "--arch", "only cells of these arches (x86_64, arm64, armhf)",
               metavar="ARCH[,ARCH...]"),
        Option("nic", "--nic", "only these NIC models (virtio-net-pci, e1000, ...)",
               metavar="MODEL[,MODEL...]"),
        Option("accel", "--accel", "QEMU accelerator; auto uses KVM only if a probe VM runs "
               "under it", default="auto", choices=("auto", "kvm", "tcg")),
        Option("qemu", "--qemu", "which QEMU: auto takes the host's if it is 8.0 or newer, "
               "else Debian trixie's (unpacked into the cache, nothing installed); host; debian",
               default="auto", choices=QEMU_CHOICES),
        Option("backend", "--backend", "how VMs start: qemu (a subprocess) or libvirt (a "
               "transient domain); default: the cell's backend:, else qemu", choices=BACKENDS),
        Option("libvirt_uri", "--libvirt-uri", "libvirt connection for --backend libvirt "
               f"(default: {DEFAULT_URI})", metavar="URI"),
        Option("passthrough", "--passthrough", "host NICs (PCI addresses) for a vfio-pci case "
               "on the selected cells: the router's lan/wan ports and the client/server ports "
               "cabled to them", metavar="lan=PCI,client=PCI,wan=PCI,server=PCI"),
        Option("boot_timeout", "--boot-timeout", "seconds a VM may take to come up: until its "
               "agent answers, and again for the test network's set-up (default: "
               f"{BOOT_TIMEOUT:g}; a router nested in a TCG guest needs ~1200)",
               default=BOOT_TIMEOUT, metavar="SECONDS"),
        Option("icount", "--icount", "TCG: -icount shift=0,sleep=off (guest time follows "
               "instructions)", default=False, switch=True),
        Option("no_snapshots", "--no-snapshots", "boot every VM cold instead of restoring a "
               "VM case's saved state (saved in the cache after its first boot)",
               default=False, switch=True),
        Option("keep_logs", "--keep-logs", "keep console logs of passing runs too (failing "
               "runs always keep them)", default=False, switch=True),
        Option("log_dir", "--log-dir", "where console logs go (default: ./kmodtest-logs)",
               default="kmodtest-logs", metavar="DIR"),
        Option("image_cache", "--image-cache", "image cache (default: $KMODTEST_CACHE, else "
               "$XDG_CACHE_HOME/kmodtest or ~/.cache/kmodtest)", metavar="DIR"),
        Option("refresh_images", "--refresh-images", "re-resolve Debian package versions and "
               "rebuild images that changed", default=False, switch=True),
        Option("kernels_dir", "--kernels-dir", "matrix YAML directory (default: ./kernels "
               "if it exists, else the matrix kmodtest ships)", metavar="DIR"),
        Option("images_dir", "--images-dir", "image recipe directory (default: ./images if "
               "it exists, else the recipes kmodtest ships)", metavar="DIR"),
        Option("topology", "--topology", "one-vm: the client and server namespaces live in the "
               "Debian router's VM; two-vm: in an endpoints VM (the default cell's image) cabled "
               "to the router, so they stop sharing its emulated CPU (OpenWrt routers always "
               "have one)", default="one-vm", choices=TOPOLOGIES),
        Option("openwrt_mirror", "--openwrt-mirror", "OpenWrt download server base URL "
               "(default: $KMODTEST_OPENWRT_MIRROR, else images/openwrt-releases.yaml's)",
               metavar="URL"),
    )
}  # fmt: skip
SELECTORS = ("kernel", "arch", "nic")
DIRS = ("kernels_dir", "images_dir", "image_cache")
PATHS = (*DIRS, "log_dir")


def packaged(name: str) -> Path:
    """A directory of data kmodtest ships (``kernels``, ``images``): the repository's own."""
    return Path(str(resources.files("kmodtest").joinpath("defaults", name)))


def add_to_argparse(parser: argparse.ArgumentParser, names: Iterable[str]) -> None:
    for name in names:
        option = OPTIONS[name]
        parser.add_argument(option.flag, **option.argparse_kwargs())


def add_to_pytest(parser: pytest.Parser) -> None:
    group = parser.getgroup("kmodtest", "kmodtest router VMs")
    for option in OPTIONS.values():
        group.addoption(option.flag, **option.argparse_kwargs())
        parser.addini(
            INI_PREFIX + option.name,
            f"{option.help} [{option.flag}]",
            type="bool" if option.switch else "string",
            default=None,
        )


@dataclass(frozen=True)
class Settings:
    """The shared options' values, resolved one way for pytest and the CLI."""

    kernel: str | None
    arch: str | None
    nic: str | None
    accel: str
    qemu: str
    backend: str | None
    libvirt_uri: str | None
    passthrough: str | None
    boot_timeout: float
    icount: bool
    no_snapshots: bool
    keep_logs: bool
    log_dir: Path
    image_cache: Path
    refresh_images: bool
    kernels_dir: Path
    images_dir: Path
    openwrt_mirror: str | None
    topology: str
    given: frozenset[str]  # the options the user set (command line or ini)

    @classmethod
    def resolve(cls, lookup: Callable[[str], Any], root: Path) -> Settings:
        """``lookup(name)`` is the user's value or None (paths relative to the working
        directory); ``root`` is where ``kernels/`` and ``images/`` are looked for."""
        raw = {name: lookup(name) for name in OPTIONS}
        given = frozenset(n for n, v in raw.items() if v not in (None, False, ""))
        value = {n: (raw[n] if n in given else OPTIONS[n].default) for n in OPTIONS}
        if value["accel"] not in (OPTIONS["accel"].choices or ()):  # ini values skip argparse
            raise ConfigError(f"unknown accelerator {value['accel']!r}", "use auto, kvm or tcg")
        if value["qemu"] not in QEMU_CHOICES:
            raise ConfigError(f"unknown --qemu {value['qemu']!r}", "use auto, host or debian")
        if value["topology"] not in TOPOLOGIES:
            raise ConfigError(f"unknown topology {value['topology']!r}", "use one-vm or two-vm")
        if value["backend"] not in (None, *BACKENDS):
            raise ConfigError(f"unknown backend {value['backend']!r}", "use qemu or libvirt")
        return cls(
            kernel=value["kernel"],
            arch=value["arch"],
            nic=value["nic"],
            accel=value["accel"],
            qemu=value["qemu"],
            backend=value["backend"],
            libvirt_uri=value["libvirt_uri"],
            passthrough=value["passthrough"],
            boot_timeout=_seconds(value["boot_timeout"], OPTIONS["boot_timeout"].flag),
            icount=bool(value["icount"]),
            no_snapshots=bool(value["no_snapshots"]),
            keep_logs=bool(value["keep_logs"]),
            log_dir=Path(value["log_dir"]).expanduser().absolute(),
            image_cache=Path(value["image_cache"]).expanduser()
            if value["image_cache"]
            else default_cache_dir(),
            refresh_images=bool(value["refresh_images"]),
            kernels_dir=_data_dir(value["kernels_dir"], root, "kernels"),
            images_dir=_data_dir(value["images_dir"], root, "images"),
            openwrt_mirror=value["openwrt_mirror"],
            topology=value["topology"],
            given=given,
        )

    def argv(self, *names: str) -> list[str]:
        """These settings as command-line options, for an inner ``pytest`` run."""
        out = []
        for name in names:
            value, option = getattr(self, name), OPTIONS[name]
            if option.switch:
                out += [option.flag] if value else []
            elif value is not None:
                out.append(f"{option.flag}={value}")
        return out

    @classmethod
    def from_pytest(cls, config: pytest.Config) -> Settings:
        def lookup(name: str) -> Any:
            value = config.getoption(name)
            if value is not None:
                return value
            value = config.getini(INI_PREFIX + name)
            if value and name in PATHS and config.inipath is not None:
                return config.inipath.parent / value  # relative to the ini file
            return value

        return cls.resolve(lookup, config.rootpath)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        return cls.resolve(lambda name: getattr(args, name, None), Path.cwd())


def _seconds(value: str | float, flag: str) -> float:
    """A positive number of seconds, or a clear error naming the option."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise ConfigError(f"{flag} {value!r} is not a positive number of seconds",
                          f"e.g. {flag} 1200")  # fmt: skip
    return seconds


def _data_dir(given: str | Path | None, root: Path, name: str) -> Path:
    """The user's directory, else ``<root>/<name>`` if it exists, else the packaged one."""
    if given:
        return Path(given).expanduser().absolute()
    local = root / name
    return local if local.is_dir() else packaged(name)
