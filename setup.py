import os

from setuptools import find_packages, setup

# The repository's hparams/ folder (what users edit) is installed as the package's
# easyedit_odedit/hparams/, so that an installed package finds its YAMLs (`odedit demo`) through
# importlib.resources (easyedit_odedit/shipped.py). It holds no Python: a data-only package.
HPARAMS = "easyedit_odedit.hparams"

setup(
    name="easyedit-odedit",
    version="0.1.0",
    description="ODEdit (out-of-distribution multimodal editing with invariant trajectories) for EasyEdit",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["easyedit_odedit", "easyedit_odedit.*"]) + [HPARAMS],
    package_dir={HPARAMS: "hparams"},
    package_data={"easyedit_odedit": ["assets/*/*"], HPARAMS: ["*/*.yaml", "*/*/*.yaml"]},
    zip_safe=False,
    python_requires=">=3.9",
    # easyeditor is installed with --no-deps (its 2023 pins cannot install on Python 3.11): see README.
    install_requires=["torch>=2.1", "transformers>=4.45", "pyyaml", "tqdm", "safetensors", "peft",
                      "matplotlib", "easy-vqa"],
    extras_require={"test": ["pytest", "hypothesis"]},
    entry_points={"console_scripts": ["odedit=easyedit_odedit.cli:main"]},
)
