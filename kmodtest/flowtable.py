"""kmod-nft-offload, the kernel package this suite proves: its modules, in load order.

The module loop always rebuilds these (so an unpatched run is a real control), the image
recipe must carry them (a framework test checks it), and the VM suite loads and unloads them.
"""

from __future__ import annotations

MODULES = ("nf_flow_table", "nf_flow_table_inet", "nft_flow_offload")  # providers first
