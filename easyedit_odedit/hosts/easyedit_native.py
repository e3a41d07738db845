"""Hosts that are EasyEdit's own methods (MEND, SERAC).

Their hyper-parameters are EasyEdit's own classes, built from the ``host_hparams`` mapping (or the
host's YAML file). Without an ``archive`` they are being meta-trained (``alg: ODEdit`` in
``MultimodalTrainer``: see ``trainer.py``); with one, MEND edits with EasyEdit's executor and
ODEdit then refines exactly the parameters MEND changed (``refine`` family).
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Dict

from .. import compat
from ..errors import ODEditError

# host name -> (EasyEdit algorithm key, editing hparams class, training hparams class)
EASYEDIT_HOSTS = {
    "MEND": ("MEND", "MENDMultimodalHparams", "MENDMultimodalTrainingHparams"),
    "SERAC": ("SERAC_MULTI", "SERACMultimodalHparams", "SERACMultimodalTrainingHparams"),
}


def build_easyedit_hparams(host: str, mapping: Dict[str, Any], inherited: Dict[str, Any], where: str):
    alg, editing, training = EASYEDIT_HOSTS[host]
    cls = getattr(compat.import_easyeditor(), editing if mapping.get("archive") else training)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {k: v for k, v in {**mapping, **inherited}.items() if k in fields}
    unknown = sorted(set(mapping) - set(fields) - {"alg", "alg_name"})
    if unknown:
        raise ODEditError(f"{where}: host_hparams.{unknown[0]}", mapping[unknown[0]],
                          f"{cls.__name__} takes: {', '.join(sorted(fields))}", problem="is not a known key")
    for key in ("alg", "alg_name"):
        if key in fields:
            values[key] = alg
    for key, value in list(values.items()):
        if hints.get(key) is float and isinstance(value, str):  # YAML reads 1e-4 as a string
            try:
                values[key] = float(value)
            except ValueError:
                raise ODEditError(f"{where}: host_hparams.{key}", value, "give a number") from None
    missing = sorted(k for k, f in fields.items() if k not in values
                     and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    if missing:
        raise ODEditError(f"{where}: host_hparams", missing, f"{cls.__name__} needs these keys too "
                          "(EasyEdit's hparams/TRAINING or hparams/<method> YAMLs show typical values)",
                          problem="lacks required keys")
    hparams = cls(**values)
    compat.complete_host_hparams(hparams)
    return hparams
