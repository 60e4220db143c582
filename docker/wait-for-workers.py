"""Wait until a Ray cluster offers enough of a resource (GPUs by default), then exit 0.

evomerge decides at a search's start whether its workers take a GPU each, from the GPUs the cluster has
then: a search started before its GPU nodes joined would run every worker on a CPU. Run this first:

    python /opt/evomerge/docker/wait-for-workers.py ray-head:6379 4 [--resource GPU] [--timeout 900]

Exit 1 (one line on stderr) if the cluster does not offer that much within the timeout.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import ray


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("address", help="HOST:PORT of the Ray head")
    p.add_argument("count", type=float, help="how much of the resource the cluster must offer")
    p.add_argument("--resource", default="GPU", help="Ray resource to wait for (default GPU)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds to wait (default 900)")
    return p


def main() -> int:
    a = parser().parse_args()
    deadline = time.monotonic() + a.timeout
    ray.init(address=a.address, log_to_driver=False, logging_level=logging.WARNING)
    try:
        while (have := ray.cluster_resources().get(a.resource, 0.0)) < a.count:
            if time.monotonic() > deadline:
                print(f"error: the cluster offers {have:g} {a.resource} after {a.timeout:g}s, {a.count:g} needed",
                      file=sys.stderr)
                return 1
            time.sleep(2.0)
    finally:
        ray.shutdown()
    print(f"the cluster offers {have:g} {a.resource}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
