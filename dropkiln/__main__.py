import sys

from dropkiln.cli import main

sys.exit(main())
