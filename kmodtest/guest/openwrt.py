"""An OpenWrt router VM: boot the image as its boot path says, start our agent from the console.

OpenWrt has no agent of ours, but both of its QEMU targets build virtio-console into the
kernel. So the console is driven only as far as needed (:mod:`kmodtest.guest.console`):
the "Please press Enter to activate this console." prompt, Enter, the ash prompt; then the
shell finds the virtio-serial port named ``org.kmodtest.agent``, reads our agent script from
that port (``head -c``: exactly its length, nothing typed), and starts it in the background.
From there on the VM is driven like the Debian images: the same :class:`AgentChannel`,
testinfra backend and Host; a test cannot tell which router it has.

The disk is always a qcow2 overlay in the VM's run directory over the cached image. This is
the :class:`~kmodtest.guest.boot.Boot` of the ``openwrt`` lab plan
(:mod:`kmodtest.lifecycle.plans`); the network is :mod:`kmodtest.guest.openwrt_net`'s.
"""

from __future__ import annotations

import logging
import re
import shlex
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from kmodtest.errors import MachineError
from kmodtest.guest.boot import cell_machine
from kmodtest.guest.channel import AgentChannel, UnixSocketTransport
from kmodtest.guest.console import Console
from kmodtest.prepare.cells import Cell
from kmodtest.prepare.openwrt import OpenWrtImage
from kmodtest.run.disks import overlay
from kmodtest.run.launcher import RunningMachine
from kmodtest.run.machine import Disk, MachineSpec, Nic
from kmodtest.run.qemu import AGENT_PORT_NAME

log = logging.getLogger(__name__)

STEP_TIMEOUT = 60.0  # each console step once the shell is up
PRESS_ENTER = "Please press Enter to activate this console."
INIT_COMPLETE = "procd: - init complete -"  # in the kernel log once procd has run its init
# the ash prompt of OpenWrt's login shell (openwrt-tests matches root@[\w()]+:[^ ]+ )
SHELL_PROMPT = re.compile(r"root@[\w().-]+:\S*[#$] ")
GUEST_DIR = "/tmp/kmodtest"
PUT_CHUNK = 8192  # bytes of a file per agent command (4 characters each once escaped)
# busybox builds without stat (OpenWrt's default set has none): sizes from wc instead
SHADOWS = 'command -v stat >/dev/null 2>&1 || stat() { shift 2; for f; do wc -c <"$f"; done; }'


def agent_script() -> bytes:
    return resources.files("kmodtest.guest").joinpath("files", "agent").read_bytes()


@dataclass(frozen=True)
class OpenWrtBoot:
    """How an OpenWrt (or stand-in) image boots until our agent answers.

    The same two steps as every kind of image: a machine description for the cell's boot path
    (disk overlay, kernel and command line or firmware), and ``connect``: the console
    bootstrap, then the agent channel's first answer. ``packages`` (``--openwrt-package``) are
    installed right after, so the router a test gets runs the user's own build.
    """

    manager: str  # the image's package manager: opkg (up to 24.10) or apk (25.12+)
    packages: tuple[Path, ...] = ()

    def machine_spec(
        self, name: str, cell: Cell, image: OpenWrtImage, nics: tuple[Nic, ...], run_dir: Path,
        log_dir: Path, accel: str, icount: bool,
    ) -> MachineSpec:  # fmt: skip
        """The machine for the cell's boot path; creates the disk overlay in ``run_dir``."""
        src = cell.openwrt
        assert src is not None
        boot = src.boot_path
        disks: tuple[Disk, ...] = ()
        if image.disk is not None:
            disks = (overlay(image.disk, run_dir / "disk0.qcow2"),)
        kernel, initrd, cmdline = image.kernel, image.initrd, image.cmdline
        if boot == "firmware":  # SeaBIOS -> GRUB from the disk, as shipped
            kernel = initrd = cmdline = None
        elif boot == "initramfs":  # the initramfs kernel alone: its device tree names the console
            cmdline = None
        return cell_machine(
            cell, name, nics, run_dir, log_dir, accel, icount,
            kernel=kernel, initrd=initrd, cmdline=cmdline, disks=disks, console_input=True,
        )  # fmt: skip

    def connect(self, machine: RunningMachine, timeout: float) -> AgentChannel:
        """Console: login prompt, Enter, shell; agent from its port; procd done; first answer."""
        spec = machine.spec

        def alive() -> bool:
            return machine.alive

        console = Console(spec.console_socket, spec.console_log, alive)
        try:
            console.connect()
            transport = UnixSocketTransport.connect(spec.agent_socket, timeout=30, alive=alive)
            console.expect(re.escape(PRESS_ENTER), timeout, f"the login prompt ({PRESS_ENTER!r})")
            bootstrap_agent(console, transport)
        finally:
            console.close()  # QEMU now discards console output (still logging it)
        # procd's end of boot (services started) may come before or after the prompt
        console.mark = 0
        console.expect(re.escape(INIT_COMPLETE), STEP_TIMEOUT, f"procd's {INIT_COMPLETE!r}")
        channel = AgentChannel(transport, alive=alive)
        channel.run("true", timeout=STEP_TIMEOUT)
        copy = channel.run(f"cat {GUEST_DIR}/agent", timeout=STEP_TIMEOUT).stdout
        if copy != agent_script():
            raise MachineError("the agent script on the guest differs from ours")
        for package in self.packages:
            log.info("%s: installed %s:\n%s", spec.name, package, self.install(channel, package))
        return channel

    def install(self, channel: AgentChannel, path: Path) -> str:
        """Install a package file the user built (--openwrt-package); the installer's output."""
        target = f"{GUEST_DIR}/packages/{path.name}"
        put_file(channel, path.read_bytes(), target)
        return _check(channel, install_command(self.manager, target), timeout=300)


