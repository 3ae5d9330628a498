"""The libvirt launcher: a :class:`MachineSpec` started as a *transient* libvirt domain.

The domain never outlives its run, whatever ends it:

- released VM, end of session, SIGINT/SIGTERM (turned into KeyboardInterrupt by
  :mod:`kmodtest.processes`): :meth:`LibvirtMachine.stop` destroys it;
- interpreter exit with domains still registered: an ``atexit`` hook destroys them;
- the client dies (even SIGKILL) or its connection drops: the domain is started with
  ``VIR_DOMAIN_START_AUTODESTROY``, so libvirtd destroys it when the connection that created it
  closes; keep-alive (5 s x 3) notices a dead daemon or link, and the close callback marks every
  machine of that connection as gone, so a waiting test fails at once instead of timing out.

libvirt-python is imported lazily: the QEMU backend works without it.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kmodtest import processes
from kmodtest.errors import MachineError
from kmodtest.run.domainxml import Owner, domain_xml, link_keys
from kmodtest.run.machine import MachineSpec
from kmodtest.run.ports import PortLease

if TYPE_CHECKING:
    import libvirt as libvirt_t

log = logging.getLogger(__name__)

DEFAULT_URI = "qemu:///system"
KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 5, 3
BIND_RETRIES = 3  # new ports when something outside kmodtest took one before QEMU bound it
DOMAIN_LOG_DIR = Path("/var/log/libvirt/qemu")  # where a local system libvirtd logs each domain
LIBVIRTD_FIX = (
    "start libvirtd and virtlogd (without systemd, as root: bash .ci/libvirtd-up; with "
    "systemd: systemctl start libvirtd), or point --libvirt-uri at a running one"
)

_lock = threading.Lock()
_connections: dict[str, Connection] = {}
_machines: set[LibvirtMachine] = set()
_event_loop_started = False


def _libvirt() -> Any:
    try:
        import libvirt
    except ImportError:
        raise MachineError(
            "the libvirt backend needs libvirt-python, which is not installed",
            "bash .ci/bootstrap (builds it against libvirt-dev), or: "
            "pip install libvirt-python (needs libvirt-dev and pkg-config)",
        ) from None
    return libvirt


def _start_event_loop(libvirt: Any) -> None:
    """libvirt's default event loop in a daemon thread: keep-alive, close and domain events."""
    global _event_loop_started
    if _event_loop_started:
        return
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors arrive as exceptions
    libvirt.virEventRegisterDefaultImpl()

    def run() -> None:
        while True:
            libvirt.virEventRunDefaultImpl()

    threading.Thread(target=run, name="libvirt-events", daemon=True).start()
    _event_loop_started = True


