"""NetConfig takes the subnet as a network or as a string (README's in-process example)."""

from __future__ import annotations

import ipaddress

import pytest

from sandport.config import NetConfig
from sandport.errors import UsageError

pytestmark = pytest.mark.unit


def test_a_string_subnet_becomes_the_network() -> None:
    net = NetConfig(bridge="sp-example", subnet="10.201.9.0/24")  # type: ignore[arg-type]
    assert net.subnet == ipaddress.IPv4Network("10.201.9.0/24")
    assert str(net.gateway_ip) == "10.201.9.1"
    assert net == NetConfig(bridge="sp-example", subnet=ipaddress.IPv4Network("10.201.9.0/24"))


@pytest.mark.parametrize(("subnet", "words"), [
    ("10.201.9.1/24", "'10.201.9.1/24' is not an IPv4 network like '10.201.5.0/24': "
                      "10.201.9.1/24 has host bits set"),
    ("ten", "'ten' is not an IPv4 network like '10.201.5.0/24'"),
    ("fd00::/64", "'fd00::/64' is not an IPv4 network"),
    (24, "24 (int) is not an IPv4 network like '10.201.5.0/24'"),
    ("10.0.0.0/8", "10.0.0.0/8 must be between /16 and /29"),
])
def test_a_bad_subnet_is_a_usage_error_that_says_why(subnet: object, words: str) -> None:
    with pytest.raises(UsageError) as caught:
        NetConfig(subnet=subnet)  # type: ignore[arg-type]
    assert f"subnet {words}" in str(caught.value)
