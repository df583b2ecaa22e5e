"""Peak memory of checking one large image: the bounded check against a full decode, same run.

A helper process writes one image (JPEG or PNG, default 8000 x 8000 = 64 M pixels, under the default
``max_pixels``); each side runs in a fresh subprocess that reads the file, notes its peak RSS before
and after one ``check_image`` call, and reports the growth:

- ours: ``check_image`` with the default ``FetchPolicy`` (``max_decode_pixels`` 16 M: a JPEG is
  measured by a reduced decode, a larger PNG is refused before any pixel is decoded).
- bare: ``check_image`` with ``max_decode_pixels`` raised to ``max_pixels``, i.e. the full decode
  the check did before.

``ratio`` is ours / bare peak growth (lower is better).

    python bench/bench_decode_memory.py [--side 8000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import json, resource, sys
from viscon_hub.prepare.images import FetchPolicy
from viscon_hub.prepare.images.check import check_image

path, bounded = sys.argv[1], sys.argv[2] == "1"
data = open(path, "rb").read()
policy = FetchPolicy() if bounded else FetchPolicy(max_decode_pixels=FetchPolicy().max_pixels)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
info, reason, _ = check_image(data, policy=policy)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_growth_mb": round((after - before) / 1024, 1), "reason": reason}))
"""


MAKE = """
import sys
from PIL import Image
path, fmt, side = sys.argv[1], sys.argv[2], int(sys.argv[3])
Image.linear_gradient("L").resize((side, side)).convert("RGB").save(path, fmt)
"""


def measure(path: str, bounded: bool) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, path, "1" if bounded else "0"],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=8000)
    args = parser.parse_args()
    import tempfile

    for fmt in ("JPEG", "PNG"):
        with tempfile.NamedTemporaryFile(suffix="." + fmt.lower()) as f:
            # Made in its own process: a child's peak RSS starts at its parent's, so the parent stays small.
            subprocess.run([sys.executable, "-c", MAKE, f.name, fmt, str(args.side)], check=True)
            ours, bare = measure(f.name, True), measure(f.name, False)
        ratio = round(ours["peak_growth_mb"] / bare["peak_growth_mb"], 3) if bare["peak_growth_mb"] else None
        print(json.dumps({"format": fmt, "side": args.side, "ours": ours, "bare": bare, "ratio": ratio}))


if __name__ == "__main__":
    main()
