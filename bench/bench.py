"""The speed benchmark's command (``make bench``); the code is the :mod:`bench` package.

    python bench/bench.py --device cpu --models ddpm_cifar10 small [--quick]

``python bench/bench.py --help`` lists every setting. Worker processes run this script too.
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
# Run as a script, Python puts bench/ first on sys.path, where `import bench` would find this
# file instead of the package; the repository root must come first instead.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from bench.runner import main  # noqa: E402

if __name__ == "__main__":
    main()