@dataclass(eq=False)
class Connection:
    """One libvirt connection per URI and process, with keep-alive and a close callback."""

    uri: str
    conn: libvirt_t.virConnect
    closed: str | None = None  # why libvirt closed it

    @classmethod
    def get(cls, uri: str) -> Connection:
        libvirt = _libvirt()
        with _lock:
            current = _connections.get(uri)
            if current is not None and current.closed is None:
                return current
            _start_event_loop(libvirt)
            try:
                conn = libvirt.open(uri)
            except libvirt.libvirtError as exc:
                raise MachineError(
                    f"cannot connect to libvirt at {uri}: {exc.get_error_message()}",
                    LIBVIRTD_FIX,
                ) from None
            connection = cls(uri, conn)
            conn.setKeepAlive(KEEPALIVE_INTERVAL, KEEPALIVE_COUNT)
            conn.registerCloseCallback(connection._on_close, None)
            conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, connection._on_lifecycle, None
            )
            _connections[uri] = connection
            return connection

    def _on_close(self, _conn: Any, reason: int, _opaque: Any) -> None:
        names = {0: "error", 1: "end of file", 2: "keep-alive timeout", 3: "client request"}
        self.closed = f"libvirt connection to {self.uri} closed ({names.get(reason, reason)})"
        for machine in list(_machines):
            if machine.connection is self:
                machine.gone = machine.gone or self.closed

    def _on_lifecycle(self, _conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
        libvirt = _libvirt()
        if event not in (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_CRASHED):
            return
        for machine in list(_machines):
            if machine.connection is self and machine.name == dom.name():
                machine.gone = machine.gone or _stop_reason(libvirt, event, detail)


def _stop_reason(libvirt: Any, event: int, detail: int) -> str:
    if event == libvirt.VIR_DOMAIN_EVENT_CRASHED:
        return "the domain crashed"
    return {
        libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN: "the guest shut down or rebooted",
        libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED: "the domain was destroyed",
        libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED: "QEMU crashed",
        libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED: "QEMU failed",
    }.get(detail, f"the domain stopped (detail {detail})")


@dataclass(eq=False)
class LibvirtMachine:
    """A started transient domain; ``stop()`` destroys it and frees its ports."""

    spec: MachineSpec
    name: str
    connection: Connection
    dom: libvirt_t.virDomain
    lease: PortLease
    gone: str | None = None  # why the domain is no longer running, once known
    stopped: bool = field(default=False)

    @property
    def alive(self) -> bool:
        if self.gone or self.stopped:
            return False
        try:
            return bool(self.dom.isActive())
        except Exception as exc:  # libvirtError: the connection or the domain is gone
            self.gone = f"libvirt: {exc}"
            return False

    @property
    def returncode(self) -> int | None:
        return None  # libvirt does not report QEMU's exit status; stderr_text() says why

    def stderr_text(self) -> str:
        parts = [self.gone] if self.gone else []
        for path in (self.spec.log_dir / "libvirt-domain.log", DOMAIN_LOG_DIR / f"{self.name}.log"):
            with contextlib.suppress(OSError):
                parts.append(path.read_text(errors="replace").strip())
                break
        return "\n".join(parts)

    def stop(self) -> int | None:
        if self.stopped:
            return None
        self.stopped = True
        try:
            _destroy(self.connection, self.name, self.dom)
        finally:
            self.lease.release()
            _keep_domain_log(self.name, self.spec.log_dir)
            with _lock:
                _machines.discard(self)
        return None


def _destroy(connection: Connection, name: str, dom: Any) -> None:
    """Destroy the domain, through a new connection if the old one closed."""
    libvirt = _libvirt()
    if connection.closed is not None:
        try:
            dom = Connection.get(connection.uri).conn.lookupByName(name)
        except (MachineError, libvirt.libvirtError):
            return  # no daemon, or no such domain: autodestroy already took it
    try:
        dom.destroy()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN and dom.isActive():
            raise MachineError(f"could not destroy libvirt domain {name}: {exc}") from None


def _keep_domain_log(name: str, log_dir: Path) -> None:
    """Move libvirt's per-domain log next to the console log (names are unique per VM)."""
    source = DOMAIN_LOG_DIR / f"{name}.log"
    with contextlib.suppress(OSError):
        (log_dir / "libvirt-domain.log").write_bytes(source.read_bytes())
        source.unlink()


def domain_name(spec: MachineSpec) -> str:
    """Unique per VM (the run directory is a fresh mkdtemp), recognisable as kmodtest's."""
    return f"kmodtest-{spec.name}-{spec.run_dir.name}"


@dataclass
class LibvirtLauncher:
    """Starts each :class:`MachineSpec` as a transient domain on ``uri``."""

    uri: str = DEFAULT_URI
    name: str = "libvirt"

    def check(self) -> None:
        """Connect now, so an unreachable daemon fails before any test runs."""
        Connection.get(self.uri)

    def start(self, spec: MachineSpec) -> LibvirtMachine:
        libvirt = _libvirt()
        processes.install_signal_handlers()  # SIGTERM/SIGHUP unwind to stop(), as for QEMU
        connection = Connection.get(self.uri)
        spec.run_dir.mkdir(parents=True, exist_ok=True)
        spec.log_dir.mkdir(parents=True, exist_ok=True)
        name = domain_name(spec)
        links = link_keys(spec)
        for attempt in range(1, BIND_RETRIES + 1):
            lease = PortLease.take(len(links))
            xml = domain_xml(spec, dict(zip(links, lease.ports, strict=True)), name,
                             Owner(os.getpid(), spec.run_dir))  # fmt: skip
            (spec.log_dir / "domain.xml").write_text(xml)
            log.info("starting libvirt domain %s on %s", name, self.uri)
            began = time.monotonic()
            try:
                dom = connection.conn.createXML(xml, libvirt.VIR_DOMAIN_START_AUTODESTROY)
            except libvirt.libvirtError as exc:
                lease.release()
                message = exc.get_error_message() or str(exc)
                if "Address already in use" in message and attempt < BIND_RETRIES:
                    log.info("a link port was taken before QEMU bound it; retrying")
                    continue
                _keep_domain_log(name, spec.log_dir)
                raise MachineError(
                    f"libvirt could not start {name}: {message}",
                    f"see {spec.log_dir / 'domain.xml'} and {spec.log_dir / 'libvirt-domain.log'}",
                ) from None
            log.info("libvirt domain %s started in %.1f s", name, time.monotonic() - began)
            machine = LibvirtMachine(spec, name, connection, dom, lease)
            with _lock:
                _machines.add(machine)
            return machine
        raise AssertionError("unreachable")


def destroy_all() -> None:
    """Destroy every domain this process started and still holds (atexit, last resort)."""
    for machine in list(_machines):
        with contextlib.suppress(Exception):
            machine.stop()


atexit.register(destroy_all)
