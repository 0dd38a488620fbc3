#!/usr/bin/env python3
"""Checks that two seg_train runs ended identically: every logged step loss bit for bit and
the final val mIoU (summary.json of each run directory). Used by run.sh for the
uninterrupted run against the one killed with SIGKILL and resumed.

  python3 compare_runs.py RUN_A RUN_B     # exit 0 identical, 1 not, 2 unreadable
"""
import json
import os
import sys


def load(d):
    with open(os.path.join(d, "summary.json")) as f:
        return json.load(f)


def main(a, b):
    try:
        sa, sb = load(a), load(b)
    except (OSError, json.JSONDecodeError) as e:
        print(f"compare_runs: cannot read a summary: {e}")
        return 2
    la = {int(s): v for s, v in sa["losses"]}
    lb = {int(s): v for s, v in sb["losses"]}
    diff = [s for s in sorted(la) if la[s] != lb.get(s)]
    missing = sorted(set(la) ^ set(lb))
    same_miou = sa["final_miou"] == sb["final_miou"]
    print(f"uninterrupted: {len(la)} steps, final val mIoU {sa['final_miou']}, "
          f"{(sa.get('seconds_per_step') or float('nan')) * 1e3:.2f} ms/step, verdict {sa.get('verdict')}")
    print(f"killed+resumed: {len(lb)} steps, final val mIoU {sb['final_miou']}")
    if diff or missing or not same_miou:
        first = diff[0] if diff else None
        print(f"RESUME: FAIL ({len(diff)} differing step losses, first at step {first}: "
              f"{la.get(first)} vs {lb.get(first)}; {len(missing)} steps in one run only; "
              f"final mIoU equal: {same_miou})")
        return 1
    print("RESUME: PASS (identical step losses and final mIoU)")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2]))
