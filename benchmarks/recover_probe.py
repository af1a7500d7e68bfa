"""One rank of the distributed ``qpeft recover`` benchmark: run the command, record peak RSS.

``python -m benchmarks.recover_probe OUTDIR recover ARGS...`` (alone, or under ``torchrun``) runs
``qpeft`` with ``recover ARGS...`` in this process, then writes ``OUTDIR/rank<R>.json`` with the
exit status and this process's peak resident memory (``getrusage`` max RSS, MiB), so each rank's
high-water mark is known, not only rank 0's.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path


def main() -> None:
    from qpeft.cli import main as qpeft_main

    out, argv = Path(sys.argv[1]), sys.argv[2:]
    status = qpeft_main(argv)
    rank = int(os.environ.get("RANK", "0"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (out / f"rank{rank}.json").write_text(json.dumps({"status": status, "peak_rss_mb": peak}))
    sys.exit(status)


if __name__ == "__main__":
    main()
