"""``python -m cwm_operator``: run the operator (see cwm_operator.main)."""

import sys

from cwm_operator.main import main

sys.exit(main())
