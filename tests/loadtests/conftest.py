"""Fixtures for the load-generator tests: the repo root on sys.path (loadtests is not an installed package) and
the fake OpenAI server."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

from fake_openai import FakeServer  # noqa: E402


@pytest.fixture(scope="module")
def fake_server():
    with FakeServer() as server:
        yield server


@pytest.fixture
def bodies(fake_server):
    """The request bodies the fake server receives during one test."""
    fake_server.app.state.bodies.clear()
    return fake_server.app.state.bodies
