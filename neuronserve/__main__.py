"""`python -m neuronserve` is the `neuronserve` command."""

import sys

from neuronserve.cli import main

sys.exit(main())
