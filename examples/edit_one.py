"""Edit one record with ODEdit through EasyEdit's MultimodalEditor (tiny model built here).
Run from the repository root: `.venv/bin/python examples/edit_one.py`. For a real model change the
YAML path (and its `name`)."""
from easyedit_odedit.cli import main

if __name__ == "__main__":
    main(["demo", "--out", "results/example"])
