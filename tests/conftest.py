"""Shared fixtures: every semantic test runs over every transport in TRANSPORTS."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest

import jaxps

# The conformance suite: tests taking the `transport` fixture run once per entry.
TRANSPORTS = ["inprocess"]


@pytest.fixture(params=TRANSPORTS)
def transport(request):
    """A transport name; transport-specific set-up (e.g. a shared Ray session) hangs off here."""
    return request.param


@pytest.fixture
def make_server(transport):
    """`make_server(params, tx, **kw)` -> a ParameterServer on `transport`, closed after the test."""
    servers = []

    def make(params, tx, **kw):
        ps = jaxps.ParameterServer(params, tx, transport=transport, **kw)
        servers.append(ps)
        return ps

    yield make
    for ps in servers:
        ps.close()
