"""The project's hypothesis strategies: the public ones from :mod:`meshredirect.testing.strategies`."""

from meshredirect.testing.strategies import *  # noqa: F403
from meshredirect.testing.strategies import __all__  # noqa: F401
