"""What the command-line tools share: device resolution and synchronization, logging, time and size formats,
and the process's peak memory (Linux /proc)."""

import pathlib
import resource
import statistics
import sys
import time

import torch


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def resolve_device(device):
    """ "auto": cuda when available, else cpu; otherwise the device type of `device`."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def sync(device):
    """Waits for the device's queued work (CUDA); nothing on the CPU. `device`: a type name or torch.device."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device if isinstance(device, torch.device) else None)


def fmt_time(seconds):
    """µs below a millisecond, ms below a second, else s (three significant digits)."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.3g} µs"
    return f"{seconds * 1e3:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def fmt_bytes(nbytes):
    return "n/a" if nbytes is None else f"{nbytes / 2**20:.3g} MiB"


def proc_status(field):
    """A size field of /proc/self/status (e.g. VmHWM, the peak resident set) in bytes."""
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak_rss():
    """Resets VmHWM to the current RSS; False where /proc/self/clear_refs is not writable."""
    try:
        pathlib.Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure(call, device, repeats, budget_s):
    """A first call() measured for the memory it peaks at above what was allocated before it, then calls timed
    one by one, at least repeats[0] and at most repeats[1] of them, stopping after repeats[0] once budget_s
    seconds are spent: {value: the first call's result, first_s, peak_bytes, memory_measure, median_s, p20_s,
    p80_s, min_s, repeats}. peak_bytes is None where nothing measures memory (no /proc, not CUDA)."""
    sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        exact = reset_peak_rss()
        before = proc_status("VmRSS") if pathlib.Path("/proc/self/status").exists() else None
    start = time.perf_counter()
    value = call()
    sync(device)
    first = time.perf_counter() - start
    if device == "cuda":
        peak, how = torch.cuda.max_memory_allocated() - before, "torch.cuda.max_memory_allocated"
    elif before is None:  # not Linux: no measure of the current RSS to subtract
        peak, how = None, "unavailable (no /proc)"
    elif exact:
        peak, how = proc_status("VmHWM") - before, "VmHWM after clear_refs"
    else:
        peak, how = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before, "ru_maxrss"
    least, most = repeats
    times = []
    while len(times) < most and (len(times) < least or sum(times) < budget_s):
        sync(device)
        start = time.perf_counter()
        call()
        sync(device)
        times.append(time.perf_counter() - start)
    times = times or [first]
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else [times[0]] * 4
    return {
        "value": value,
        "first_s": first,
        "peak_bytes": None if peak is None else max(int(peak), 0),
        "memory_measure": how,
        "median_s": statistics.median(times),
        "p20_s": q[0],
        "p80_s": q[3],
        "min_s": min(times),
        "repeats": len(times),
    }
