import sys

from relscale.cli import main

sys.exit(main())
