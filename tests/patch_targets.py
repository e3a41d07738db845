"""Dotted paths of compat.PATCHES targets to objects (imports nothing of the plugin: used before it loads)."""
import importlib


def resolve(path: str):
    """The object a dotted path names: the longest importable module prefix, then attributes (as
    EasyEdit defined them, where the plugin put a constructor in their place)."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            value = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            value = getattr(value, attr)
            value = getattr(value, "__odedit_original__", value)
        return value
    raise ImportError(path)


def owner_and_name(target: str):
    """(the object that holds the target, its attribute name or ``[key]``)."""
    if target.endswith("]"):
        container, key = target[:-1].split("[")
        return resolve(container), f"[{key}]"
    owner, _, name = target.rpartition(".")
    return resolve(owner), name
