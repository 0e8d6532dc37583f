"""Subcommands of the ``meshredirect`` CLI, one module each, imported only when run."""
