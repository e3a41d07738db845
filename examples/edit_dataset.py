"""Edit every record of a small E-VQA JSON with ODEdit and report EasyEdit's metrics.

Run from the repository root:

    .venv/bin/python examples/edit_dataset.py                       # tiny random model, synthetic data
    .venv/bin/python examples/edit_dataset.py --hparams hparams/ODEdit/blip2-ft-l.yaml \\
        --data /path/to/MMEdit/vqa_eval.json --image-root /path/to/MMEdit/   # a real model (paths replaced)

How the records are edited depends on the installed EasyEdit:

* GitHub main: ``MultimodalEditor.edit_dataset(VQADataset(...))``. main's ``edit_dataset`` never
  restores between records, so the edits *accumulate* (each record's ``pre`` is measured on the model
  already edited by the previous records); this script undoes them all at the end with
  ``easyedit_odedit.restore_all``.
* The PyPI release (0.0.1.dev0): its ``edit_dataset`` cannot edit multimodal data (it asserts the
  text-dataset registry and calls an unimported ``compute_edit_quality``), so this script loops over
  ``MultimodalEditor.edit`` - one independent edit per record, restored by EasyEdit after each.
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

from easyedit_odedit import restore_all  # noqa: E402


def main(argv=None):
    args = C.parser(__doc__.splitlines()[0]).parse_args(argv)
    world, hp, editor = C.set_up(args, n_records=3)
    recs = C.records(args, world)
    start = time.time()
    if C.flavour() == "main":
        metrics = edit_dataset_main(editor, hp, args, world)
    else:
        metrics = []
        for i, rec in enumerate(recs):
            result, _, _ = editor.edit(**C.edit_arguments(hp, [rec], args), keep_original_weight=True, verbose=False)
            metrics.append(dict(result[0], case_id=i))
    summary = [{"case_id": m["case_id"], "post": C.numeric(m["post"]), "pre": C.numeric(m.get("pre", {}))}
               for m in metrics]
    for row in summary:
        print(json.dumps(row))
    means = {k: round(sum(r["post"][k] for r in summary) / len(summary), 4) for k in summary[0]["post"]}
    print(f"{len(summary)} records edited in {time.time() - start:.1f}s ({C.flavour()} EasyEdit); mean post: {means}")
    with open("edit_dataset_metrics.json", "w") as f:
        json.dump({"summary": summary, "mean_post": means}, f, indent=1)
    return summary


def edit_dataset_main(editor, hp, args, world):
    from easyeditor import VQADataset

    from easyedit_odedit.models import hf_native

    if args.image_root:  # VQADataset joins record paths to coco_image / rephrase_image
        hp.coco_image = hp.rephrase_image = args.image_root
    ds = VQADataset(args.data or world["data"], config=hp)
    if hf_native.is_native(editor.model):  # PIL images -> the tensors ODEdit's request check accepts
        for item in ds:
            for key in ("image", "image_rephrase", "multimodal_locality_image"):
                item[key] = hf_native.to_easyedit_tensor(item[key])
    metrics, edited, _ = editor.edit_dataset(ds, keep_original_weight=True, verbose=False,
                                             template="Question: {} Short answer:")
    restored = restore_all(C.unwrap(editor.model))
    print(f"main's edit_dataset kept all {len(ds)} edits; restore_all undid them ({restored} tensors)")
    return metrics


if __name__ == "__main__":
    main()
