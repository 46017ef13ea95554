import sys

from bench._bench import main

sys.exit(main())
