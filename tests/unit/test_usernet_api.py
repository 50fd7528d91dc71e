"""The public names of sandport.usernet (README.md, section "usernet", imports them)."""

from __future__ import annotations

import pytest

import sandport.usernet

pytestmark = pytest.mark.unit


def test_the_package_exports_what_the_readme_uses() -> None:
    from sandport.usernet import (  # noqa: F401
        EgressRule,
        LinkConfig,
        StreamTransport,
        TapTransport,
        Usernet,
        tap_into_netns,
    )

    for name in sandport.usernet.__all__:
        assert getattr(sandport.usernet, name).__module__.startswith("sandport.usernet."), name
