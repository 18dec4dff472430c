"""Driver script for `ray submit cluster.yaml scripts/run_search.py -- --config CONFIG`.

It runs on the head node and joins the cluster there. (Not named search.py: on the head node a
file of that name would shadow the `search` package.) `ray submit` copies this file alone to the
head's home folder and runs it there, so relative paths (`--config configs/...`, the configs'
`base:` and `storage_path`) are taken from the gitseg checkout the launcher synced and installed
(`~/gitseg` in cluster.yaml), as they are on the machine it was submitted from.
"""

import os
import sys
from pathlib import Path

if __name__ == "__main__":
    os.environ.setdefault("RAY_ADDRESS", "auto")  # ray submit runs us on the head: join its cluster
    import gitseg

    os.chdir(Path(gitseg.__file__).resolve().parents[1])  # the checkout: an editable install's root
    from search.__main__ import main

    sys.exit(main())
