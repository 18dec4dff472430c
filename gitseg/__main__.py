from gitseg.cli import entry

entry()
