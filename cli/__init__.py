"""The `p2pnode` command line: a thin layer over functions a library user can call."""
