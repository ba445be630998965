"""CPython's own tests of concurrent.futures (Lib/test/test_concurrent_futures.py), loaded under this
module's name from where Debian's libpython3.11-testsuite installs them, so that workers import the
module's task functions (mul, capture, sleep_and_raise, ...) by reference from here, as clients name them.

`AVAILABLE` says whether the file is there; importing this module without it defines nothing else.
"""

from __future__ import annotations

import sys
from pathlib import Path

PATH = Path(f"/usr/lib/python{sys.version_info.major}.{sys.version_info.minor}/test/test_concurrent_futures.py")
AVAILABLE = PATH.is_file()

if AVAILABLE:
    exec(compile(PATH.read_text(), str(PATH), "exec"), globals())
