"""Stash keys shared by the plugin's modules, and the one question they all ask."""

from __future__ import annotations

import pytest

# The item whose protocol is running, for hooks that only get a request or a fixturedef.
CURRENT_ITEM = pytest.StashKey["pytest.Item | None"]()
# Items that run under a backend, stashed with their backend's name at setup.
BACKEND_NAME = pytest.StashKey[str]()
# The autouse fixture whose parameter is the backend an item runs under (plugin.py).
BACKEND_FIXTURE = "concur_backend"


def backend_of(item: pytest.Item) -> str | None:
    """The backend ``item`` runs under, or ``None`` when it runs plainly."""
    return item.stash.get(BACKEND_NAME, None)
