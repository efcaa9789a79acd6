"""`python -m reprise ...`: the same command line as `reprise ...`."""
import sys

from reprise.cli import main

sys.exit(main())
