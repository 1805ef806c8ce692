"""The built-in backends, contributed through the same hook as third-party ones."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from pytest_concur._backends.asyncio import AsyncioBackend
from pytest_concur._backends.base import Backend
from pytest_concur._backends.process import ProcessBackend
from pytest_concur._backends.thread import ThreadBackend


@pytest.hookimpl(trylast=True)
def pytest_concur_add_backends(config: pytest.Config) -> Sequence[Backend]:
    return [ThreadBackend(), ProcessBackend(config), AsyncioBackend()]
