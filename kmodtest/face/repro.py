"""``kmodtest repro``: from a CI cell's JUnit XML, the one local command per failed test.

A GitHub Actions cell that fails runs this (``.github/workflows/vmtests.yml``): it prints, for
each failed or erroring VM test, the command that runs exactly that test on exactly that cell
here, and copies the image manifest (every package version, every module) next to the console
logs the job uploads, so what ran in CI can be compared with what runs locally.
"""

from __future__ import annotations

import argparse
import json
import shlex
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from kmodtest.errors import ConfigError


@dataclass(frozen=True)
class Failure:
    test_id: str  # pytest node id: path::name[params]
    message: str


def failures(junit: Path) -> list[Failure]:
    """Failed and erroring tests of a pytest JUnit XML file (``--junitxml``)."""
    try:
        root = ET.parse(junit).getroot()
    except (OSError, ET.ParseError) as exc:
        raise ConfigError(f"cannot read JUnit XML {junit}: {exc}",
                          "pass the file pytest --junitxml wrote") from None  # fmt: skip
    found = []
    for case in root.iter("testcase"):
        bad = case.find("failure")
        if bad is None:
            bad = case.find("error")
        if bad is None:
            continue
        # classname is dotted module (and class) path; name carries the parameters
        module, _, klass = case.get("classname", "").partition(".Test")
        path = module.replace(".", "/") + ".py"
        node = (
            f"{path}::Test{klass}::{case.get('name')}" if klass else f"{path}::{case.get('name')}"
        )
        found.append(Failure(node, (bad.get("message") or "").splitlines()[0][:200]))
    return found


def command(failure: Failure, cell: str, extra: list[str]) -> str:
    """The local command that runs this one test on this one cell, logs kept."""
    return shlex.join(
        [".venv/bin/pytest", failure.test_id, "--kernel", cell, "--keep-logs", *extra]
    )


def manifest_lines(manifest: dict[str, object]) -> list[str]:
    packages = manifest.get("packages", {})
    assert isinstance(packages, dict)
    kernel_pkg = next(
        (f"{k} {v}" for k, v in packages.items() if k.startswith("linux-image-")), "?"
    )
    return [
        f"  image: kernel {manifest.get('kernel_version')} ({kernel_pkg}), "
        f"nftables {packages.get('nftables', '?')}, initrd sha256 "
        f"{str(manifest.get('initrd_sha256', '?'))[:16]}",
    ]


def report(junit: Path, cell: str, manifest: dict[str, object] | None, extra: list[str]) -> str:
    failed = failures(junit)
    if not failed:
        return f"kmodtest repro: no failed test in {junit}"
    lines = [f"kmodtest repro: {len(failed)} failed test(s) on cell {cell}; to reproduce locally:"]
    if manifest is not None:
        lines += manifest_lines(manifest)
    for failure in failed:
        lines.append(f"  {command(failure, cell, extra)}")
        if failure.message:
            lines.append(f"      ({failure.message})")
    return "\n".join(lines)


def cmd_repro(args: argparse.Namespace) -> int:
    from kmodtest.face import options
    from kmodtest.prepare.cache import Cache
    from kmodtest.prepare.cells import load_matrix
    from kmodtest.prepare.images import ImageBuilder

    settings = options.Settings.from_args(args)
    cell = load_matrix(settings.kernels_dir).get(args.cell)
    image = ImageBuilder(Cache(settings.image_cache), settings.images_dir).cached(cell)
    manifest = image.manifest if image is not None else None
    if manifest is not None and args.manifest_to:
        out = Path(args.manifest_to)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(manifest, indent=2) + "\n")
    print(report(Path(args.junit), cell.id, manifest, args.pytest_args or []))
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from kmodtest.face import options

    p = sub.add_parser(
        "repro", help="the local command reproducing each failed test of a CI cell",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--junit", required=True, metavar="XML", help="pytest --junitxml output")
    p.add_argument("--cell", required=True, metavar="ID", help="the cell the job ran")
    p.add_argument(
        "--manifest-to", metavar="FILE",
        help="also write the cell's image manifest here (for the job's artifacts)",
    )  # fmt: skip
    p.add_argument(
        "pytest_args", nargs="*", metavar="PYTEST_ARG",
        help="options the job gave pytest besides --kernel (added to the command)",
    )  # fmt: skip
    options.add_to_argparse(p, options.DIRS)
    p.set_defaults(func=cmd_repro)
