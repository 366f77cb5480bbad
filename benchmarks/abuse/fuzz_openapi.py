"""Schema-driven fuzzing of `fairbatch serve` with schemathesis (issue #14's abuse run).

    pip install -e '.[fuzz]'              # schemathesis: optional, not a CI dependency
    python benchmarks/abuse/fuzz_openapi.py -n 300

Starts ``fairbatch serve --model tiny-llama --load-format dummy --cpu-threads 1
--max-model-len 256`` on 127.0.0.1, runs ``st run`` against its /openapi.json (every
operation, every check: no 5xx, answers conform to the documented responses and schemas,
...) and counts the requests it sent and their statuses from the HAR report. Reported:
requests, statuses, 5xx count, schemathesis's exit status and the failures it printed.
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from tiny_server import ENV, tiny_server, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--max-examples", type=int, default=300, help="examples per operation")
    ap.add_argument("--port", type=int, default=8323)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args()
    with tiny_server(args.port, "--max-model-len", "256") as url:
        with tempfile.TemporaryDirectory() as d:
            har = Path(d) / "run.har"
            st = [sys.executable, "-m", "schemathesis.cli", "run", url + "/openapi.json", "--checks", "all",
                  "-n", str(args.max_examples), "--seed", str(args.seed), "--request-timeout", "60",
                  "--continue-on-failure", "--report", "har", "--report-har-path", str(har)]
            t0 = time.perf_counter()
            run = subprocess.run(st, capture_output=True, text=True, env=ENV,
                                 cwd=d)       # its example database (.schemathesis/) goes with the temp dir
            seconds = time.perf_counter() - t0
            entries = json.loads(har.read_text())["log"]["entries"] if har.exists() else []
        statuses = collections.Counter(e["response"]["status"] for e in entries)
        out = {"requests": len(entries), "statuses": dict(sorted(statuses.items())),
               "5xx": sum(n for s, n in statuses.items() if s >= 500), "schemathesis_exit": run.returncode,
               "seconds": round(seconds, 1), "health_after": httpx.get(url + "/health", timeout=10).status_code,
               "summary": run.stdout[-4000:]}
        print(json.dumps({k: v for k, v in out.items() if k != "summary"}, indent=2))
        print(out["summary"])
        write_json(out, args.json)


if __name__ == "__main__":
    main()
