import sys

from tooling.native.stack import main

sys.exit(main())
