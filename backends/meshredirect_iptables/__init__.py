"""iptables backends for meshredirect: ``iptables-save`` text and ``iptables-restore`` input.

Both share one lowering (:mod:`meshredirect_iptables.lowering`); the restore
backend builds on the save backend. They are registered in the
``meshredirect.backends`` entry-point group.
"""

from __future__ import annotations

from meshredirect_iptables.lowering import MULTIPORT_LIMIT, IptablesLowering
from meshredirect_iptables.restore import IptablesRestoreBackend
from meshredirect_iptables.save import IptablesSaveBackend

__all__ = ["MULTIPORT_LIMIT", "IptablesLowering", "IptablesRestoreBackend", "IptablesSaveBackend"]
