"""pytest fixtures for Tandem's integration tests (see harness.py for the environment variables)."""

import pytest

pytest.register_assert_rewrite("harness")

import harness  # noqa: E402


def pytest_report_header(config):
    backend = f", [net] backend = {harness.NET_BACKEND}" if harness.NET_BACKEND else ""
    return f"server under test: {harness.SERVER_KIND} ({harness.server_binary()}){backend}"


@pytest.fixture(scope="session")
def root():
    """For modules whose every test needs root (``pytestmark = pytest.mark.usefixtures("root")``): skips
    them without it, fails them under CI=true (``harness.skip_unless``). Session-scoped, so it runs before
    any module fixture that would make namespaces."""
    harness.needs_root("network namespaces, veth and tap devices, hugepages")


@pytest.fixture
def start(tmp_path):
    """Factory: ``start(*flags, nofile=None)`` starts a server; every server is killed at teardown."""
    started = []

    def factory(*flags, nofile=None):
        server = harness.start_server(flags, log_dir=tmp_path, nofile=nofile)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


@pytest.fixture
def server(start):
    """A server with default settings (-t 2, -m 64, -I 1m)."""
    return start()


@pytest.fixture
def client(server):
    return server.client()


@pytest.fixture
def conn(server):
    return server.raw()
