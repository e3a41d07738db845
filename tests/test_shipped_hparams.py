import glob

import pytest
import yaml

from easyedit_odedit import ODEditError, ODEditHyperParams, compat
from easyedit_odedit.hosts import HOSTS, host_spec
from easyedit_odedit.hosts.easyedit_adapters import EasyEditAdapterHost

ADAPTER_HOSTS = [name for name, cls in HOSTS.items() if issubclass(cls, EasyEditAdapterHost)]

_ROOT = __file__.rsplit("/tests/", 1)[0]
SHIPPED = sorted(glob.glob("hparams/ODEdit/*.yaml", root_dir=_ROOT)
                 + glob.glob("hparams/TRAINING/ODEdit/*.yaml", root_dir=_ROOT))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_yaml_loads(name):
    root = __file__.rsplit("/tests/", 1)[0]
    host = yaml.safe_load(open(f"{root}/{name}"))["host"]
    if host in ADAPTER_HOSTS and not compat.has_multimodal_alg(host_spec(host).easyedit_alg):  # GitHub main only
        with pytest.raises(ODEditError, match="GitHub main"):
            ODEditHyperParams.from_hparams(f"{root}/{name}")
        return
    hp = ODEditHyperParams.from_hparams(f"{root}/{name}")
    assert hp.alg_name == "ODEdit" and hp.host in ("FT-L", "FT-V", "LoRA", "MEND", "SERAC", *ADAPTER_HOSTS)
