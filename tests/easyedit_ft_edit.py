"""Run by tests/test_compat.py: EasyEdit's own FT (its BaseEditor and hparams class) on a tiny GPT-2.

``python easyedit_ft_edit.py plugin [off] DIR``: with the plugin imported (``off``: its fixes
switched off); ``python easyedit_ft_edit.py bare DIR``: the plugin never imported, only its two leaf
modules run from their files (the import shims this environment's EasyEdit needs, and the CPU
redirect for EasyEdit's hard-coded ``cuda:``). Prints one JSON line: the weights' SHA-256 before and
after the edit, and EasyEdit's metrics."""
import contextlib
import dataclasses
import hashlib
import importlib.util
import inspect
import json
import os
import sys

import torch

ROOT = os.environ["ODEDIT_ROOT"]


def leaf(name):
    path = os.path.join(ROOT, "easyedit_odedit", "compat", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"standalone_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if sys.argv[1] == "plugin":
    from easyedit_odedit import compat

    if "off" in sys.argv[2:]:
        compat.disable_fixes()
    redirect = compat.cpu_redirect
else:
    imports = leaf("imports")
    imports.ensure_torchvision_importable()
    imports.restore_transformers_reexports()
    redirect = leaf("scopes").cpu_redirect
import easyeditor  # noqa: E402
import transformers  # noqa: E402
from tokenizers.pre_tokenizers import ByteLevel  # noqa: E402

# a byte-level GPT-2 tokenizer without merges (one token a character) and a tiny GPT-2, in a folder
# whose name says gpt: EasyEdit's BaseEditor picks its model and tokenizer classes by that name
folder = os.path.join(sys.argv[-1], "tiny-gpt2")
byte_chars = sorted(ByteLevel.alphabet()) + ["<|endoftext|>"]
os.makedirs(folder, exist_ok=True)
with open(os.path.join(folder, "vocab.json"), "w") as f:
    json.dump({c: i for i, c in enumerate(byte_chars)}, f)
with open(os.path.join(folder, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n")
torch.manual_seed(0)
config = transformers.GPT2Config(vocab_size=len(byte_chars), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                 bos_token_id=len(byte_chars) - 1, eos_token_id=len(byte_chars) - 1)
transformers.GPT2LMHeadModel(config).save_pretrained(folder)
transformers.GPT2Tokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")).save_pretrained(folder)
fields = dict(
    layers=[1], num_steps=5, lr=0.05, weight_decay=0.0, kl_factor=0.0, norm_constraint=False,
    rewrite_module_tmp="transformer.h.{}.mlp.c_proj", layer_module_tmp="transformer.h.{}",
    mlp_module_tmp="transformer.h.{}.mlp", attn_module_tmp="transformer.h.{}.attn", ln_f_module="transformer.ln_f",
    lm_head_module="lm_head", device=0, alg_name="FT", model_name=folder)
known = {f.name for f in dataclasses.fields(easyeditor.FTHyperParams)}
if "objective_optimization" in known:
    fields["objective_optimization"] = "prompt_last"  # GitHub main's FT asks which loss (its YAMLs' value)
if "batch_size" in known:
    fields["batch_size"] = 1  # GitHub main's single editing asserts it (its default is larger)
hp = easyeditor.FTHyperParams(**fields)


def weights_sha256(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def keep_the_edit(editor) -> dict:
    """The PyPI release keeps an edit with ``keep_original_weight=False``; GitHub main restores after
    every non-sequential edit and keeps it with ``sequential_edit=True``."""
    if "sequential_edit" in inspect.signature(editor.edit).parameters:
        return {"sequential_edit": True}
    return {"keep_original_weight": False}


with redirect(), contextlib.redirect_stdout(sys.stderr):
    editor = easyeditor.BaseEditor.from_hparams(hp)
    before = weights_sha256(editor.model)
    metrics, edited, _ = editor.edit(prompts=["the capital of france is"], target_new=["rome"],
                                     ground_truth=["paris"], locality_inputs={"sky": {"prompt": ["the sky is"],
                                                                                  "ground_truth": ["blue"]}},
                                     verbose=False, **keep_the_edit(editor))
print(json.dumps({"plugin": "easyedit_odedit" in sys.modules, "sha256": weights_sha256(edited), "before": before,
                  "metrics": [{k: v for k, v in m.items() if k != "time"} for m in metrics]}, default=str))
