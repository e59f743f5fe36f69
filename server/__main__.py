"""`python -m radixserve.server serve ...`: the same as the `radixserve` console script."""

import sys

from radixserve.server.cli import main

sys.exit(main())
