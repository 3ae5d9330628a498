"""The QEMU launcher: :class:`MachineSpec` -> argv, and a running :class:`QemuProcess`."""

from __future__ import annotations

import contextlib
import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path

from kmodtest import processes
from kmodtest.arches import Arch
from kmodtest.errors import MachineError
from kmodtest.nics import get_nic
from kmodtest.run.emulator import qemu_binary
from kmodtest.run.machine import HostPciLink, MachineSpec, nic_slot
from kmodtest.run.snapshot import resume_restored, save_state

log = logging.getLogger(__name__)

AGENT_PORT_NAME = "org.kmodtest.agent"


def option_path(path: object) -> str:
    """A path as a value inside a QEMU ``key=value,...`` option: commas doubled (QEMU's own
    escape), so a --log-dir or TMPDIR with a comma cannot add or cut options."""
    return str(path).replace(",", ",,")


def accel_option(spec: MachineSpec) -> str:
    """``-accel``'s value: TCG with more than one CPU says multi-threaded TCG (one host thread
    per emulated CPU; QEMU 7.2's default on x86_64, arm64 and armhf guests, said so it does not
    depend on it), except under -icount, which needs one thread for all CPUs."""
    if spec.accel == "tcg" and spec.smp > 1 and not spec.icount:
        return "tcg,thread=multi"
    return spec.accel


def qemu_argv(
    spec: MachineSpec, binary: str | None = None, incoming_fd: int | None = None
) -> list[str]:
    """The full command line; deterministic, so it is tested as a golden value.

    ``incoming_fd``: restore a saved state from that (inherited) fd instead of booting, and
    stay paused until QMP ``cont`` (:mod:`kmodtest.run.snapshot`)."""
    argv = [
        binary or qemu_binary(spec.arch),
        "-name", spec.name,
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-machine", spec.machine,
        "-accel", accel_option(spec),
        "-cpu", "host" if spec.accel == "kvm" else spec.cpu,
        "-smp", str(spec.smp),
        "-m", str(spec.memory_mb),
    ]  # fmt: skip
    if spec.firmware is not None:
        argv += ["-bios", option_path(spec.firmware)]
    if spec.kernel is not None:
        argv += ["-kernel", str(spec.kernel)]
        if spec.cmdline is not None:
            argv += ["-append", spec.cmdline]
    if spec.initrd:
        argv += ["-initrd", str(spec.initrd)]
    for index, disk in enumerate(spec.disks):
        drive = f"file={option_path(disk.path)},format={disk.format},if={disk.bus},index={index}"
        argv += ["-drive", drive]
    if spec.icount and spec.accel == "tcg":
        argv += ["-icount", "shift=0,sleep=off"]
    if spec.console_input:
        console = (
            f"socket,id=console,path={option_path(spec.console_socket)},server=on,wait=off,"
            f"logfile={option_path(spec.console_log)}"
        )
    else:
        console = f"file,id=console,path={option_path(spec.console_log)}"
    argv += [
        "-chardev", console,
        "-serial", "chardev:console",
        "-qmp", f"unix:{option_path(spec.qmp_socket)},server=on,wait=off",
        "-device", "virtio-serial-pci,id=vser0",
        "-chardev", f"socket,id=agent,path={option_path(spec.agent_socket)},server=on,wait=off",
        "-device", f"virtserialport,bus=vser0.0,chardev=agent,name={AGENT_PORT_NAME}",
    ]  # fmt: skip
    for nic in spec.nics:
        if isinstance(nic.link, HostPciLink):
            argv += [
                "-device",
                f"vfio-pci,host={nic.link.host},id={nic.name},addr={nic.link.guest_slot:#x}",
            ]
            continue
        # models that need room between devices get their slots; the others take QEMU's next
        addr = f",addr={nic_slot(spec.nics, nic):#x}" if get_nic(nic.model).pci_slots > 1 else ""
        argv += [
            "-netdev",
            f"dgram,id={nic.name},local.type=unix,local.path={option_path(nic.link.local)},"
            f"remote.type=unix,remote.path={option_path(nic.link.remote)}",
            "-device",
            # romfile= skips the PXE option ROM: nothing network-boots, and it saves boot time
            f"{nic.model},netdev={nic.name},mac={nic.mac},romfile={addr}",
        ]
    argv += spec.arch.extra_args
    if incoming_fd is not None:
        argv += ["-S", "-incoming", f"fd:{incoming_fd}"]
    return argv


def require_qemu(arch: Arch, needed_for: str = "") -> str:
    """The path of this run's QEMU for ``arch``; if absent, a MachineError naming its package."""
    return processes.require_tool(qemu_binary(arch), arch.qemu_package, needed_for, MachineError)


def find_qemu(spec: MachineSpec) -> str:
    return require_qemu(spec.arch, f"{spec.arch.name} cells")


@dataclass
class QemuProcess:
    """A started QEMU; ``stop()`` always kills and reaps it."""

    spec: MachineSpec
    proc: subprocess.Popen[bytes]

    @classmethod
    def start(
        cls, spec: MachineSpec, state: Path | None = None, detachable: bool = False
    ) -> QemuProcess:
        """Boot ``spec``, or with ``state`` load that saved state and wait paused; a
        ``detachable`` QEMU may outlive this process (--keep-vm-on-failure)."""
        binary = find_qemu(spec)
        spec.run_dir.mkdir(parents=True, exist_ok=True)
        spec.log_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as files:
            fds: tuple[int, ...] = ()
            if state is not None:
                fds = (files.enter_context(open(state, "rb")).fileno(),)
            argv = qemu_argv(spec, binary, incoming_fd=fds[0] if fds else None)
            (spec.log_dir / "qemu.argv").write_text(" ".join(argv) + "\n")
            log.info("starting %s: %s", spec.name, " ".join(argv))
            stderr = files.enter_context(open(spec.log_dir / "qemu.stderr", "wb"))
            proc = processes.spawn(
                argv, detachable, stdin=subprocess.DEVNULL, stdout=stderr,
                stderr=subprocess.STDOUT, pass_fds=fds,
            )  # fmt: skip
        return cls(spec, proc)

    def save(self, path: Path) -> None:
        """Write the running guest's state to ``path`` (it pauses meanwhile)."""
        save_state(self.spec, path)

    def resume(self) -> None:
        """Run a guest started from a saved state, once QEMU has loaded it."""
        resume_restored(self.spec, lambda: self.alive)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def stderr_text(self) -> str:
        try:
            return (self.spec.log_dir / "qemu.stderr").read_text(errors="replace").strip()
        except OSError:
            return ""

    def stop(self) -> int | None:
        return processes.terminate(self.proc)

    def detach(self) -> int:
        """Leave QEMU running after we exit (it must have been started detachable); its pid."""
        return processes.detach(self.proc)
