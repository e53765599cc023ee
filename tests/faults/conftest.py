"""The fault-injection suite (#11): corrupt and non-finite data, kill -9 at atomic writes, dead and hung
services, concurrent promotes, a params fuzz. Every test here is marked slow; CI runs them all (`make test`)."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = __file__.rsplit("/", 1)[0]
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.slow)
