"""`python -m lmpipeline --config X.yaml` (seed 001) and every `lmpipeline` subcommand."""

import sys

from lmpipeline.cli import main

sys.exit(main())
