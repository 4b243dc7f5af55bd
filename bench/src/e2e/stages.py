"""Wall time and own peak RSS per stage, for the baselines of `v2l-bench e2e` (written beside
them; each imports it)."""
import json
import time


def hwm_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e6
    return 0.0


class Stages:
    """Wall time and own peak RSS per stage (the kernel's mark is reset between stages)."""

    def __init__(self):
        self.stages = {}
        self.highest = 0.0
        self._reset()

    def _reset(self):
        try:
            open("/proc/self/clear_refs", "w").write("5")
        except OSError:
            pass
        self.t = time.perf_counter()

    def end(self, name):
        peak = hwm_mb()
        self.highest = max(self.highest, peak)
        self.stages[name] = {"wall_s": time.perf_counter() - self.t, "peak_rss_mb": peak}
        print(json.dumps({"stage": name, **self.stages[name]}), flush=True)
        self._reset()
