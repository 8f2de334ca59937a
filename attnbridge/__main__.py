import sys

from attnbridge.cli import main

sys.exit(main())
