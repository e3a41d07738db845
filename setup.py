from setuptools import find_packages, setup

setup(
    name="easyedit-odedit",
    version="0.1.0",
    description="ODEdit (out-of-distribution multimodal editing with invariant trajectories) for EasyEdit",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["easyedit_odedit", "easyedit_odedit.*"]),
    package_data={"easyedit_odedit": ["assets/*/*", "hparams/*.yaml"]},
    python_requires=">=3.9",
    # easyeditor is installed with --no-deps (its 2023 pins cannot install on Python 3.11): see README.
    install_requires=["torch>=2.1", "transformers>=4.45", "pyyaml", "tqdm", "safetensors", "peft",
                      "matplotlib", "easy-vqa"],
    extras_require={"test": ["pytest", "hypothesis"]},
    entry_points={"console_scripts": ["odedit=easyedit_odedit.cli:main"]},
)
