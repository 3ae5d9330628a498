"""Local kernel patch validation, end to end: patch -> rebuilt modules -> VM suite -> verdict.

The first tests need no VM (fake source trees). The last three run ``kmodtest validate`` on the
default cell (debian-trixie-amd64): a patch that never offloads fails the offload test with the
reason, the unpatched sources pass it, and a module that cannot load is named with the
kernel's own message. Cold, they fetch a toolchain chroot and the kernel sources (~1 min once).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kmodtest.errors import ConfigError
from kmodtest.guest.modload import parse
from kmodtest.prepare.kbuild import write_kbuild
from kmodtest.prepare.modchange import ModuleChange, patch_paths, prepare

DATA = Path(__file__).parent / "data"
NEVER_OFFLOAD = DATA / "flowtable-never-offload.patch"
UNKNOWN_SYMBOL = DATA / "flowtable-unknown-symbol.patch"
# one case of the real offload suite: TCP over IPv4, routed, virtio-net
OFFLOAD_TEST = ["--tests", "vmtests/test_offload.py", "-k", "virtio-net-pci-tcp-ipv4-routed"]

CORE_C = """\
int flow_offload_add(void)
{
\treturn 0;
}
"""
PATCH = """\
--- a/net/netfilter/nf_flow_table_core.c
+++ b/net/netfilter/nf_flow_table_core.c
@@ -1,4 +1,4 @@
 int flow_offload_add(void)
 {
-\treturn 0;
+\treturn -1;
 }
