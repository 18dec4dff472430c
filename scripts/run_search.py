"""Driver script for `ray submit cluster.yaml scripts/run_search.py -- --config CONFIG`.

It runs on the head node and joins the cluster there. (Not named search.py: on the head node a
file of that name would shadow the `search` package.)
"""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("RAY_ADDRESS", "auto")  # ray submit runs us on the head: join its cluster
    from search.__main__ import main

    sys.exit(main())
