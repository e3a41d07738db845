"""Edit one record with ODEdit through EasyEdit's own MultimodalEditor and print EasyEdit's metrics
before and after the edit.

Run from the repository root:

    .venv/bin/python examples/edit_one.py                           # tiny random model, synthetic record
    .venv/bin/python examples/edit_one.py --hparams hparams/ODEdit/minimmedit-ft-l.yaml ...
    .venv/bin/python examples/edit_one.py --hparams hparams/ODEdit/blip2-ft-l.yaml \\
        --data /path/to/MMEdit/vqa_eval.json --image-root /path/to/MMEdit/   # a real model (paths replaced)

``--data``: the first record of that E-VQA JSON is edited. ``keep_original_weight=True`` makes
EasyEdit restore the weights after the edit (checked bit for bit here); with ``False`` the edit stays
and ``easyedit_odedit.restore_all(model)`` undoes it later.
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402


def main(argv=None):
    args = C.parser(__doc__.splitlines()[0]).parse_args(argv)
    world, hp, editor = C.set_up(args, n_records=1)
    record = C.records(args, world)[0]
    before = {k: v.detach().clone() for k, v in editor.model.state_dict().items()}
    metrics, _, _ = editor.edit(**C.edit_arguments(hp, [record], args), keep_original_weight=True, verbose=False)
    result = {"record": {k: record[k] for k in ("src", "pred", "alt")},
              "pre": C.numeric(metrics[0]["pre"]), "post": C.numeric(metrics[0]["post"]),
              "restored": all(torch.equal(before[k], v) for k, v in editor.model.state_dict().items())}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
