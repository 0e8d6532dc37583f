"""Tools for testing redirect rules, ours and yours: throwaway network namespaces, hypothesis strategies.

The strategies need ``hypothesis`` (``pip install 'meshredirect[test]'``); they
live in :mod:`meshredirect.testing.strategies`. Namespace helpers live in
:mod:`meshredirect.testing.netns` and need root and iproute2.
"""
