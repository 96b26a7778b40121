"""`python -m job` is the same as the `tunix-job` console script."""

import sys

from job.cli import main

sys.exit(main())
