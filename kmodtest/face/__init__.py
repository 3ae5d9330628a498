"""User-facing stage: the pytest plugin and the ``kmodtest`` command."""
