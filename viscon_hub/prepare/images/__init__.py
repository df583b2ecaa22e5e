"""Acquire images safely and once: fetch policy, address guard, image checks and a content store.

>>> import tempfile
>>> from viscon_hub.records import ImageSource
>>> store = ImageStore(tempfile.mkdtemp())
>>> [r.reason for r in acquire_images_sync(
...     [ImageSource(url="http://10.0.0.1/a.jpg"), ImageSource(data=b"not an image")],
...     policy=FetchPolicy(), store=store)]
['blocked_address', 'decode_error']
"""

from viscon_hub.prepare.images.check import ImageInfo, check_image, inspect_image
from viscon_hub.prepare.images.fetch import DROP_REASONS, ImageResult, acquire_images, acquire_images_sync
from viscon_hub.prepare.images.policy import FetchPolicy
from viscon_hub.prepare.images.store import ImageStore, IndexRecord

__all__ = [
    "DROP_REASONS",
    "FetchPolicy",
    "ImageInfo",
    "ImageResult",
    "ImageStore",
    "IndexRecord",
    "acquire_images",
    "acquire_images_sync",
    "check_image",
    "inspect_image",
]