"""


@pytest.fixture
def sources(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    (root / "net/netfilter").mkdir(parents=True)
    (root / "net/netfilter/nf_flow_table_core.c").write_text(CORE_C)
    (root / "net/netfilter/nft_flow_offload.c").write_text(
        "#include <net/netfilter/nf_flow_table.h>\n"
    )
    (root / "include/net/netfilter").mkdir(parents=True)
    (root / "include/net/netfilter/nf_flow_table.h").write_text("struct x { int a; };\n")
    return root


def test_patch_is_applied_to_the_pristine_sources_and_its_files_are_the_key(sources, tmp_path):
    patch = tmp_path / "fix.patch"
    patch.write_text(PATCH)
    ws = prepare(ModuleChange(patch=patch), sources, tmp_path / "ws")
    assert list(ws.touched) == ["net/netfilter/nf_flow_table_core.c"]
    assert "return -1" in (ws.root / "net/netfilter/nf_flow_table_core.c").read_text()
    plain = prepare(ModuleChange(), sources, tmp_path / "ws2")
    assert plain.touched == {} and plain.digest != ws.digest


def test_patch_outside_the_module_loop_asks_for_a_full_kernel(sources, tmp_path):
    patch = tmp_path / "ipv4.patch"
    patch.write_text(PATCH.replace("net/netfilter/nf_flow_table_core.c", "net/ipv4/route.c"))
    assert patch_paths(patch.read_text()) == ["net/ipv4/route.c"]
    with pytest.raises(ConfigError, match=r"net/ipv4/route\.c") as info:
        prepare(ModuleChange(patch=patch), sources, tmp_path / "ws")
    assert "--kernel-image" in str(info.value)


def test_patch_that_does_not_apply_says_so(sources, tmp_path):
    patch = tmp_path / "stale.patch"
    patch.write_text(PATCH.replace("-\treturn 0;", "-\treturn 42;"))
    with pytest.raises(ConfigError, match="does not apply"):
        prepare(ModuleChange(patch=patch), sources, tmp_path / "ws")


def test_source_tree_change_is_the_files_that_differ(sources, tmp_path):
    tree = tmp_path / "linux"
    (tree / "net/netfilter").mkdir(parents=True)
    (tree / "net/netfilter/nf_flow_table_core.c").write_text(CORE_C)  # same as pristine
    (tree / "include/net/netfilter").mkdir(parents=True)
    (tree / "include/net/netfilter/nf_flow_table.h").write_text("struct x { long a; };\n")
    ws = prepare(ModuleChange(source_tree=tree), sources, tmp_path / "ws")
    assert list(ws.touched) == ["include/net/netfilter/nf_flow_table.h"]


def test_changed_header_goes_first_and_rebuilds_its_users(sources, tmp_path):
    tree = tmp_path / "linux"
    (tree / "net/netfilter").mkdir(parents=True)
    (tree / "include/net/netfilter").mkdir(parents=True)
    (tree / "include/net/netfilter/nf_flow_table.h").write_text("struct x { long a; };\n")
    ws = prepare(ModuleChange(source_tree=tree), sources, tmp_path / "ws")
    notes = write_kbuild(ws, ("nf_flow_table",))
    kbuild = (ws.root / "net/netfilter/Kbuild").read_text()
    assert "kt-touched := nft_flow_offload.o" in kbuild
    assert "NOSTDINC_FLAGS += -I/build/include" in kbuild
    assert "keep the old layout" in notes[0]


def test_load_failures_are_read_from_the_kernel_log():
    log = (
        "[    8.2] nf_flow_table: loading out-of-tree module taints kernel.\n"
        "[   12.1] nf_flow_table: Unknown symbol kmodtest_no_such_symbol (err -2)\n"
        "[   12.2] nf_flow_table: Unknown symbol kmodtest_no_such_symbol (err -2)\n"
        "[   13.0] nft_flow_offload: disagrees about version of symbol flow_offload_add\n"
        "[   14.0] nf_flow_table_inet: version magic '6.1.0 SMP' should be '6.12.0 SMP'\n"
    )
    failures = parse(log)
    assert [(f.module, f.kind) for f in failures] == [
        ("nf_flow_table", "unknown symbol"),
        ("nft_flow_offload", "symbol version (CRC) mismatch"),
        ("nf_flow_table_inet", "version magic mismatch"),
    ]
    assert failures[0].line == "nf_flow_table: Unknown symbol kmodtest_no_such_symbol (err -2)"


def test_kernel_image_needs_modules(pytester, repo, inner_env, tmp_path):
    pytester.makepyfile(test_vm="def test_vm(router):\n    pass\n")
    result = pytester.runpytest_subprocess(
        "-p", "fixtures.router", f"--kernels-dir={repo / 'kernels'}",
        f"--images-dir={repo / 'images'}", f"--kernel-image={tmp_path / 'bzImage'}",
    )  # fmt: skip
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--kernel-image and --modules go together*"])


def test_kernel_image_and_modules_make_an_adhoc_cell_of_the_chosen_arch(
    pytester, repo, inner_env, tmp_path
):
    (tmp_path / "Image").write_bytes(b"not really a kernel")
    (tmp_path / "mods/lib/modules/6.12.0-kt").mkdir(parents=True)
    pytester.makepyfile(test_vm="def test_vm(router):\n    pass\n")
    result = pytester.runpytest_subprocess(
        "-p", "fixtures.router", f"--kernels-dir={repo / 'kernels'}",
        f"--images-dir={repo / 'images'}", f"--kernel-image={tmp_path / 'Image'}",
        f"--modules={tmp_path / 'mods'}", "--arch=arm64", "--collect-only",
    )  # fmt: skip
    result.stdout.fnmatch_lines(["*kmodtest cell local-arm64: arm64*", "*test_vm?local-arm64?*"])


def validate(repo: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "kmodtest.face.cli", "validate", f"--log-dir={tmp_path}", *args]
    result = subprocess.run(argv, cwd=repo, capture_output=True, text=True, timeout=900)
    print(result.stdout[-6000:], result.stderr[-3000:])  # shown when the test fails
    return result


def test_broken_patch_fails_the_offload_test_with_the_reason(repo, tmp_path):
    result = validate(repo, tmp_path, "--patch", str(NEVER_OFFLOAD), *OFFLOAD_TEST)
    assert result.returncode == 1
    assert "FAIL" in result.stdout
    assert "no [OFFLOAD]" in result.stdout  # the offload test's own assertion message


def test_unpatched_sources_pass_the_same_test(repo, tmp_path):
    result = validate(repo, tmp_path, *OFFLOAD_TEST)
    assert result.returncode == 0, "the control run (rebuilt, unpatched) must pass"
    assert "PASS" in result.stdout and "unpatched" in result.stdout


def test_module_that_cannot_load_is_named_with_the_kernel_message(repo, tmp_path):
    result = validate(
        repo, tmp_path, "--patch", str(UNKNOWN_SYMBOL),
        "--tests", "vmtests/test_flowtable.py", "-k", "modules_load",
    )  # fmt: skip
    assert result.returncode == 1
    assert "module load failure" in result.stdout
    assert "Unknown symbol kmodtest_no_such_symbol" in result.stdout
    assert "modpost" in result.stdout  # the build already warned about the symbol


def test_self_built_kernel_boots_and_runs_the_suite(repo, tmp_path):
    """Needs ``kmodtest kernel build --out DIR`` first (~30+ min at -j2 on 2 shared cores)."""
    built = os.environ.get("KMODTEST_LOCAL_KERNEL")
    if not built:
        pytest.skip("set KMODTEST_LOCAL_KERNEL=DIR, the --out of `kmodtest kernel build`")
    out = Path(built)
    meta = json.loads((out / "kernel.json").read_text())
    image = out / {"x86_64": "bzImage", "arm64": "Image", "armhf": "zImage"}[meta["arch"]]
    argv = [
        sys.executable, "-m", "pytest", "vmtests/test_flowtable.py", "vmtests/test_offload.py",
        "-k", "not e1000", f"--kernel-image={image}", f"--modules={out / 'modules'}",
        f"--arch={meta['arch']}", f"--log-dir={tmp_path}", "-p", "no:cacheprovider",
    ]  # fmt: skip
    result = subprocess.run(argv, cwd=repo, capture_output=True, text=True, timeout=1800)
    print(result.stdout[-6000:], result.stderr[-3000:])
    assert result.returncode == 0
    assert f"kernel {meta['release']}" in result.stdout


def test_patch_that_does_not_compile_names_a_build_log_that_exists(repo, tmp_path):
    """The build runs in a workspace that is removed afterwards: the log it names is a copy."""
    broken = tmp_path / "does-not-compile.patch"
    broken.write_text(
        NEVER_OFFLOAD.read_text().replace(
            "+\tif (flow)\n+\t\treturn -EOPNOTSUPP;\n", "+\tkmodtest_no_such_function(\n+\t;\n"
        )
    )
    result = validate(repo, tmp_path, "--patch", str(broken), *OFFLOAD_TEST)
    assert result.returncode != 0
    text = result.stdout + result.stderr
    assert "module build failed" in text, text[-3000:]
    log = Path(re.search(r"full build log:\s+(\S+)", text)[1])
    assert log.is_file(), f"the error names {log}, which does not exist"
    assert "kmodtest_no_such_function" in log.read_text()
    log.unlink()
