"""libmemcached's protocol conformance tool, memccapable, against the server under test.

memcached 1.6.18 passes all 54 of its tests (27 ascii, 27 binary) in about 5 s here; tandemd's target is the
same 54 of 54.
"""

import re
import shutil
import subprocess

import pytest

from harness import skip_unless

EXPECTED_TESTS = 54
RESULT_LINE = re.compile(r"^(?P<name>(ascii|binary) .+?)\s+\[(?P<result>\w+)\]\s*$")


@pytest.fixture
def memccapable():
    path = shutil.which("memccapable")
    skip_unless(path, "memccapable (libmemcached-tools) is not installed")
    return path


def test_memccapable_passes_all_54_tests(server, memccapable):
    run = subprocess.run(
        [memccapable, "-h", server.host, "-p", str(server.port), "-t", "5"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    results = {}
    for line in run.stdout.splitlines():
        match = RESULT_LINE.match(line)
        if match:
            results[match["name"]] = match["result"]
    print(f"memccapable: {sum(r == 'pass' for r in results.values())} of {len(results)} passed")
    failed = {name: result for name, result in results.items() if result != "pass"}
    assert failed == {}, run.stdout + run.stderr
    assert len(results) == EXPECTED_TESTS, run.stdout
    assert run.returncode == 0
    assert "All tests passed" in run.stdout
