"""``kmodtest run``, ``shell``, ``ps``, ``attach``, ``stop``: a cell's router by hand.

A lab is booted by the same lifecycle pytest uses (:mod:`kmodtest.lifecycle`: same image,
same overlays, same boot and health windows), held for one command or one shell, and stopped.

Exit status of ``kmodtest run``: the command's own (0-255), except
  123  the guest kernel crashed or reported a problem (panic, Oops, BUG, ...): excerpt printed
  124  the command ran longer than ``--timeout`` (it was killed, with what it started)
  125  kmodtest could not run the command (bad option, image build or boot failed)
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import shlex
import shutil
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from kmodtest import processes
from kmodtest.errors import ChannelError, ConfigError, KmodtestError, MachineError
from kmodtest.face import kept, options
from kmodtest.face.terminal import ESCAPE_NAME, bridge, terminal_size
from kmodtest.guest.channel import AgentChannel, UnixSocketTransport
from kmodtest.guest.health import HealthProblem
from kmodtest.guest.router import Router
from kmodtest.guest.shell import GuestShell
from kmodtest.guest.stream import Runs, StreamedCommand
from kmodtest.lifecycle.case import VmCase
from kmodtest.lifecycle.images import Images
from kmodtest.lifecycle.pool import RouterPool
from kmodtest.prepare.cache import Cache
from kmodtest.prepare.cells import load_matrix
from kmodtest.prepare.images import ImageBuilder
from kmodtest.prepare.modchange import ModuleChange
from kmodtest.prepare.overlay import OverlayBuilder
from kmodtest.prepare.tools import Tools, ToolsLayer
from kmodtest.progress import Progress
from kmodtest.run.emulator import choose_qemu

EXIT_CRASH = 123
EXIT_TIMEOUT = 124
EXIT_KMODTEST = 125
PUT_CHUNK = 48 * 1024  # bytes of a file per agent request (base64 in the command line)


def err(text: str) -> None:
    print(f"kmodtest: {text}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Put:
    source: Path
    dest: str  # absolute path in the guest

    @classmethod
    def parse(cls, text: str) -> Put:
        src, _, dest = text.partition(":")
        source = Path(src).expanduser()
        if not source.exists():
            raise ConfigError(f"--put {text}: {source} does not exist", "name a file or directory")
        dest = dest or f"/root/{source.name}"
        if not dest.startswith("/"):
            raise ConfigError(f"--put {text}: {dest!r} is not an absolute guest path",
                              "write SRC:/path/in/guest")  # fmt: skip
        return cls(source, dest)


def put(guest: Runs, item: Put) -> None:
    """Copy a host file or directory into the guest (a tar, base64 in chunks over the agent)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(item.source, arcname=os.path.basename(item.dest.rstrip("/")) or ".")
    data = buf.getvalue()
    parent = os.path.dirname(item.dest.rstrip("/")) or "/"
    staging = f"/run/kmodtest/put-{os.getpid()}-{time.time_ns()}.tar"
    guest.run(f": >{staging}", timeout=30)
    for at in range(0, len(data), PUT_CHUNK):
        text = base64.b64encode(data[at : at + PUT_CHUNK]).decode()
        reply = guest.run(f"echo {text} | base64 -d >>{staging}", timeout=60)
        if reply.exit_status != 0:
            raise ChannelError(f"copying {item.source} into the guest failed: {reply.stderr!r}")
    reply = guest.run(
        f"mkdir -p {shlex.quote(parent)} && tar -xf {staging} -C {shlex.quote(parent)}; "
        f"rc=$?; rm -f {staging}; exit $rc",
        timeout=120,
    )
    if reply.exit_status != 0:
        raise ChannelError(
            f"unpacking {item.source} at {item.dest} in the guest failed: "
            f"{reply.stderr.decode(errors='replace').strip()}"
        )


