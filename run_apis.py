#!/usr/bin/env python3
"""Load client: sweeps concurrency or request rate against neuronserve and writes a report.

    python run_apis.py --concurrency 1,4,16 --duration 10
    python run_apis.py --mode open --rates 5,10,20 --target http://127.0.0.1:8081
    python run_apis.py --compare results/bench-A results/bench-B

It is `neuronserve bench`; every option is also a bench.* key in config.properties (see
`python run_apis.py --help`).
"""

import sys

from neuronserve.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
