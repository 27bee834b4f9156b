# What the bench drivers read of a process in /proc (shared by
# machines.py, restore.py and soak.py; each runs with bench/ on sys.path).


def pss_kib(pid, missing=0):
    """Proportional set size (KiB) from smaps_rollup; `missing` when the
    process is gone or unreadable."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return missing
