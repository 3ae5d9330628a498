"""The machine description turns into the libvirt domain XML we expect, without booting.

The same :class:`MachineSpec` the QEMU argv tests use; the XML is compared as a golden value
and validated against libvirt's own schema with ``virt-xml-validate``.
"""

from __future__ import annotations

import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from kmodtest.arches import ARCHES
from kmodtest.errors import ConfigError
from kmodtest.guest.topology import Topology
from kmodtest.run import emulator
from kmodtest.run.domainxml import Owner, domain_xml, link_keys
from kmodtest.run.machine import MachineSpec
from kmodtest.run.ports import PortLease

RUN = Path("/tmp/kt-x")
PASSTHROUGH = {
    "lan": "0000:03:00.0",
    "client": "0000:03:00.1",
    "wan": "0000:04:00.0",
    "server": "0000:04:00.1",
}


# the golden XML is the host QEMU's (no <emulator>), whichever QEMU this run chose
pytestmark = pytest.mark.usefixtures("host_qemu")


def spec(arch: str = "x86_64", accel: str = "tcg", nic: str = "e1000", **kw) -> MachineSpec:
    topology = Topology(nic, passthrough=PASSTHROUGH if nic == "vfio-pci" else {})
    return MachineSpec(
        name="vm",
        arch=ARCHES[arch],
        machine=ARCHES[arch].machine,
        cpu=kw.pop("cpu", ARCHES[arch].cpu),
        memory_mb=512,
        kernel=Path("/img/kernel"),
        initrd=Path("/img/initrd.cpio"),
        cmdline="console=ttyS0",
        run_dir=RUN,
        log_dir=Path("/logs/vm"),
        accel=accel,
        nics=topology.nics(RUN),
        **kw,
    )


def render(s: MachineSpec) -> str:
    ports = {key: 40000 + i for i, key in enumerate(link_keys(s))}
    return domain_xml(s, ports, "kmodtest-vm-kt-x", Owner(1234, RUN))


GOLDEN_X86_E1000 = """\
<domain xmlns:kmodtest="urn:kmodtest:domain:1" type="qemu">
  <name>kmodtest-vm-kt-x</name>
  <metadata>
    <kmodtest:owner pid="1234" run_dir="/tmp/kt-x" />
  </metadata>
  <memory unit="MiB">512</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch="x86_64" machine="pc">hvm</type>
    <kernel>/img/kernel</kernel>
    <initrd>/img/initrd.cpio</initrd>
    <cmdline>console=ttyS0</cmdline>
  </os>
  <features>
    <acpi />
  </features>
  <cpu mode="maximum" check="none" />
  <clock offset="utc" />
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <serial type="file">
      <source path="/logs/vm/console.log" append="off" />
      <target port="0" />
    </serial>
    <controller type="virtio-serial" index="0">
      <address type="pci" domain="0x0000" bus="0x00" slot="0x02" function="0x0" />
    </controller>
    <channel type="unix">
      <source mode="bind" path="/tmp/kt-x/agent.sock" />
      <target type="virtio" name="org.kmodtest.agent" />
    </channel>
    <interface type="server">
      <mac address="52:54:00:6b:00:01" />
      <source address="127.0.0.1" port="40000" />
      <model type="e1000" />
      <alias name="ua-lan" />
      <rom enabled="no" />
      <address type="pci" domain="0x0000" bus="0x00" slot="0x03" function="0x0" />
    </interface>
    <interface type="client">
      <mac address="52:54:00:6b:01:01" />
      <source address="127.0.0.1" port="40000" />
      <model type="e1000" />
      <alias name="ua-lan-client" />
      <rom enabled="no" />
      <address type="pci" domain="0x0000" bus="0x00" slot="0x04" function="0x0" />
    </interface>
    <interface type="server">
      <mac address="52:54:00:6b:00:02" />
      <source address="127.0.0.1" port="40001" />
      <model type="e1000" />
      <alias name="ua-wan" />
      <rom enabled="no" />
      <address type="pci" domain="0x0000" bus="0x00" slot="0x05" function="0x0" />
    </interface>
    <interface type="client">
      <mac address="52:54:00:6b:02:01" />
      <source address="127.0.0.1" port="40001" />
      <model type="e1000" />
      <alias name="ua-wan-server" />
      <rom enabled="no" />
      <address type="pci" domain="0x0000" bus="0x00" slot="0x06" function="0x0" />
    </interface>
    <controller type="usb" model="none" />
    <memballoon model="none" />
  </devices>
</domain>
"""


def test_x86_e1000_golden():
    assert render(spec()) == GOLDEN_X86_E1000


def test_a_debian_qemu_is_named_as_the_domains_emulator(monkeypatch):
    script = "/cache/qemu/k/bin/qemu-system-x86_64"
    choice = emulator.QemuChoice(
        "x86_64", "qemu-system-x86_64", script, "Debian trixie 1:10.0", "older host QEMU"
    )
    monkeypatch.setattr(emulator, "_chosen", {"x86_64": choice})
    assert ET.fromstring(render(spec())).findtext("devices/emulator") == script


