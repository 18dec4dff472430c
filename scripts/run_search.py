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
    # This file's folder is first on sys.path. There, in the head's home folder, the checkout ~/gitseg
    # would shadow the installed package (as a namespace package without __file__): import from the
    # installation only.
    here = Path(__file__).resolve().parent
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != here]
    import gitseg

    os.chdir(Path(gitseg.__file__).resolve().parents[1])  # the checkout: an editable install's root
    from search.__main__ import main

    sys.exit(main())
