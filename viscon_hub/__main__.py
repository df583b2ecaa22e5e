import sys

from viscon_hub.cli import main

sys.exit(main())