def test_each_link_is_one_tcp_connection_like_the_dgram_socket_pair():
    """One end of each link listens (server), its peer connects (client): one port per link."""
    root = ET.fromstring(render(spec(nic="virtio-net-pci")))
    ifaces = root.findall("devices/interface")
    assert [i.find("model").get("type") for i in ifaces] == ["virtio"] * 4
    assert [i.get("type") for i in ifaces] == ["server", "client"] * 2
    ports = [i.find("source").get("port") for i in ifaces]
    assert ports[0] == ports[1] and ports[2] == ports[3] and ports[0] != ports[2]
    assert {i.find("source").get("address") for i in ifaces} == {"127.0.0.1"}


def test_x86_devices_sit_in_the_slots_qemu_gives_them_in_our_argv():
    """virtio-serial in slot 2, the NICs from slot 3 in spec order (QEMU's own order, which
    decides which e1000s share an INTx line); passthrough NICs keep their pinned slots."""
    root = ET.fromstring(render(spec()))
    serial = root.find("devices/controller[@type='virtio-serial']/address")
    assert serial.attrib == {
        "type": "pci", "domain": "0x0000", "bus": "0x00", "slot": "0x02", "function": "0x0",
    }  # fmt: skip
    macs = [i.find("mac").get("address") for i in root.findall("devices/interface")]
    slots = [i.find("address").get("slot") for i in root.findall("devices/interface")]
    assert macs == [nic.mac for nic in spec().nics]
    assert slots == ["0x03", "0x04", "0x05", "0x06"]


def test_igbs_sit_two_slots_apart_like_in_our_argv():
    """igb's SR-IOV functions take the slots 16-17 above each igb: side by side they collide."""
    root = ET.fromstring(render(spec(nic="igb")))
    slots = [i.find("address").get("slot") for i in root.findall("devices/interface")]
    assert slots == ["0x03", "0x05", "0x07", "0x09"]


def test_kvm_domain_uses_host_cpu():
    root = ET.fromstring(render(spec(accel="kvm")))
    assert root.get("type") == "kvm"
    assert root.find("cpu").attrib == {"mode": "host-passthrough", "check": "none"}


def test_arm_cells_have_their_arch_machine_and_no_acpi():
    arm64 = ET.fromstring(render(spec(arch="arm64")))
    assert arm64.find("os/type").attrib == {"arch": "aarch64", "machine": "virt"}
    assert arm64.find("features") is None  # libvirt refuses ACPI on arm without UEFI
    # libvirt knows no aarch64 CPU feature, so not max,pauth=off: the arch's libvirt_cpu
    assert arm64.find("cpu").attrib == {"mode": "custom", "match": "exact", "check": "none"}
    assert arm64.find("cpu/model").text == "cortex-a76"
    assert arm64.find("cpu/feature") is None
    # a cell's own cpu is kept as it is
    custom = ET.fromstring(render(spec(arch="arm64", cpu="cortex-a57")))
    assert custom.find("cpu/model").text == "cortex-a57"
    # PCIe root: no pinned slots, libvirt places the devices behind root ports
    assert arm64.findall("devices/interface/address") == []
    armhf = ET.fromstring(render(spec(arch="armhf")))
    assert armhf.find("os/type").get("arch") == "armv7l"
    assert armhf.find("cpu/model").text == "cortex-a15"


def test_passthrough_nics_are_managed_hostdevs_at_pinned_guest_slots():
    root = ET.fromstring(render(spec(nic="vfio-pci")))
    assert root.findall("devices/interface") == []
    hostdevs = root.findall("devices/hostdev")
    assert [h.attrib for h in hostdevs] == [
        {"mode": "subsystem", "type": "pci", "managed": "yes"}
    ] * 4
    lan = hostdevs[0]
    assert lan.find("source/address").attrib == {
        "domain": "0x0000", "bus": "0x03", "slot": "0x00", "function": "0x0",
    }  # fmt: skip
    assert lan.find("address").attrib == {
        "type": "pci", "domain": "0x0000", "bus": "0x00", "slot": "0x10", "function": "0x0",
    }  # fmt: skip
    slots = [h.find("address").get("slot") for h in hostdevs]
    assert slots == ["0x10", "0x11", "0x12", "0x13"]


def test_what_libvirt_cannot_express_is_an_error():
    with pytest.raises(ConfigError, match="--icount has no libvirt form"):
        render(spec(icount=True))
    with pytest.raises(ConfigError, match="no libvirt form"):
        render(spec(cpu="max,sve-max-vq=2"))


def test_port_leases_never_hand_out_a_held_port():
    first = PortLease.take(8)
    second = PortLease.take(8)
    try:
        assert len(set(first.ports)) == 8
        assert not set(first.ports) & set(second.ports)
    finally:
        first.release()
        second.release()


@pytest.mark.skipif(not shutil.which("virt-xml-validate"), reason="virt-xml-validate not "
                    "installed (libvirt-clients; bash .ci/bootstrap installs it)")  # fmt: skip
@pytest.mark.parametrize(
    "kw",
    [
        {"nic": "e1000"},
        {"nic": "virtio-net-pci", "accel": "kvm"},
        {"nic": "vfio-pci"},
        {"arch": "arm64"},
        {"arch": "armhf", "nic": "e1000e"},
    ],
    ids=["e1000", "virtio-kvm", "passthrough", "arm64", "armhf"],
)
def test_domain_xml_is_valid_for_libvirt(tmp_path, kw):
    path = tmp_path / "domain.xml"
    path.write_text(render(spec(**kw)))
    result = subprocess.run(
        ["virt-xml-validate", str(path), "domain"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
