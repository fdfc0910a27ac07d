import sys

from .final import main

sys.exit(main())
