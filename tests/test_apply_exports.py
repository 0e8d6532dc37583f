"""The apply package's lazy exports stay functions even after their modules are imported."""

from __future__ import annotations

import importlib
import inspect


def test_exported_names_are_the_functions_not_their_modules() -> None:
    import meshredirect.apply as package

    for name in package.__all__:
        importlib.import_module(package._EXPORTS[name])
        value = getattr(package, name)
        assert not inspect.ismodule(value), f"meshredirect.apply.{name} is a module"
    from meshredirect.apply import validate

    assert callable(validate) and not inspect.ismodule(validate)
