"""``meshredirect backends``: the installed backends."""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    del parser


def run(args: argparse.Namespace) -> int:
    from meshredirect.backend import available_backends, get_backend

    for name in available_backends():
        doc = (get_backend(name).__doc__ or "").strip().splitlines()
        print(f"{name:<20}{doc[0] if doc else ''}")
    return 0
