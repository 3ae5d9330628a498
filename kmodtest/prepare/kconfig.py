"""The smallest kernel configuration this suite runs on, as a fragment over ``tinyconfig``.

Like KUnit's and virtme-ng's minimal configs: only what the router image and the tests use
(direct boot with an initramfs, a serial console, virtio-serial for the agent, veth, a bridge
and VLANs (OpenWrt's LAN shape), network namespaces, IPv4/IPv6 forwarding, conntrack, NAT,
nftables and the flowtable, a GRE tunnel and PPPoE (the tunnel and WAN tests)), plus the
drivers of the NIC models (:mod:`kmodtest.nics`) and what the arch's QEMU machine needs
(:mod:`kmodtest.arches`). Netfilter pieces are modules, so the image builder's module closure
and ``modprobe`` in the guest work as on a distribution kernel. Conntrack's GRE tracker
(``NF_CT_PROTO_GRE``, which the flowtable's GRE path is compiled under) has no prompt: only
the PPTP helper selects it, as in Debian's config.
"""

from __future__ import annotations

import re

from kmodtest.arches import get_arch
from kmodtest.nics import NICS

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
CONFIG_VETH=m
CONFIG_BRIDGE=m
CONFIG_BRIDGE_VLAN_FILTERING=y
CONFIG_VLAN_8021Q=m
CONFIG_NET_IPGRE_DEMUX=m
CONFIG_NET_IPGRE=m
CONFIG_PPP=m
CONFIG_PPPOE=m
CONFIG_PPP_ASYNC=m
CONFIG_NETFILTER=y
CONFIG_NETFILTER_ADVANCED=y
CONFIG_NETFILTER_INGRESS=y
CONFIG_NETFILTER_NETLINK=m
CONFIG_NF_CONNTRACK=m
CONFIG_NF_CONNTRACK_PROCFS=y
CONFIG_NF_CONNTRACK_TIMESTAMP=y
CONFIG_NF_CT_NETLINK=m
CONFIG_NF_CONNTRACK_PPTP=m
CONFIG_NF_CT_PROTO_GRE=y
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


# The debug-kernel cell (``kmodtest kernel build --debug``): the checkers that make memory and
# locking bugs print what the health scan reads. KASAN (use after free, out of bounds: "BUG:
# KASAN"), lockdep ("WARNING: possible circular locking dependency", "WARNING: suspicious RCU
# usage"), DEBUG_ATOMIC_SLEEP ("BUG: sleeping function called from invalid context"),
# DEBUG_NET (DEBUG_NET_WARN_ON_ONCE in the network stack), KMEMLEAK ("suspected memory leaks",
# scanned after each test, never on its own timer) and DEBUG_LIST (list corruption).
# KASAN needs the full SLUB allocator, which tinyconfig swaps for SLUB_TINY on 6.x.
DEBUG = (
    "CONFIG_DEBUG_KERNEL=y",
    "CONFIG_KALLSYMS=y",
    "CONFIG_STACKTRACE=y",
    "CONFIG_SLUB=y",
    "# CONFIG_SLUB_TINY is not set",
    "CONFIG_KASAN=y",
    "CONFIG_KASAN_GENERIC=y",
    "CONFIG_KASAN_INLINE=y",
    "CONFIG_PROVE_LOCKING=y",
    "CONFIG_DEBUG_ATOMIC_SLEEP=y",
    "CONFIG_DEBUG_NET=y",
    "CONFIG_DEBUG_KMEMLEAK=y",
    "# CONFIG_DEBUG_KMEMLEAK_AUTO_SCAN is not set",
    "# CONFIG_DEBUG_KMEMLEAK_DEFAULT_OFF is not set",
    "CONFIG_DEBUG_LIST=y",
)


def fragment(arch: str, debug: bool = False) -> str:
    """The common lines, every NIC model's driver, and the arch's own (its record in arches);
    with ``debug``, the debug cell's checkers."""
    lines = [
        *COMMON.split(),
        *(line for nic in NICS.values() for line in nic.kconfig),
        *get_arch(arch).kbuild.kconfig,
        *(DEBUG if debug else ()),
    ]
    return "\n".join(dict.fromkeys(lines)) + "\n"


_NOT_SET = re.compile(r"^# (CONFIG_\w+) is not set$")


def unmet(fragment_text: str, config_text: str) -> list[str]:
    """Fragment lines the final ``.config`` does not honour (a dependency was missing)."""
    have: dict[str, str] = {}
    for line in config_text.splitlines():
        if line.startswith("CONFIG_") and "=" in line:
            name, value = line.split("=", 1)
            have[name] = value
    out = []
    for line in fragment_text.splitlines():
        if m := _NOT_SET.match(line):
            if have.get(m[1], "n") != "n":
                out.append(f"{m[1]} is not set (got {have[m[1]]})")
            continue
        if not line.startswith("CONFIG_"):
            continue
        name, value = line.split("=", 1)
        got = have.get(name)
        if got != value and not (value == "m" and got == "y"):
            out.append(f"{name}={value} (got {got or 'unset'})")
    return out
