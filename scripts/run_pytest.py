"""Runs pytest and fails when no test ran: pytest's exit code 5 must never pass silently."""

import sys

import pytest

code = pytest.main(sys.argv[1:])
if code == pytest.ExitCode.NO_TESTS_COLLECTED:
    print("run_pytest: no tests were collected: failing", file=sys.stderr)
    sys.exit(1)
sys.exit(int(code))
