"""viscon-hub: web documents in, contextual visual instruction data out."""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
