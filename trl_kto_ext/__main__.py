"""`python -m trl_kto_ext` / `trl-kto-ext`: `plot` is dispatched before anything heavy (torch, transformers) loads."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "plot":  # reads a JSON file and draws it: no torch needed
        from .plotting import main as plot_main

        return plot_main(argv[1:])
    from .cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
