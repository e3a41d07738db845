import glob

import pytest

from easyedit_odedit import ODEditHyperParams

SHIPPED = sorted(glob.glob("hparams/ODEdit/*.yaml", root_dir=__file__.rsplit("/tests/", 1)[0]))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_yaml_loads(name):
    root = __file__.rsplit("/tests/", 1)[0]
    hp = ODEditHyperParams.from_hparams(f"{root}/{name}")
    assert hp.alg_name == "ODEdit" and hp.host in ("FT-L", "FT-V", "LoRA")
