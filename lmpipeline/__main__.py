"""`python -m lmpipeline --config X.yaml` and every `lmpipeline` subcommand."""

import sys

from lmpipeline.cli import main

sys.exit(main())
