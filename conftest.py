"""Root conftest: kmodtest's own fixtures ship with its plugin (an entry point, no conftest
needed); fixtures/ holds what this repository's suites add over them."""

pytest_plugins = ["fixtures.router"]
