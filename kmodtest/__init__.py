"""kmodtest: boot router images in QEMU and prove nftables flow offloading works.

The package is laid out by stage, the way a test travels:
``prepare`` (cells, kernel sources, images, cache) -> ``run`` (machine description,
launchers) -> ``guest`` (channel, testinfra backend, health, topology) -> ``face`` (pytest
plugin, CLI). Leaves every stage may use sit at the top: ``arches``, ``processes``,
``errors``, ``progress``. A stage imports only stages before it and the leaves.
"""

__version__ = "0.1.0"
