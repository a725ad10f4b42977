"""``python -m innerpissa.cli``: the ``ipissa`` command."""

import sys

from . import main

sys.exit(main())
