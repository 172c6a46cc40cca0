"""Process memory figures for the benchmarks and the cost experiment (Linux /proc)."""


def process_status_kib(field: str) -> int:
    """A memory line of /proc/self/status in KiB, e.g. "VmRSS" (resident now) or "VmHWM" (peak)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")
