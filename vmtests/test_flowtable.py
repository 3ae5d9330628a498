"""Flowtable creation: the kmod-nft-offload modules load on the booted kernel, and nftables
flowtables are created, listed, deleted, and refused where the kernel must refuse them."""

from __future__ import annotations

from kmodtest.flowtable import MODULES as OFFLOAD_MODULES

ROUTER_NICS = ("lan", "wan")


def flowtable_rules(name: str = "ft", devices: tuple[str, ...] = ROUTER_NICS, prio: int = 0) -> str:
    return (
        f"add flowtable inet kt {name} {{ hook ingress priority {prio}; "
        f"devices = {{ {', '.join(devices)} }}; }}"
    )


def test_offload_modules_load_and_match_running_kernel(host):
    release = host.check_output("uname -r")
    host.check_output("modprobe -a %s %s %s", *OFFLOAD_MODULES)
    for module in OFFLOAD_MODULES:
        assert host.file(f"/sys/module/{module}").is_directory, f"{module} is not loaded"
        vermagic = host.check_output("modinfo -F vermagic %s", module)
        assert vermagic.split()[0] == release, f"{module} was built for {vermagic}, not {release}"
        path = host.check_output("modinfo -n %s", module)
        assert f"/lib/modules/{release}/" in path


def test_flowtable_is_created_listed_and_deleted(nft):
    result = nft.apply("add table inet kt\n" + flowtable_rules())
    assert result.rc == 0, result.stderr

    text = nft.run("list flowtable inet kt ft").stdout
    assert "flowtable ft" in text
    assert "hook ingress priority filter" in text or "hook ingress priority 0" in text
    text = text.replace('"', "")  # nftables >= 1.1 quotes device names
    assert "devices = { lan, wan }" in text or "devices = { wan, lan }" in text

    [ft] = nft.flowtables()
    assert (ft.family, ft.table, ft.name, ft.hook, ft.prio) == ("inet", "kt", "ft", "ingress", 0)
    assert sorted(ft.devices) == sorted(ROUTER_NICS)

    assert nft.run("delete flowtable inet kt ft").rc == 0
    assert nft.flowtables() == []
    assert "flowtable" not in nft.ruleset()


# Linux 6.16 let netdev hooks name devices that do not exist (yet): a flowtable naming one is
# accepted, and hooks the device when it appears (Phil Sutter's "netfilter: nf_tables: Support
# wildcard netdev hook specs" series). Before, the whole batch was refused with ENOENT.
ABSENT_DEVICES_SINCE = (6, 16)
HOOK = "flowtable inet kt ft"  # how `nft list hooks` names the flowtable's ingress hook


def test_flowtable_on_missing_device(router, host, nft):
    """Before 6.16: refused, ruleset unchanged. Since: accepted, and the device, once it
    appears, is hooked by the flowtable."""
    assert nft.apply("add table inet kt").rc == 0
    before = nft.ruleset()

    result = nft.apply(flowtable_rules(devices=("lan", "nosuch0")))

    if router.image.kernel_series < ABSENT_DEVICES_SINCE:
        assert result.rc != 0
        assert "No such file or directory" in result.stderr, result.stderr
        assert nft.ruleset() == before
        assert nft.flowtables() == []
        return
    assert result.rc == 0, result.stderr
    assert [ft.devices for ft in nft.flowtables()] == [("lan", "nosuch0")]
    assert HOOK in host.check_output("nft list hooks netdev device lan")
    try:
        host.check_output("ip link add nosuch0 type veth peer name nosuch1")
        hooks = host.run("nft list hooks netdev device nosuch0")
        assert hooks.rc == 0 and HOOK in hooks.stdout, (
            f"nosuch0 appeared but the flowtable did not hook it:\n{hooks.stdout}{hooks.stderr}"
        )
    finally:
        host.run("ip link del nosuch0")


def test_second_flowtable_on_same_devices_and_priority_is_refused(nft):
    assert nft.apply("add table inet kt\n" + flowtable_rules("ft1")).rc == 0
    before = nft.ruleset()

    result = nft.apply(flowtable_rules("ft2"))

    assert result.rc != 0
    assert "File exists" in result.stderr, result.stderr
    assert nft.ruleset() == before
    assert [ft.name for ft in nft.flowtables()] == ["ft1"]
