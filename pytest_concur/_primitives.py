"""The standard library's lock factories, as they were before pytest-concur replaced them.

``_locks`` replaces ``threading.Lock`` and friends for the whole session (see its opening
docstring). The plugin's own bookkeeping must use real locks: a tracked one would show in
deadlock and hang reports as if the user had made it, and its waits would count as the
test's. This leaf module is imported by ``_locks`` before it installs anything, so the
names here are always the real factories, whoever imports them later.
"""

from __future__ import annotations

import _thread

allocate_lock = _thread.allocate_lock
RLock = _thread.RLock