@contextmanager
def follow_console(path: Path, enabled: bool) -> Iterator[None]:
    """With ``-v``: the guest console, as it is written, on stderr."""
    if not enabled:
        yield
        return
    done = threading.Event()

    def copy() -> None:
        offset = 0
        while not done.is_set():
            try:
                with open(path, "rb") as console:
                    console.seek(offset)
                    chunk = console.read()
            except FileNotFoundError:
                chunk = b""
            if chunk:
                offset += len(chunk)
                sys.stderr.buffer.write(chunk)
                sys.stderr.buffer.flush()
            done.wait(0.2)

    thread = threading.Thread(target=copy, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(1)


def command_text(words: list[str]) -> str:
    """``-- CMD...``: one word is shell text as it is (``-- 'a; b'``); several are quoted."""
    if words and words[0] == "--":
        words = words[1:]
    if not words:
        raise ConfigError("no command given", "put it after --: kmodtest run -- nft --version")
    return words[0] if len(words) == 1 else shlex.join(words)


def _pool(args: argparse.Namespace, network: bool) -> tuple[RouterPool, VmCase]:
    settings = options.Settings.from_args(args)
    matrix = load_matrix(settings.kernels_dir)
    if (settings.kernel and "," in settings.kernel) or settings.kernel == "all":
        raise ConfigError(f"--kernel {settings.kernel}: one cell at a time",
                          f"name one of: {', '.join(matrix.ids)}")  # fmt: skip
    cell = matrix.get(settings.kernel) if settings.kernel else matrix.default
    nics = cell.nic_cases
    nic = settings.nic or nics[0]
    if nic not in nics:
        raise ConfigError(f"--nic {nic}: not a NIC model of {cell.id}",
                          f"use one of: {', '.join(nics)}")  # fmt: skip
    cache = Cache(settings.image_cache)
    choose_qemu([cell.arch, matrix.default.arch], settings.qemu, cache,
                Progress(quiet=not args.verbose))  # fmt: skip
    log_root = settings.log_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{args.command}-{os.getpid()}"
    overlay = None
    if getattr(args, "module_patch", None):
        change = ModuleChange(patch=Path(args.module_patch).absolute())
        change.check()
        overlay = OverlayBuilder(cache, change, Progress(quiet=not args.verbose), log_root)
    extra = Tools(tuple(_split(getattr(args, "package", None))),
                  tuple(_split(getattr(args, "module", None))))  # fmt: skip
    images = Images(
        ImageBuilder(cache, settings.images_dir, Progress(quiet=not args.verbose)),
        refresh=settings.refresh_images, overlay=overlay,
        tools=ToolsLayer(cache, extra, Progress(quiet=not args.verbose)),
    )  # fmt: skip
    pool = RouterPool(
        images, log_root, accel=settings.accel, icount=settings.icount,
        backend=settings.backend, libvirt_uri=settings.libvirt_uri, configure_network=network,
        boot_timeout=settings.boot_timeout,
    )  # fmt: skip
    return pool, VmCase(cell, nic)


def _split(values: list[str] | None) -> list[str]:
    """Repeatable, comma-separated options (``--package bash,socat --package iputils-ping``)."""
    return [v.strip() for value in values or [] for v in value.split(",") if v.strip()]


def _still_running(router: Router, within: float = 10.0) -> bool:
    """Whether the VM is still running ``within`` s after its channel broke (a panicking
    guest's channel may close a moment before QEMU exits)."""
    deadline = time.monotonic() + within
    while router.alive and time.monotonic() < deadline:
        time.sleep(0.1)
    return router.alive


def _crash_report(router: Router, cause: str) -> int:
    problem = router.health(leaks=False) if router.alive else router.stop()
    if problem is None:
        problem = HealthProblem(cause, "")
    err(f"the guest kernel crashed or reported a problem ({cause})\n{problem}")
    err(f"console log: {router.console_log}")
    return EXIT_CRASH


def cmd_run(args: argparse.Namespace) -> int:
    try:
        command = command_text(args.cmd)
        puts = [Put.parse(p) for p in args.put or []]
        pool, case = _pool(args, network=args.network)
    except KmodtestError as exc:
        err(str(exc))
        return EXIT_KMODTEST
    rc = EXIT_KMODTEST
    try:
        rc = _run_held(pool, case, command, puts, args)
        return rc
    finally:
        with processes.signals_held():
            pool.close()
        if rc == 0 and not args.keep_logs:  # the console log stays when anything failed
            shutil.rmtree(pool.log_root, ignore_errors=True)


def _run_held(
    pool: RouterPool, case: VmCase, command: str, puts: list[Put], args: argparse.Namespace
) -> int:
    try:
        router = pool.acquire(case)
    except KmodtestError as exc:
        err(str(exc))
        return EXIT_KMODTEST
    if args.verbose:
        err(f"{router.name}: kernel {router.image.kernel_version}")
    with follow_console(router.console_log, args.verbose):
        try:
            for item in puts:
                put(router.vm, item)
            streamed = StreamedCommand(router.vm, command)
            streamed.start()
            out: BinaryIO = sys.stdout.buffer
            result = streamed.wait(out, sys.stderr.buffer, args.timeout)
        except (ChannelError, MachineError) as exc:
            if not _still_running(router):
                return _crash_report(router, f"the VM exited: {exc.problem}")
            err(str(exc))
            return EXIT_KMODTEST
        if problem := router.health(leaks=False):
            err(f"the guest kernel reported a problem while the command ran\n{problem}")
            err(f"console log: {router.console_log}")
            return EXIT_CRASH
    if result.timed_out:
        err(f"the command ran longer than --timeout {args.timeout:g} s and was killed")
        return EXIT_TIMEOUT
    assert result.exit_status is not None
    return result.exit_status


def shell_session(
    guest: Runs, qmp_socket: Path, run_dir: Path, console_log: Path, vm_stays: bool
) -> int:
    """A shell on the user's terminal until they leave (Ctrl-]) or it exits. ``vm_stays``
    (a kept VM): the guest's shell and its console port are removed after; else only the
    host end closes, as the caller stops the VM."""
    rows, cols = terminal_size(sys.stdin.fileno())
    shell = GuestShell(guest, qmp_socket, run_dir)
    err(f"console log: {console_log}")
    err(f"a root shell in the guest; leave with {ESCAPE_NAME} (or exit the shell)")
    try:
        sock = shell.open(os.environ.get("TERM", "vt100"), rows, cols)
        how = bridge(sock, sys.stdin.fileno(), sys.stdout.fileno(), shell.resize)
    finally:
        with processes.signals_held():
            shell.close(unplug=vm_stays)
    print(file=sys.stderr)
    err(f"left the shell ({how})")
    return 0


def cmd_shell(args: argparse.Namespace) -> int:
    """The VM goes with the shell however it ends: the escape, the shell's exit, end of input,
    a hangup, a signal or an exception (and SIGKILL: QEMU's death signal)."""
    pool, case = _pool(args, network=args.network)
    try:
        router = pool.acquire(case)
        with follow_console(router.console_log, args.verbose):
            return shell_session(router.vm, router.spec.qmp_socket, router.spec.run_dir,
                                 router.console_log, vm_stays=False)  # fmt: skip
    finally:
        with processes.signals_held():
            pool.close()


def cmd_selftests(args: argparse.Namespace) -> int:
    """Copy the cell kernel's own tools/testing/selftests/net into ``--out``."""
    from kmodtest.prepare.overlay import kernel_packages
    from kmodtest.prepare.selftests import copy_selftests, get_selftests

    pool, case = _pool(args, network=False)
    progress = Progress(quiet=not args.verbose)
    base = pool.images.builder.get(case.cell, refresh=pool.images.refresh)
    tree = get_selftests(pool.images.builder.cache, kernel_packages(case.cell, base), progress)
    copy_selftests(tree, Path(args.out))
    print(f"{args.out}: tools/testing/selftests/net of kernel {base.kernel_version}")
    return 0


def cmd_ps(args: argparse.Namespace) -> int:
    vms = kept.kept_vms()
    if not vms:
        print(f"no kept VMs ({kept.vms_dir()})")
        return 0
    print(f"{'ID':<44} {'PID':>7}  {'KEPT':<19}  TEST")
    for vm in vms:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(vm.kept_at))
        print(f"{vm.id:<44} {vm.pid:>7}  {when:<19}  {vm.test}")
        print(f"{'':<44} {'':>7}  kernel {vm.kernel}, console {vm.console_log}")
    return 0


