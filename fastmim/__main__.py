import sys

from fastmim.cli import main

sys.exit(main())
