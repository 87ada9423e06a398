"""bitbake's hash-equivalence protocol (OEHASHEQUIV 1.1) over tcp, unix and websocket."""

from proxy.hashserv.server import InvokeError, is_valid_unihash
from proxy.hashserv.service import HashservService

__all__ = ["HashservService", "InvokeError", "is_valid_unihash"]
