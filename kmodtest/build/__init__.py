"""Build stage: matrix cells, kernel sources, images and their cache."""
