"""`python -m trl_kto_ext` / `trl-kto-ext`: dispatches `plot` (before anything heavy loads), `online`, else offline KTO."""

from __future__ import annotations

import sys

from trl_kto_ext.training.library_messages import quiet_library_logs


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
