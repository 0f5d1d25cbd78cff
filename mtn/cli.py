"""`mtn`: the command line (placeholder until the CLI lands)."""

import sys


def main(argv=None) -> int:
    print("mtn: not implemented yet", file=sys.stderr)
    return 2
