"""The smallest kernel configuration this suite runs on, as a fragment over ``tinyconfig``.

Like KUnit's and virtme-ng's minimal configs: only what the router image and the tests use
(direct boot with an initramfs, a serial console, virtio-serial for the agent, virtio-net and
e1000/e1000e NICs, veth, network namespaces, IPv4/IPv6 forwarding, conntrack, NAT, nftables
and the flowtable). Netfilter pieces are modules, so the image builder's module closure and
``modprobe`` in the guest work as on a distribution kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

COMMON = """
CONFIG_PRINTK=y
CONFIG_BUG=y
CONFIG_TTY=y
CONFIG_UNIX98_PTYS=y
CONFIG_BLK_DEV_INITRD=y
CONFIG_BINFMT_ELF=y
CONFIG_BINFMT_SCRIPT=y
CONFIG_DEVTMPFS=y
CONFIG_PROC_FS=y
CONFIG_PROC_SYSCTL=y
CONFIG_SYSFS=y
CONFIG_TMPFS=y
CONFIG_DEBUG_FS=y
CONFIG_MULTIUSER=y
CONFIG_FUTEX=y
CONFIG_EPOLL=y
CONFIG_SIGNALFD=y
CONFIG_TIMERFD=y
CONFIG_EVENTFD=y
CONFIG_SHMEM=y
CONFIG_FILE_LOCKING=y
CONFIG_POSIX_TIMERS=y
CONFIG_FHANDLE=y
CONFIG_NAMESPACES=y
CONFIG_UTS_NS=y
CONFIG_NET_NS=y
CONFIG_MODULES=y
CONFIG_MODULE_UNLOAD=y
CONFIG_PCI=y
CONFIG_VIRTIO_MENU=y
CONFIG_VIRTIO_PCI=y
CONFIG_VIRTIO_CONSOLE=m
CONFIG_NET=y
CONFIG_UNIX=y
CONFIG_PACKET=y
CONFIG_INET=y
CONFIG_IPV6=y
CONFIG_IP_ADVANCED_ROUTER=y
CONFIG_IP_MULTIPLE_TABLES=y
CONFIG_IPV6_MULTIPLE_TABLES=y
CONFIG_NETDEVICES=y
CONFIG_NET_CORE=y
CONFIG_ETHERNET=y
CONFIG_NET_VENDOR_INTEL=y
CONFIG_E1000=m
CONFIG_E1000E=m
CONFIG_VIRTIO_NET=m
CONFIG_VETH=m
CONFIG_NETFILTER=y
CONFIG_NETFILTER_ADVANCED=y
CONFIG_NETFILTER_INGRESS=y
CONFIG_NETFILTER_NETLINK=m
CONFIG_NF_CONNTRACK=m
CONFIG_NF_CONNTRACK_PROCFS=y
CONFIG_NF_CONNTRACK_TIMESTAMP=y
CONFIG_NF_CT_NETLINK=m
CONFIG_NF_NAT=m
CONFIG_NF_TABLES=m
CONFIG_NF_TABLES_INET=y
CONFIG_NF_TABLES_IPV4=y
CONFIG_NF_TABLES_IPV6=y
CONFIG_NF_TABLES_NETDEV=y
CONFIG_NFT_CT=m
CONFIG_NFT_NAT=m
CONFIG_NFT_MASQ=m
CONFIG_NFT_REJECT=m
CONFIG_NFT_FIB_INET=m
CONFIG_NFT_FIB_IPV4=m
CONFIG_NFT_FIB_IPV6=m
CONFIG_NFT_LIMIT=m
CONFIG_NFT_LOG=m
CONFIG_NF_FLOW_TABLE=m
CONFIG_NF_FLOW_TABLE_INET=m
CONFIG_NF_FLOW_TABLE_PROCFS=y
CONFIG_NFT_FLOW_OFFLOAD=m
"""


@dataclass(frozen=True)
class KernelArch:
    """How kbuild names an arch, and what its QEMU machine needs on top of :data:`COMMON`."""

    karch: str  # ARCH=
    cross: str  # CROSS_COMPILE= on an amd64 host ('' = native)
    cross_package: str  # Debian package with that cross compiler
    image: str  # make target, and arch/<karch>/boot/<image>
    fragment: str


KERNEL_ARCHES = {
    "x86_64": KernelArch(
        "x86",
        "",
        "",
        "bzImage",
        """
CONFIG_64BIT=y
CONFIG_SERIAL_8250=y
CONFIG_SERIAL_8250_CONSOLE=y
CONFIG_HYPERVISOR_GUEST=y
CONFIG_PARAVIRT=y
CONFIG_KVM_GUEST=y
CONFIG_ACPI=y
""",
    ),
    "arm64": KernelArch(
        "arm64",
        "aarch64-linux-gnu-",
        "gcc-aarch64-linux-gnu",
        "Image",
        """
CONFIG_SERIAL_AMBA_PL011=y
CONFIG_SERIAL_AMBA_PL011_CONSOLE=y
CONFIG_PCI_HOST_GENERIC=y
CONFIG_ARM_GIC_V3=y
""",
    ),
    "armhf": KernelArch(
        "arm",
        "arm-linux-gnueabihf-",
        "gcc-arm-linux-gnueabihf",
        "zImage",
        """
CONFIG_ARCH_VIRT=y
CONFIG_ARM_LPAE=y
CONFIG_SERIAL_AMBA_PL011=y
CONFIG_SERIAL_AMBA_PL011_CONSOLE=y
CONFIG_PCI_HOST_GENERIC=y
""",
    ),
}


def fragment(arch: str) -> str:
    return COMMON.strip() + "\n" + KERNEL_ARCHES[arch].fragment.strip() + "\n"


def unmet(fragment_text: str, config_text: str) -> list[str]:
    """Fragment lines the final ``.config`` does not honour (a dependency was missing)."""
    have: dict[str, str] = {}
    for line in config_text.splitlines():
        if line.startswith("CONFIG_") and "=" in line:
            name, value = line.split("=", 1)
            have[name] = value
    out = []
    for line in fragment_text.splitlines():
        if not line.startswith("CONFIG_"):
            continue
        name, value = line.split("=", 1)
        got = have.get(name)
        if got != value and not (value == "m" and got == "y"):
            out.append(f"{name}={value} (got {got or 'unset'})")
    return out
