"""`python -m trl_kto_ext` / `trl-kto-ext`: dispatches `plot` (before anything heavy loads), `online`, else offline KTO."""

from __future__ import annotations

import os
import sys

# OpenMP threads that spin while they wait for work (libgomp's default) make every parallel region wait for a thread
# the OS has descheduled when the CPU cores are shared: 4 steps of configs/smollm2-offline.yaml took 180 s instead of
# 23 s on 2 cores running two other jobs; on idle cores sleeping threads cost 3% (14.5 s against 14.1 s). See
# docs/benchmark.md ("Threads on shared cores"). Set before torch loads OpenMP; a value set by the user is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from trl_kto_ext.training.library_messages import quiet_library_logs  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_library_logs()  # before transformers / peft / bitsandbytes are imported
    if argv and argv[0] == "plot":  # reads a JSON file and draws it: no torch needed
        from trl_kto_ext.report.plotting import main as plot_main

        return plot_main(argv[1:])
    if argv and argv[0] == "online":  # online KTO: its own options (trl_kto_ext/cli/online.py)
        from trl_kto_ext.cli.online import main as online_main

        return online_main(argv[1:])
    from trl_kto_ext.cli.offline import main as offline_main

    return offline_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
