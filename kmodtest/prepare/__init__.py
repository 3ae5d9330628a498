"""Prepare stage: what boots. Matrix cells, kernel sources, images, module overlays, cache."""
