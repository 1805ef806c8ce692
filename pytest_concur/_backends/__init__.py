"""The built-in backends, contributed through the same hook as third-party ones."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from pytest_concur._backends.base import Backend


@pytest.hookimpl(trylast=True)
def pytest_concur_add_backends(config: pytest.Config) -> Sequence[Backend]:
    # Imported here, not at the top: this package's base module is the contract, which
    # every part of the plugin imports, and it must not bring the backends with it.
    from pytest_concur._backends.asyncio import AsyncioBackend
    from pytest_concur._backends.process import ProcessBackend
    from pytest_concur._backends.thread import ThreadBackend

    return [ThreadBackend(), ProcessBackend(config), AsyncioBackend()]
