"""Lifecycle stage: a booted router ready for a test, from image to release (no pytest here)."""