def bootstrap_agent(console: Console, transport: UnixSocketTransport) -> str:
    """After the login prompt: log in, start the agent on its virtio-serial port; its name."""
    console.line("")
    console.expect(SHELL_PROMPT, STEP_TIMEOUT, "the ash prompt (root@...# )")
    # results only a running shell prints: the echoed command line has $((...)), not the sum
    console.line("echo KT_$((20+22))")
    console.expect(r"KT_42", STEP_TIMEOUT, "the shell's answer to a first command")
    console.line(
        "for p in /sys/class/virtio-ports/*; do "
        f'[ "$(cat $p/name 2>/dev/null)" = {AGENT_PORT_NAME} ] && '
        'echo "KT_PORT=${p##*/}:$(cat $p/dev)"; done; echo KT_NO""PORT'
    )
    found = console.expect(
        r"KT_PORT=(vport\w+):(\d+):(\d+)|KT_NOPORT", STEP_TIMEOUT, "the agent port's name"
    )
    if found[1] is None:
        raise MachineError(
            f"the guest has no virtio-serial port named {AGENT_PORT_NAME} "
            "(/sys/class/virtio-ports lists none by that name)",
            "the kernel needs CONFIG_VIRTIO_CONSOLE (OpenWrt's x86/64 and armsr builds have it)",
        )
    port, major, minor = found[1], found[2], found[3]
    script = agent_script()
    console.line(
        f"mkdir -p {GUEST_DIR}/run; [ -c /dev/{port} ] || mknod /dev/{port} c {major} {minor}; "
        f"head -c {len(script)} /dev/{port} >{GUEST_DIR}/agent && "
        f"echo KT_GOT_$(( $(wc -c <{GUEST_DIR}/agent) + 0 ))"
    )
    transport.send(script)  # exactly the bytes head reads; nothing more until the agent runs
    console.expect(f"KT_GOT_{len(script)}\\b", STEP_TIMEOUT, "the agent script on the guest")
    console.line(f"printf '%s\\n' '{SHADOWS}' >{GUEST_DIR}/shadows; echo KT_$((30+3))")
    console.expect(r"KT_33", STEP_TIMEOUT, "the agent's helper file")
    console.line(
        f"export KMODTEST_RUN={GUEST_DIR}/run KMODTEST_SHADOWS={GUEST_DIR}/shadows; "
        f"sh {GUEST_DIR}/agent watchdog </dev/null >/dev/null 2>&1 & "
        f"( while :; do sh {GUEST_DIR}/agent /dev/{port}; sleep 1; done ) "
        "</dev/null >/dev/null 2>&1 & echo KT_$((50+5))"
    )
    console.expect(r"KT_55", STEP_TIMEOUT, "the agent's start")
    return port


def put_file(channel: AgentChannel, data: bytes, target: str) -> None:
    """Write ``data`` to ``target`` in the guest through the agent (no other channel)."""
    quoted = shlex.quote(target)
    _check(channel, f"mkdir -p $(dirname {quoted}); : >{quoted}")
    for offset in range(0, len(data), PUT_CHUNK):
        chunk = data[offset : offset + PUT_CHUNK]
        escaped = "".join(f"\\0{b:03o}" for b in chunk)  # printf %b octal
        _check(channel, f"printf '%b' '{escaped}' >>{quoted}")


def install_command(manager: str, path: str) -> str:
    """Install a package file the user built (a patched kmod-nft-offload from their SDK)."""
    quoted = shlex.quote(path)
    if manager == "opkg":
        return f"opkg install --force-reinstall --force-downgrade {quoted}"
    return f"apk add --allow-untrusted {quoted}"


def _check(channel: AgentChannel, command: str, timeout: float = STEP_TIMEOUT) -> str:
    reply = channel.run(command, timeout=timeout)
    if reply.exit_status != 0:
        raise MachineError(
            f"guest command failed (exit {reply.exit_status}): {command.strip()[:200]}\n"
            f"{(reply.stdout + reply.stderr).decode(errors='replace')[-1500:]}"
        )
    return reply.stdout.decode(errors="replace")
