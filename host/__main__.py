import sys

from p11guard.host._main import main

sys.exit(main())
