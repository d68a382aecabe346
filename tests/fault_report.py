"""Measurements of injected faults: printed, and appended to $DIST_SUPERNET_FAULT_REPORT (JSON lines) when set.

docs/reliability.md quotes a run of
``DIST_SUPERNET_FAULT_REPORT=faults.jsonl pytest tests/distributed/test_faults.py tests/unit/test_reliability.py``.
"""

import json
import os


def record(fault: str, **values) -> None:
    line = json.dumps({"fault": fault, **values})
    print(line)
    if os.environ.get("DIST_SUPERNET_FAULT_REPORT"):
        with open(os.environ["DIST_SUPERNET_FAULT_REPORT"], "a") as f:
            f.write(line + "\n")
