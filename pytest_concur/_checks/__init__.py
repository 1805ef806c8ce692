"""The built-in checks, contributed through the same hook as third-party ones."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from pytest_concur._backends.base import Check


@pytest.hookimpl(trylast=True)
def pytest_concur_add_checks(config: pytest.Config) -> Sequence[Check]:
    return []
