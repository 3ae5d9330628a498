"""The fixtures kmodtest ships: a project gets them from ``pip install kmodtest`` alone.

``router``: a booted router of the test's VM case (reused across the case's tests, reset
between them); ``router_host``: its testinfra Host; ``endpoints``: the Host holding the client
and server namespaces (the router itself, or an OpenWrt lab's endpoints VM); ``host``: the
router's Host under testinfra's own name (see :class:`HostAlias`); ``nft``: an nft helper on
it; ``kmodtest_session``: the run. They compose the lifecycle (:mod:`kmodtest.lifecycle`)
and stay thin.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import testinfra.host

from kmodtest.face.session import KmodtestSession
from kmodtest.guest.nft import Nft
from kmodtest.guest.router import Router
from kmodtest.lifecycle.case import VmCase
from kmodtest.prepare.openwrt import OpenWrtImage
from kmodtest.run.passthrough import PassthroughUnavailable

SESSION_KEY = pytest.StashKey[KmodtestSession]()
ROUTER_KEY = pytest.StashKey[tuple[KmodtestSession, VmCase, Router]]()  # on the test item


@pytest.fixture(scope="session")
def kmodtest_session(pytestconfig: pytest.Config) -> KmodtestSession:
    return pytestconfig.stash[SESSION_KEY]


@pytest.fixture
def router(
    vm_case: VmCase, kmodtest_session: KmodtestSession, request: pytest.FixtureRequest
) -> Iterator[Router]:
    """A booted router (reused across tests of the same case), reset to the base network."""
    pool = kmodtest_session.pool
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():  # let build/boot progress reach the terminal
        try:
            vm = pool.acquire(vm_case)
        except PassthroughUnavailable as exc:
            pytest.skip(exc.problem)
    request.node.stash[ROUTER_KEY] = (kmodtest_session, vm_case, vm)
    props = request.node.user_properties
    props.append(("kernel_release", vm.image.kernel_version))
    props.append(("arch", vm.cell.arch.name))
    # the boot of the VM serving this test (reused VMs repeat it): `kmodtest bench-matrix` reads it
    props.append(("vm_boot_seconds", f"{vm.boot_seconds:.2f}"))
    props.append(("vm_boot", str(vm.console_log.parent)))
    props.append(("console_log", str(vm.console_log)))
    props.append(("topology", "two-vm" if len(vm.guests) > 1 else "one-vm"))
    if isinstance(vm.image, OpenWrtImage):  # what a report must say about an OpenWrt router
        props.append(("openwrt", vm.image.description))
        props.append(("kmod_nft_offload", vm.image.offload_package or "not read from the image"))
    yield vm
    # the reset after the test and its health window were handled with the test's report
    # (plugin.pytest_runtest_makereport); what is left is the console of a router stopped now
    if problem := pool.release(vm_case):
        pytest.fail(
            f"kmodtest: the kernel reported a problem after this test, when its VM stopped\n"
            f"{problem}\nconsole log: {vm.console_log}",
            pytrace=False,
        )


@pytest.fixture
def router_host(router: Router) -> testinfra.host.Host:
    """The router as a testinfra Host: ``host.run``, ``host.file``, ``host.sysctl`` ..."""
    return router.host


@pytest.fixture
def endpoints(router: Router) -> testinfra.host.Host:
    """Where the client and server namespaces live: the router's own Host in one-VM labs,
    the endpoints VM's next to an OpenWrt router. Traffic helpers run there."""
    return router.endpoints.host


@pytest.fixture
def nft(router_host: testinfra.host.Host) -> Nft:
    """``nft`` on the router: JSON listings, atomic batches (:class:`kmodtest.guest.nft.Nft`)."""
    return Nft(router_host)


class HostAlias:
    """``host`` is the router's Host in tests that run on a router.

    pytest-testinfra (a kmodtest dependency, so present wherever kmodtest is) defines ``host``
    too: the local machine unless ``--hosts`` says otherwise. Two plugins' fixtures of one name
    resolve by registration order, and entry-point plugins load in whatever order the
    installed distributions are listed, so which ``host`` won would be an accident. A kmodtest
    test that silently got testinfra's would run ``nft flush ruleset`` on the developer's
    machine. So this alias is registered after every entry-point plugin (from
    ``pytest_configure``) and wins deterministically; ``router_host`` is the same Host under
    a name nothing else uses. A project that wants testinfra's ``host`` sets the ini option
    ``kmodtest_host_fixture = false`` (testinfra's ``--hosts``/``testinfra_hosts`` with the
    alias on is refused with that advice, never silently replaced); a conftest ``host`` of
    the project's own always wins over both plugins.
    """

    NAME = "kmodtest-host-alias"

    @pytest.fixture
    def host(self, router_host: testinfra.host.Host) -> testinfra.host.Host:
        """The router as a testinfra Host (kmodtest's alias of ``router_host``)."""
        return router_host
