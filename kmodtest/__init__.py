"""kmodtest: boot router images in QEMU and prove nftables flow offloading works.

The package is laid out by stage, the way a test travels:
``prepare`` (cells, kernel sources, images, cache) -> ``run`` (machine description,
launchers) -> ``guest`` (channel, testinfra backend, health, topology, the router a test
talks to) -> ``lifecycle`` (a booted lab ready for a test: plans, strategy, pool) -> ``face``
(pytest plugin and fixtures, CLI). Leaves every stage may use sit at the top: ``arches`` and
``nics`` (one record each), ``flowtable``, ``processes``, ``errors``, ``progress``. A stage
imports only stages before it and the leaves; only ``face`` knows pytest.
"""

__version__ = "0.1.0"
