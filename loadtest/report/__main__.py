"""python -m loadtest.report reports/<timestamp>"""

import sys

from loadtest.report import main

sys.exit(main())
