import sys

from gitseg.cli import main

sys.exit(main())
