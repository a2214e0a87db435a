"""Peak resident memory of this process (Linux /proc), for measuring a step's RSS growth in a fresh process."""

from __future__ import annotations

import gc


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def rss_bytes() -> int:
    """Current resident set size in bytes (VmRSS)."""
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """Peak resident set size in bytes since start or the last :func:`reset_peak` (VmHWM)."""
    return _status_kib("VmHWM") * 1024


def reset_peak() -> int:
    """Collects garbage, resets the peak RSS to the current RSS (Linux >= 4.0), returns the current RSS."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return rss_bytes()
