"""Run stage: machine descriptions, QEMU launcher, accelerator choice, child processes."""
