"""`python -m ops` in this repository (`pcelery-ops` wherever the package is installed)."""

import sys

try:
    from pcelery.ops.cli import main
except ImportError as exc:  # this Python lacks the package or one of its dependencies: a setup slip
    from . import EXIT_SETUP, setup_problem  # noqa: TID251 - its own package, as ops or pcelery.ops

    print(setup_problem(exc, sys.argv[1:]), file=sys.stderr)
    sys.exit(EXIT_SETUP)

sys.exit(main())
