"""Settings for the whole test run."""

from __future__ import annotations

import os

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """Every server a test starts, in process or as ``python -m service``, serves no gRPC.

    The service listens for gRPC on 8001 by default. A test run starts many servers, often several
    at once, and other runs may share the machine, so the default would collide; the gRPC tests
    give their servers a free port (``tests/service/test_grpc.py``).
    """
    os.environ["RNNSERVE_GRPC_PORT"] = "0"
