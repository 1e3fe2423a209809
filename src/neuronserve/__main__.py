"""``python -m neuronserve``: the same command line as ``neuronserve``."""

import sys

from neuronserve.cli import main

sys.exit(main())
