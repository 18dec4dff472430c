"""`python -m search --config YAML [--set key=value ...]`: the search job, e.g. for `ray job submit`."""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m search", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="search config YAML (see configs/search_demo.yaml)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a search setting, e.g. num_samples=16 or refit.topk=3")
    args = parser.parse_args(argv)
    from gitseg.cli import run_handled
    from search.run import run_search
    from search.settings import load_search_config

    return run_handled("search", lambda: run_search(load_search_config(args.config, args.set)))


if __name__ == "__main__":
    sys.exit(main())
