"""``python -m guidekit`` (and ``accelerate launch -m guidekit eval ...``): the command line."""

import sys

from guidekit.cli import main

sys.exit(main())
