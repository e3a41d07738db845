"""Host editing methods ODEdit decorates (one module a family). Importing this package registers
every host (``base.HOSTS``): the plugin's own (``builtin``) and EasyEdit's (``easyedit_native``,
``easyedit_adapters``)."""
from . import builtin, easyedit_adapters, easyedit_native  # noqa: F401  (each registers its hosts)
from .base import ALIASES, HOSTS, NOT_DECORATABLE, Host, build_host, host_spec, register_host

__all__ = ["ALIASES", "HOSTS", "NOT_DECORATABLE", "Host", "build_host", "host_spec", "register_host"]
