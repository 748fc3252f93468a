import sys

from attnssl.cli import main

sys.exit(main())
