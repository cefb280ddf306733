"""Every test file's processes (the test, its module servers, gateways, coordinator workers, all
started with this environment) share one JAX persistent compilation cache, fresh per pytest
session (one test file under Pants) and removed after it: a restarted server, a second fleet of
the same spec, a job's tasks and the test's own reference runs load the programs compiled once
(tests/diloco_coordinator_test.py 145 -> 95 s here). Results are the same programs'. Set
PATHWAYS_TEST_COMPILE_CACHE=0 to compile everything afresh."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

if os.environ.get("PATHWAYS_TEST_COMPILE_CACHE", "1") != "0" and not os.environ.get(
    "JAX_COMPILATION_CACHE_DIR"
):
    _dir = tempfile.mkdtemp(prefix="pathways-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _dir
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    atexit.register(shutil.rmtree, _dir, ignore_errors=True)
