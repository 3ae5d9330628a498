"""Under ``-n N`` the work unit is a module on one VM case, handed out in the run's order."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from kmodtest.face.scheduling import case_of, make_scheduler, work_unit_of
from kmodtest.prepare.cells import load_matrix

REPO = Path(__file__).resolve().parent.parent


def cells():
    return load_matrix(REPO / "kernels").select("all", None, None)


def test_per_nic_and_per_kernel_ids_map_to_the_same_case():
    all_cells = cells()
    mod = "vmtests/test_offload.py::test_flow_is_offloaded_and_payload_intact"
    per_nic = f"{mod}[debian-trixie-amd64-virtio-net-pci-tcp-ipv4-routed]"
    per_kernel = "vmtests/test_flowtable.py::test_x[debian-trixie-amd64]"
    assert case_of(per_nic, all_cells, None) == "debian-trixie-amd64-virtio-net-pci"
    assert case_of(per_kernel, all_cells, None) == "debian-trixie-amd64-virtio-net-pci"
    e1000 = f"{mod}[debian-trixie-amd64-e1000-tcp-ipv4-routed]"
    assert case_of(e1000, all_cells, None) == "debian-trixie-amd64-e1000"


def test_e1000e_ids_map_to_e1000e_not_to_e1000():
    """A substring match would send e1000e's tests to the e1000 case: another worker, a boot
    of the wrong NIC's VM group, and the two cases interleaved."""
    all_cells = cells()
    mod = "vmtests/test_conntrack_handover.py::test_idle_flow_returns_to_slow_path"
    for cell in ("debian-trixie-amd64", "debian-bookworm-arm64"):
        for nic in ("e1000", "e1000e", "igb", "virtio-net-pci"):
            for tail in ("-udp", "-tcp-ipv4-routed", ""):
                nodeid = f"{mod}[{cell}-{nic}{tail}]"
                assert case_of(nodeid, all_cells, None) == f"{cell}-{nic}", nodeid
    # the case id may also follow another parameter's id
    assert case_of(f"{mod}[x-debian-sid-amd64-e1000e]", all_cells, None) == (
        "debian-sid-amd64-e1000e"
    )
    assert case_of(f"{mod}[debian-sid-amd64-e1000e]", all_cells, ["e1000"]) == (
        "debian-sid-amd64-e1000"
    )  # e1000e not selected: a per-kernel id of the cell goes to its first selected NIC


def test_nic_selection_moves_per_kernel_tests_to_the_first_selected_nic():
    nodeid = "vmtests/test_flowtable.py::test_x[debian-bookworm-arm64]"
    assert case_of(nodeid, cells(), ["e1000"]) == "debian-bookworm-arm64-e1000"


def test_every_cell_is_told_apart():
    all_cells = cells()
    groups = {case_of(f"t.py::t[{c.id}]", all_cells, None) for c in all_cells}
    assert len(groups) == len(all_cells)


def test_tests_without_a_vm_have_no_case():
    assert case_of("tests/test_cells.py::test_select", cells(), None) is None
    assert case_of("tests/test_x.py::test_p[1-2]", cells(), None) is None


def test_a_work_unit_is_one_module_on_one_case():
    all_cells = cells()
    mod = "vmtests/test_offload.py::test_flow_is_offloaded_and_payload_intact"
    unit = work_unit_of(f"{mod}[debian-trixie-amd64-e1000-tcp-ipv4-routed]", all_cells, None)
    assert unit == "debian-trixie-amd64-e1000::vmtests/test_offload.py"
    assert (
        work_unit_of(f"{mod}[debian-trixie-amd64-e1000-udp-ipv6-masquerade]", all_cells, None)
        == unit
    )
    other = "vmtests/test_fallback.py::test_y[debian-trixie-amd64-e1000]"
    assert work_unit_of(other, all_cells, None) != unit
    assert (
        work_unit_of("tests/test_cells.py::test_select", all_cells, None) == "tests/test_cells.py"
    )
    # VMs that boot cold (no saved states, a module change): the whole case is one unit
    assert work_unit_of(other, all_cells, None, split_cases=False) == "debian-trixie-amd64-e1000"


@dataclass(eq=False)
class FakeWorker:
    """What LoadScopeScheduling asks of an xdist worker."""

    name: str
    got: list[int] = field(default_factory=list)
    shutting_down: bool = False

    @property
    def gateway(self) -> SimpleNamespace:
        return SimpleNamespace(id=self.name)

    def send_runtest_some(self, indices: list[int]) -> None:
        self.got.extend(indices)

    def shutdown(self) -> None:
        self.shutting_down = True


def test_units_are_handed_out_in_the_runs_order_not_biggest_first():
    """xdist's loadscope reorder would start with the biggest unit, mixing the cases (a VM
    restore at each switch); the run's order keeps a worker on one case until it is done."""
    all_cells = cells()
    small = [f"vmtests/test_a.py::t[debian-trixie-amd64-e1000-{i}]" for i in range(3)]
    big = [f"vmtests/test_b.py::t[debian-trixie-amd64-e1000-{i}]" for i in range(6)]
    other_case = [f"vmtests/test_a.py::t[debian-trixie-amd64-e1000e-{i}]" for i in range(9)]
    collection = small + big + other_case
    tx = ["popen", "popen"]
    config = SimpleNamespace(
        getvalue=lambda name: tx if name == "tx" else None,
        option=SimpleNamespace(loadscopereorder=True),
    )
    scheduler = make_scheduler(config, None, all_cells, None)
    workers = [FakeWorker("gw0"), FakeWorker("gw1")]
    for worker in workers:
        scheduler.add_node(worker)
        scheduler.add_node_collection(worker, collection)
    scheduler.schedule()
    first = [[collection[i] for i in w.got] for w in workers]
    assert first == [small, big], "the first units are not the run's first two, in order"
    assert config.option.loadscopereorder is True, "the user's option was not given back"
