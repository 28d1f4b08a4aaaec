"""The `trl-kto-ext` command: `offline` (KTO on a dataset) and `online` commands over one shared run step."""
