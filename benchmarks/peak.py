"""Run a command and print its wall time and peak RSS as JSON: ``python benchmarks/peak.py -- COMMAND …``.

A child's ``ru_maxrss`` counts the memory it had before ``exec``: a child forked straight from the benchmark (which
holds torch and the adapters) would report the benchmark's size. This launcher is small (it imports neither
torch nor numpy), so the command it forks reports its own peak.
"""

import json
import os
import subprocess
import sys
import time

if __name__ == "__main__":
    command = sys.argv[sys.argv.index("--") + 1 :]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
    code = os.waitstatus_to_exitcode(status)
    print(json.dumps({"seconds": seconds, "peak_rss": usage.ru_maxrss * 1024, "exit": code, "stderr": stderr[-400:]}))
