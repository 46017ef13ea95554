import sys

from p11guard.cli import main

sys.exit(main())
