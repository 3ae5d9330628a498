"""Local kernel patch validation, end to end: patch -> rebuilt modules -> VM suite -> verdict.

The first tests need no VM (fake source trees, parsing). Then real module builds without a VM:
a patch that does not compile is blamed on the patch, a broken toolchain on the build
environment, each with a log that outlives the run, and a cross-built arm64 module carries the
vermagic and symbol CRCs of Debian's own. The last ones run ``kmodtest validate``: on the
default cell (debian-trixie-amd64), a patch that never offloads fails the offload test with
the reason, the unpatched sources pass it, and a module that cannot load is named with the
kernel's own message; the same two verdicts on sid amd64 (7.x), trixie arm64 and bookworm
armhf (cross-built modules). Cold, each cell fetches a toolchain and its kernel sources once
(~1 min); what each test costs warm is in its docstring.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from kmodtest.errors import ConfigError
from kmodtest.face.options import packaged
from kmodtest.face.validate import CellVerdict, _prebuild, exit_code
from kmodtest.guest.modload import parse
from kmodtest.prepare.cache import Cache, default_cache_dir
from kmodtest.prepare.cells import Cell, load_matrix, unbuilt_local_kernel
from kmodtest.prepare.images import Image, ImageBuilder
from kmodtest.prepare.kbuild import (
    BuildEnvironmentError,
    ModuleBuildFailed,
    build_or_diagnose,
    write_kbuild,
)
from kmodtest.prepare.ksource import get_sources
from kmodtest.prepare.modchange import ModuleChange, patch_paths, prepare
from kmodtest.prepare.overlay import OverlayBuilder, kernel_packages
from kmodtest.prepare.toolchain import get_toolchain, headers_host_packages
from kmodtest.progress import Progress

DATA = Path(__file__).parent / "data"
NEVER_OFFLOAD = DATA / "flowtable-never-offload.patch"
UNKNOWN_SYMBOL = DATA / "flowtable-unknown-symbol.patch"
DOES_NOT_COMPILE = DATA / "flowtable-does-not-compile.patch"
# the patch-validation cells besides the default: the newest kernel and two cross-built arches
OTHER_CELLS = ("debian-sid-amd64", "debian-trixie-arm64", "debian-bookworm-armhf")
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


def test_a_table_of_skips_proves_nothing_and_exits_non_zero(capsys):
    skipped = [CellVerdict("debian-x-amd64", problem="skipped: no QEMU") for _ in range(2)]
    assert exit_code(skipped) == 1
    assert "no cell ran" in capsys.readouterr().out
    passed = CellVerdict("debian-y-amd64", passed=3)
    assert exit_code([*skipped, passed]) == 0
    assert exit_code([passed, CellVerdict("debian-z-amd64", passed=2, failed=1)]) == 1


def test_a_local_kernel_not_built_yet_is_a_skip_not_a_failure(tmp_path):
    """`validate --kernel all` with the debug cell unbuilt: SKIP naming the build command (it
    was a FAIL, so a clean patch exited 1)."""
    unbuilt = [c for c in load_matrix(packaged("kernels")).cells if unbuilt_local_kernel(c)]
    cell = unbuilt[0] if unbuilt else None
    if cell is None:
        pytest.skip("every local-kernel cell's kernel is built on this machine")
    verdict = CellVerdict(cell.id)
    assert not _prebuild(cell, None, None, verdict)  # never reaches the builders
    assert verdict.verdict == "SKIP" and "kmodtest kernel build" in verdict.problem


def test_cross_build_takes_kbuild_and_host_tools_from_the_target_headers_depends():
    depends = (
        "linux-headers-6.12.118+deb13-common (= 6.12.118-1), linux-kbuild-6.12.118+deb13 "
        "(= 6.12.118-1), gcc-14, pahole, linux-image-6.12.118+deb13-arm64 (= 6.12.118-1)"
    )
    assert headers_host_packages(depends, "6.12.118-1") == [
        "linux-kbuild-6.12.118+deb13=6.12.118-1",
        "pahole",
    ]


def test_compiler_errors_are_located_in_the_workspace(tmp_path):
    failed = ModuleBuildFailed(
        "6.12.118+deb13-amd64", 2,
        ["/build/net/netfilter/nf_flow_table_core.c:286:9: error: 'x' undeclared",
         "/build/include/net/netfilter/nf_flow_table.h:10:1: error: expected ';'",
         "error: objtool [signal.c:75]: read_stack_limit: fopen failed"],
        tmp_path / "build.log",
    )  # fmt: skip
    assert failed.files_with_errors() == {
        "net/netfilter/nf_flow_table_core.c",
        "include/net/netfilter/nf_flow_table.h",
    }


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
    assert "the patch does not build" in text, text[-3000:]
    log = Path(re.search(r"build log:\s+(\S+)", text)[1])
    assert log.is_file(), f"the error names {log}, which does not exist"
    assert "kmodtest_no_such_function" in log.read_text()
    log.unlink()


def _cell_and_base(repo: Path, cell_id: str) -> tuple[Cell, Image, Cache]:
    cache = Cache(default_cache_dir())
    cell = load_matrix(repo / "kernels").select(cell_id, None)[0]
    return cell, ImageBuilder(cache, repo / "images", Progress(quiet=True)).get(cell), cache


def test_patch_that_does_not_compile_is_blamed_on_the_patch(repo, tmp_path):
    """No VM boots: the build fails at its first compile. Warm: ~2 s."""
    out = tmp_path / "verdict.json"
    result = validate(repo, tmp_path, "--patch", str(DOES_NOT_COMPILE), "--json", str(out))
    assert result.returncode == 1
    [cell] = json.loads(out.read_text())["cells"]
    assert cell["verdict"] == "FAIL"
    assert cell["problem"].startswith("build failed: the patch does not build")
    assert "net/netfilter/nf_flow_table_core.c" in cell["problem"]
    assert "kmodtest_undeclared_variable" in cell["problem"]  # the compiler's own words
    log = Path(re.search(r"build log: (\S+)", cell["fix"])[1])
    assert log.is_file() and tmp_path in log.parents  # kept under the run's --log-dir
    assert "error:" in log.read_text()


def test_broken_build_environment_is_not_blamed_on_the_patch(repo, tmp_path):
    """A real build with a compiler the chroot lacks: the patched and the control build fail.
    Warm: ~1 s (the cached trixie toolchain; both builds fail at their first compile)."""
    cell, base, cache = _cell_and_base(repo, "debian-trixie-amd64")
    progress = Progress(quiet=True)
    kernel = kernel_packages(cell, base)
    sources = get_sources(cache, kernel, progress)
    broken = replace(get_toolchain(cache, kernel, progress), cc="x86_64-linux-gnu-gcc-0")
    ws = prepare(ModuleChange(patch=NEVER_OFFLOAD), sources.root, tmp_path / "ws")

    def keep(log: Path, name: str) -> Path:
        kept = tmp_path / "logs" / f"{name}.log"
        kept.parent.mkdir(exist_ok=True)
        return Path(shutil.copyfile(log, kept))

    with pytest.raises(BuildEnvironmentError, match="not the patch") as info:
        build_or_diagnose(broken, ws, sources.root, progress, keep)
    assert "x86_64-linux-gnu-gcc-0: not found" in info.value.problem
    assert "unpatched sources fail too" in info.value.problem
    for name in ("module-build", "control-build"):
        log = tmp_path / "logs" / f"{name}.log"
        assert str(log) in str(info.value.fix) and log.is_file()


@pytest.mark.parametrize("cell_id", ["debian-trixie-arm64", "debian-bookworm-armhf"])
def test_cross_built_modules_carry_the_kernels_vermagic_and_symbol_crcs(repo, tmp_path, cell_id):
    """The unpatched overlay's modules against Debian's own: same vermagic, same CRC for
    every imported symbol, different bytes (they were rebuilt here, on amd64). Warm: ~0.3 s
    (the overlay the validate tests built); cold ~40-50 s (headers, cross gcc, compile)."""
    cell, base, cache = _cell_and_base(repo, cell_id)
    overlay = OverlayBuilder(cache, ModuleChange(), log_dir=tmp_path).get(cell, base)
    assert overlay.manifest["overlay"]["cross"] is True
    ours, debians = tmp_path / "layer", tmp_path / "base"
    with open(overlay.initrd, "rb") as handle:  # the appended layer: after the base's bytes
        handle.seek(base.initrd.stat().st_size)
        subprocess.run(["cpio", "-i", "-d", "--quiet"], stdin=handle, cwd=_mkdir(ours), check=True)
    with open(base.initrd, "rb") as handle:
        subprocess.run(["cpio", "-i", "-d", "--quiet", "*/nf_flow_table*.ko*"], stdin=handle,
                       cwd=_mkdir(debians), check=True)  # fmt: skip
    for name in ("nf_flow_table", "nf_flow_table_inet"):
        [rebuilt] = ours.rglob(f"{name}.ko")
        [original] = debians.rglob(f"{name}.ko*")
        assert rebuilt.read_bytes() != original.read_bytes()
        assert _modinfo(rebuilt, "vermagic") == _modinfo(original, "vermagic")
        assert _modversions(rebuilt) == _modversions(original)


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _modinfo(ko: Path, field: str) -> str:
    return subprocess.run(["modinfo", "-F", field, str(ko)], capture_output=True, text=True,
                          check=True).stdout.strip()  # fmt: skip


def _modversions(ko: Path) -> list[str]:
    out = subprocess.run(["modprobe", "--dump-modversions", str(ko)], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    assert out.strip(), f"{ko} has no symbol versions"
    return sorted(out.splitlines())


def _verdicts(path: Path) -> dict[str, dict[str, object]]:
    return {c["cell"]: c for c in json.loads(path.read_text())["cells"]}


def test_broken_patch_fails_on_sid_and_the_cross_built_arm_cells(repo, tmp_path):
    """sid amd64 (7.x), trixie arm64, bookworm armhf, 2 workers. Warm: ~30 s (3 compiles,
    3 boots, one offload case each); cold add ~1 min per cell (image, sources, toolchain)."""
    out = tmp_path / "verdict.json"
    result = validate(
        repo, tmp_path, "--patch", str(NEVER_OFFLOAD), "--kernel", ",".join(OTHER_CELLS),
        "--json", str(out), *OFFLOAD_TEST,
    )  # fmt: skip
    assert result.returncode == 1
    verdicts = _verdicts(out)
    for cell_id in OTHER_CELLS:
        v = verdicts[cell_id]
        assert v["verdict"] == "FAIL", v
        assert "no [OFFLOAD]" in str(v["first_failure"]), v
    assert verdicts["debian-trixie-arm64"]["cross_built"] is True
    assert verdicts["debian-bookworm-armhf"]["cross_built"] is True


def test_unpatched_sources_pass_on_sid_and_the_cross_built_arm_cells(repo, tmp_path):
    """The control on the same cells: rebuilt (cross-built on ARM) modules load and offload.
    Warm: ~22 s."""
    out = tmp_path / "verdict.json"
    result = validate(
        repo, tmp_path, "--kernel", ",".join(OTHER_CELLS), "--json", str(out), *OFFLOAD_TEST
    )
    assert result.returncode == 0, "the control run (rebuilt, unpatched) must pass"
    verdicts = _verdicts(out)
    for cell_id in OTHER_CELLS:
        assert verdicts[cell_id]["verdict"] == "PASS", verdicts[cell_id]
