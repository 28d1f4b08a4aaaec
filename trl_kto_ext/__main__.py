"""`python -m trl_kto_ext`: the `trl-kto-ext` command line."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
