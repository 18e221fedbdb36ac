"""The `p2pnode` command line: a thin layer over functions a library user can call."""

import sys


def run() -> None:
    """The `p2pnode` script. Importing the app loads torch (seconds): Ctrl-C meanwhile ends the command
    as it does later (one line, exit code 130), not with a traceback of the import."""
    try:
        from .app import main
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    sys.exit(main())
