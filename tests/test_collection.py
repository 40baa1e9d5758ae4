"""The suite's test ids: the same in every collection and readable.

pytest-xdist workers collect the suite separately and refuse to run when their
lists differ, so a parametrised value made at collection time from the clock (gzip
output with its timestamp, a time string) fails whole runs at random.
"""

import re
import subprocess
import sys
import time

from conftest import REPO


def _collect() -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p",
                           "no:xdist", "tests"], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, errors="backslashreplace")


def _test_ids(process: subprocess.Popen) -> list[str]:
  stdout, stderr = process.communicate(timeout=600)
  assert process.returncode == 0, stderr[-3000:] + stdout[-3000:]
  ids = [line for line in stdout.splitlines() if "::" in line]
  assert len(ids) > 500, stdout[-3000:]
  return ids


def test_two_collections_seconds_apart_give_the_same_readable_ids():
  first = _collect()
  time.sleep(2.5)  # past a one-second clock tick (gzip headers hold whole seconds)
  second = _collect()
  first_ids, second_ids = _test_ids(first), _test_ids(second)
  differing = sorted(set(first_ids) ^ set(second_ids))
  assert not differing, f"test ids that change between collections: {differing[:10]}"
  # pytest writes the unprintable bytes of a bytes-valued parameter as \xNN
  unreadable = [i for i in first_ids
                if not i.isprintable() or re.search(r"\\x[0-9a-f]{2}|\\u[0-9a-f]{4}", i)]
  assert not unreadable, f"test ids holding unprintable bytes (give ids=): {unreadable[:10]}"
