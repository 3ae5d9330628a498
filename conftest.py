"""Root conftest: the fixtures live in fixtures/ (the kmodtest plugin itself is an entry point)."""

pytest_plugins = ["fixtures.router"]
