"""Peak resident memory of one edit (``peak_rss_mib`` in the bench's rows)."""
from __future__ import annotations

import re
import resource
import sys
from typing import Optional


class PeakRSS:
    """Resident-set high-water mark of this process over a block (MiB)."""

    def __init__(self):
        self.resettable = self._try_reset()
        self.measure = ("VmHWM (process RSS high-water mark, reset before each edit via /proc/self/clear_refs)"
                        if self.resettable else "ru_maxrss (process RSS high-water mark since start)")

    @staticmethod
    def _try_reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return PeakRSS._vmhwm() is not None
        except OSError:
            return False

    @staticmethod
    def _vmhwm() -> Optional[float]:
        try:
            with open("/proc/self/status") as f:
                match = re.search(r"VmHWM:\s+(\d+)\s+kB", f.read())
            return int(match.group(1)) / 1024 if match else None
        except OSError:
            return None

    def reset(self) -> float:
        """Start a block; returns the current RSS (MiB)."""
        if self.resettable:
            self._try_reset()
        return self.current_mib()

    @staticmethod
    def current_mib() -> float:
        try:
            with open("/proc/self/status") as f:
                match = re.search(r"VmRSS:\s+(\d+)\s+kB", f.read())
            return int(match.group(1)) / 1024 if match else float("nan")
        except OSError:
            return float("nan")

    def peak_mib(self) -> float:
        if self.resettable:
            value = self._vmhwm()
            if value is not None:
                return value
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return maxrss / 2 ** 20 if sys.platform == "darwin" else maxrss / 1024  # bytes on macOS, KiB on Linux
