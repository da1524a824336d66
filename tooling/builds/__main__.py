import sys

from tooling.builds import main

sys.exit(main())
