"""Run stage: machine descriptions, launchers, accelerator choice."""
