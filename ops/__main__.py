import sys

from pcelery.ops.cli import main

sys.exit(main())
