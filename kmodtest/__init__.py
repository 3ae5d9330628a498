"""kmodtest: boot router images in QEMU and prove nftables flow offloading works.

The package is laid out by stage, the way a test travels:
``build`` (cells, kernel sources, images, cache) -> ``run`` (machine description,
launchers, processes) -> ``guest`` (channel, testinfra backend, health, topology)
-> ``face`` (pytest plugin, CLI).
"""

__version__ = "0.1.0"
