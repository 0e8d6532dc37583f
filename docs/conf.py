"""Sphinx configuration of meshredirect's documentation site.

Built in strict mode by ``./dev test`` (and ``./dev docs``)::

    sphinx-build -W --keep-going -n -q -b html docs docs/_build/html

Pages that describe the code (the CLI reference, the policy's fields, the
support matrix, the API) are generated from the code on every build by the
local extension ``_ext/meshredirect_docs.py``, so they cannot drift.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))

project = "meshredirect"
author = "the meshredirect authors"
copyright = "the meshredirect authors"
release = version = "0.1.0"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
    "meshredirect_docs",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "_generated/fragments", "**/.ipynb_checkpoints"]
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

html_theme = "furo"
html_title = "meshredirect"
html_static_path = ["_static"]

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "undoc-members": True, "show-inheritance": True}
autodoc_preserve_defaults = True

# Strict mode (-n) resolves every cross-reference. References into the standard library and the
# dependencies would need their inventories from the network, which builds here do not have: those,
# and only those, are left unresolved on purpose.
_STDLIB = "|".join(sorted(sys.stdlib_module_names))
_DEPENDENCIES = "attrs?|lark|hypothesis|nftables"
nitpick_ignore_regex = [
    ("py:.*", rf"({_STDLIB}|{_DEPENDENCIES})(\..*)?"),
    (
        "py:.*",
        r"(int|str|bytes|bool|float|object|tuple|list|dict|set|frozenset|type|None|Exception|ValueError|LookupError|KeyError)",
    ),
    ("py:.*", r"(Self|Final|Any|TypeAlias|ClassVar|Iterable|Iterator|Sequence|Mapping|Callable|Protocol|NoReturn)"),
    # Private helpers and type variables that appear in signatures are not documented on purpose.
    ("py:.*", r"(.*\.)?_\w+"),
    ("py:.*", r"(.*\.)?[A-Z]"),
    # Type aliases of meshredirect.values, written unqualified in annotations.
    ("py:.*", r"(IPAddress|IPNetwork)"),
]
