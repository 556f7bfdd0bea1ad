"""Per-call means of one `steps.sh` run: each `final-*` file less its `base-*` (the warm-up).

usage: python steps_table.py steps/pd [steps/unified ...]
"""

import json
import sys
from pathlib import Path

for folder in map(Path, sys.argv[1:]):
    for final in sorted(folder.glob("final-*.json")):
        base_path = final.with_name(final.name.replace("final-", "base-", 1))
        base = json.loads(base_path.read_text()) if base_path.exists() else {}
        for label, (calls, seconds) in sorted(json.loads(final.read_text()).items()):
            calls0, seconds0 = base.get(label, [0, 0.0])
            if calls > calls0:
                mean_us = 1e6 * (seconds - seconds0) / (calls - calls0)
                print(f"{folder.name:8s} {label:50s} calls {calls - calls0:7d}  mean {mean_us:8.1f} us")
