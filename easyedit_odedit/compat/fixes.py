"""The switch for the plugin's fixes of EasyEdit defects (``patches.PATCHES`` entries of kind
``FIX``). All are on by default; ``ODEDIT_EASYEDIT_FIXES=0`` in the environment, or
``easyedit_odedit.compat.disable_fixes()``, switches them off to reproduce EasyEdit as released.
Each fix reads the switch when it runs, so it can be flipped at any time."""
from __future__ import annotations

import os
from typing import Set

ENV = "ODEDIT_EASYEDIT_FIXES"
_OFF_WORDS = ("0", "false", "no", "off")
_disabled: Set[str] = set()
_all_disabled = os.environ.get(ENV, "1").strip().lower() in _OFF_WORDS


def disable_fixes(*names: str) -> None:
    """Switch off the named fixes (``patches.fixes()`` lists them), or all of them."""
    global _all_disabled
    if names:
        _disabled.update(names)
    else:
        _all_disabled = True


def enable_fixes() -> None:
    """Every fix on again (also after ``ODEDIT_EASYEDIT_FIXES=0``)."""
    global _all_disabled
    _all_disabled = False
    _disabled.clear()


def fix_enabled(name: str) -> bool:
    return not _all_disabled and name not in _disabled