def cmd_attach(args: argparse.Namespace) -> int:
    vm = kept.find(args.id)
    transport = UnixSocketTransport.connect(Path(vm.agent_socket), 10, lambda: vm.alive)
    channel = AgentChannel(transport, alive=lambda: vm.alive)
    try:
        try:
            channel.run("true", timeout=10)
        except ChannelError as exc:
            raise MachineError(
                f"kept VM {vm.id}: its guest agent does not answer ({exc.problem})",
                f"see its console log {vm.console_log}; kmodtest stop {vm.id} removes it",
            ) from None
        err(f"attached to {vm.id} (left by {vm.test})")
        return shell_session(channel, Path(vm.qmp_socket), Path(vm.lab_dir),
                             Path(vm.console_log), vm_stays=True)  # fmt: skip
    finally:
        channel.close()


def cmd_stop(args: argparse.Namespace) -> int:
    if args.all == bool(args.id):
        raise ConfigError("name one kept VM or --all", "kmodtest stop ID  |  kmodtest stop --all")
    vms = kept.kept_vms() if args.all else [kept.find(args.id)]
    for vm in vms:
        vm.stop()
        print(f"stopped {vm.id}")
    if not vms:
        print("no kept VMs")
    return 0


def _lab_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="show image builds and stream the guest console to stderr")  # fmt: skip
    names = ["kernel", "nic", "accel", "qemu", "backend", "libvirt_uri", "icount",
             "boot_timeout", "log_dir", "keep_logs"]  # fmt: skip
    options.add_to_argparse(p, [*names, "refresh_images", *options.DIRS])
    p.add_argument("--package", action="append", metavar="PKG[,PKG...]",
                   help="Debian packages (of the cell's suite) to add to the image, as a cached "
                   "layer; repeatable")  # fmt: skip
    p.add_argument("--module", action="append", metavar="MOD[,MOD...]",
                   help="modules of the cell's kernel to add (with their dependencies), in the "
                   "same layer; repeatable")  # fmt: skip
    # not --topology: that is pytest's one-vm/two-vm option, which Settings reads from args
    p.add_argument("--network", action="store_true",
                   help="set up the test network first (the router's lan/wan ports, the "
                   "client and server namespaces), as the pytest fixtures do")  # fmt: skip


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "run", help="boot a cell's router, run one command in it, stream its output",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    _lab_options(p)
    p.add_argument("--module-patch", metavar="PATCH",
                   help="boot with the netfilter modules rebuilt with this patch (as pytest "
                   "--module-patch)")  # fmt: skip
    p.add_argument("--put", action="append", metavar="SRC[:DEST]",
                   help="copy a host file or directory into the guest before the command "
                   "(DEST default: /root/<name>); repeatable")  # fmt: skip
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="kill the command after this long (exit 124); default: none")  # fmt: skip
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD...",
                   help="the command (one word: shell text as is; several: quoted)")  # fmt: skip
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "shell", help=f"an interactive root shell in a cell's router (leave: {ESCAPE_NAME})",
        description=f"Boot the cell's router and open a root shell in it on this terminal "
        f"(raw mode: Ctrl-C and every other key go to the guest; the window size follows "
        f"yours). {ESCAPE_NAME} leaves; the VM is stopped then.",
    )  # fmt: skip
    _lab_options(p)
    p.set_defaults(func=cmd_shell)

    p = sub.add_parser(
        "selftests", help="copy the cell kernel's tools/testing/selftests/net (from its "
        "Debian linux-source package) into a directory, for kmodtest run --put",
    )  # fmt: skip
    options.add_to_argparse(p, ["kernel", "refresh_images", *options.DIRS])
    p.add_argument("--out", required=True, metavar="DIR", help="where the net/ tree goes")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="show the package fetch")  # fmt: skip
    p.set_defaults(func=cmd_selftests, command="selftests")

    p = sub.add_parser("ps", help="list VMs kept by pytest --keep-vm-on-failure")
    p.set_defaults(func=cmd_ps)
    p = sub.add_parser("attach", help=f"a root shell in a kept VM (leave: {ESCAPE_NAME}; the "
                       "VM keeps running)")  # fmt: skip
    p.add_argument("id", help="the kept VM's id (or a unique prefix), from kmodtest ps")
    p.set_defaults(func=cmd_attach)
    p = sub.add_parser("stop", help="stop kept VMs")
    p.add_argument("id", nargs="?", help="the kept VM's id (or a unique prefix)")
    p.add_argument("--all", action="store_true", help="stop every kept VM")
    p.set_defaults(func=cmd_stop)
