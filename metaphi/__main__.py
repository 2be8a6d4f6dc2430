import sys

from metaphi.cli import main

sys.exit(main())
