"""`python -m search --config YAML [--set key=value ...]`: the search job, e.g. for `ray job submit`.

The same command as `gitseg search`, through the gitseg CLI's own parser and error handling.
"""

import sys


def main(argv=None) -> int:
    from gitseg.cli import main as gitseg_main  # an entry point (CLI layer), see docs/ARCHITECTURE.md

    return gitseg_main(["search", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
