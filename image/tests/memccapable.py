"""Runs libmemcached's memccapable from the bridge side of an appliance network and counts its results."""

import re
import subprocess

RESULT_LINE = re.compile(r"^(?P<name>(ascii|binary) .+?)\s+\[(?P<result>\w+)\]\s*$")
EXPECTED_TESTS = 54


def memccapable(net, host: str, port: int = 11211) -> tuple[dict, subprocess.CompletedProcess]:
    run = subprocess.run(net.cmd("memccapable", "-h", host, "-p", str(port), "-t", "10"),
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    results = {}
    for line in run.stdout.splitlines():
        match = RESULT_LINE.match(line)
        if match:
            results[match["name"]] = match["result"]
    return results, run


def assert_memccapable_passes(net, host: str) -> None:
    results, run = memccapable(net, host)
    passed = sum(r == "pass" for r in results.values())
    print(f"memccapable against {host}: {passed} of {len(results)} passed")
    failed = {name: result for name, result in results.items() if result != "pass"}
    assert failed == {}, run.stdout + run.stderr
    assert len(results) == EXPECTED_TESTS, run.stdout + run.stderr
    assert run.returncode == 0 and "All tests passed" in run.stdout, run.stdout + run.stderr
