"""compat's patch table: every entry's target exists, the table lists every change the plugin makes
to EasyEdit / torch / transformers, the fixes of EasyEdit defects can be switched off, and then
EasyEdit's own edit is bit-identical to one in an interpreter that never imported the plugin."""
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from easyedit_odedit import compat
from easyedit_odedit.compat import executors, patches
from tests.patch_targets import owner_and_name, resolve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = compat.flavour()


def applies_here(patch) -> bool:
    if HERE not in patch.versions:
        return False
    if patch.target.startswith("sentence_transformers."):  # only sentence-transformers >= 6 has the hook
        return hasattr(resolve("sentence_transformers.base.model.BaseModel"), "_module_classes")
    return True


@pytest.mark.parametrize("patch", compat.PATCHES, ids=lambda p: f"{p.target}:{p.kind}")
def test_each_entry_names_a_target_that_exists(patch):
    assert patch.kind in (patches.NEEDED, patches.FIX, patches.PLUGIN_ONLY)
    assert patch.scope in (patches.IMPORT, patches.INSTALL, patches.HOST, patches.CALL)
    assert set(patch.versions) <= {"pypi", "main"} and patch.why and patch.until
    assert callable(resolve(f"easyedit_odedit.{patch.applied_by}")), patch.applied_by
    assert (patch.kind == patches.FIX) == bool(patch.name)
    if not applies_here(patch):
        pytest.skip(f"{patch.target} applies to EasyEdit {patch.versions} only, this is {HERE}")
    owner, name = owner_and_name(patch.target)
    if not patch.adds:
        present = name[1:-1] in owner if name.startswith("[") else hasattr(owner, name)
        assert present, f"{patch.target}: {name} is not in {owner!r}"


def test_the_fixes_are_the_listed_switchable_entries():
    names = {p.name for p in compat.fixes()}
    assert names == {executors.OWN_EXECUTOR, executors.ONE_REQUEST, executors.MEND_EVAL, executors.MEND_EDIT_LRS,
                     executors.LOG_HANDLERS}


CHANGES = r'''
import importlib.util, json, os, sys
import torch
sys.path.insert(0, sys.argv[1])
from tests.patch_targets import owner_and_name  # imports nothing of the plugin

def leaf(name):
    spec = importlib.util.spec_from_file_location("standalone_" + name,
                                                  os.path.join(sys.argv[1], "easyedit_odedit", "compat", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

values = {}  # id -> object, so ids stay unique while the snapshots live


def snapshot():
    """(id of the holder, name) -> (path, id of the value) for module globals, class attributes,
    entries of EasyEdit's dicts and sets, and environment variables."""
    state = {}
    def holder(obj, path, items, by_value=False):
        for name, value in items:
            state[(id(obj), name)] = (path + ("" if name.startswith("[") else ".") + name, value if by_value else id(value))
            values[id(value)] = value
    for modname, module in list(sys.modules.items()):
        if module is None or not modname.startswith(("easyeditor", "torch", "transformers.modeling_utils")):
            continue
        if modname.startswith("torch.") and modname not in ("torch.nn",):
            continue
        holder(module, modname, list(vars(module).items()))
        for name, value in list(vars(module).items()):
            if isinstance(value, type) and value.__module__ == modname and modname.startswith("easyeditor"):
                holder(value, modname + "." + name, list(vars(value).items()))
            if modname.startswith("easyeditor") and isinstance(value, dict):
                holder(value, modname + "." + name, [("[%s]" % k, v) for k, v in value.items() if isinstance(k, str)])
            if modname.startswith("easyeditor") and isinstance(value, set):
                holder(value, modname + "." + name, [("[%s]" % k, k) for k in value if isinstance(k, str)])
    for cls, path in ((torch.Tensor, "torch.Tensor"), (torch.nn.Module, "torch.nn.Module"),
                      (torch.nn.ModuleList, "torch.nn.ModuleList")):
        holder(cls, path, list(vars(cls).items()))
    holder(os.environ, "os.environ", [("[%s]" % k, v) for k, v in os.environ.items()], by_value=True)
    return state

def changed(before, after):
    """New or replaced entries of holders that existed before (a submodule an import adds to its
    package is the import system's doing, not a patch)."""
    holders = {holder for holder, _ in before}
    return {key: after[key][0] for key in after if key[0] in holders
            and (key not in before or before[key][1] != after[key][1]) and not isinstance(values.get(after[key][1]), type(sys))}

imports = leaf("imports")
imports.ensure_torchvision_importable()
import transformers.modeling_utils
start = snapshot()
imports.restore_transformers_reexports()
shimmed = snapshot()
import easyeditor
with_easyedit = snapshot()
import easyedit_odedit
from easyedit_odedit import compat
installed = snapshot()
with compat.host_scope():
    in_scope = snapshot()
found = {**changed(start, shimmed), **changed(with_easyedit, installed), **changed(installed, in_scope)}

listed = {}
for patch in compat.PATCHES:
    if compat.flavour() in patch.versions:
        try:
            owner, name = owner_and_name(patch.target)
        except (ImportError, AttributeError):  # sentence-transformers before 6 has no such hook
            continue
        listed[(id(owner), name)] = patch
expected = [p.target for k, p in listed.items() if p.kind != "fix" and p.scope in ("install", "host")
            and not (p.scope == "host" and p.target.startswith("torch.") and p.target != "torch.nn.ModuleList.__getitem__"
                     and torch.cuda.is_available()) and k not in found]
print(json.dumps({"found": sorted(found.values()), "unlisted": sorted(v for k, v in found.items() if k not in listed),
                  "not_applied": sorted(expected)}))
'''


def _python(*args, env=None, cwd=ROOT) -> subprocess.CompletedProcess:
    path = os.pathsep.join([ROOT, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]])
    env = dict(os.environ, PYTHONPATH=path, ODEDIT_ROOT=ROOT, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def test_the_table_lists_every_change_the_plugin_makes():
    """A fresh interpreter: EasyEdit imported with only the import shims, then the plugin, then one
    host scope; every module global, EasyEdit class attribute, registry entry and environment
    variable that changed must be a table entry, and every install/host entry must have happened."""
    out = _python("-c", CHANGES, ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(result["found"]) >= 10, result["found"]
    assert not result["unlisted"], f"changed but not in compat.PATCHES: {result['unlisted']}"
    assert not result["not_applied"], f"listed but not applied: {result['not_applied']}"


class _Executor:
    is_init = False

    def apply_to_model(self, *args, **kwargs):
        return args


def test_fixes_can_be_switched_off_and_on():
    editor = SimpleNamespace(apply_algo=_Executor().apply_to_model)
    original = editor.apply_algo
    try:
        compat.disable_fixes()
        assert not any(compat.fix_enabled(p.name) for p in compat.fixes())
        executors.own_executor(editor)
        assert editor.apply_algo == original and compat.editor_executor(editor) is None  # EasyEdit as released
        compat.enable_fixes()
        compat.disable_fixes(executors.LOG_HANDLERS)
        assert compat.fix_enabled(executors.OWN_EXECUTOR) and not compat.fix_enabled(executors.LOG_HANDLERS)
    finally:
        compat.enable_fixes()
    executors.own_executor(editor)
    assert editor.apply_algo != original and isinstance(compat.editor_executor(editor), _Executor)


def test_the_environment_variable_switches_every_fix_off():
    code = "from easyedit_odedit import compat\nprint([compat.fix_enabled(p.name) for p in compat.fixes()])"
    assert "True" not in _python("-c", code, env={"ODEDIT_EASYEDIT_FIXES": "0"}).stdout
    assert "False" not in _python("-c", code).stdout


def test_easyedits_own_edit_is_identical_with_fixes_off_and_without_the_plugin(tmp_path):
    modes = {"bare": ["bare"], "plugin, fixes off": ["plugin", "off"]}

    def run(mode):
        folder = tmp_path / mode.replace(" ", "").replace(",", "-")
        folder.mkdir()
        out = _python(os.path.join(ROOT, "tests", "easyedit_ft_edit.py"), *modes[mode], str(folder), cwd=folder)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    with ThreadPoolExecutor(max_workers=2) as pool:
        bare, plugin = pool.map(run, modes)
    assert not bare["plugin"] and plugin["plugin"]
    assert bare["sha256"] != bare["before"], "the edit changed no weight: nothing was compared"
    assert plugin["sha256"] == bare["sha256"]
    assert plugin["metrics"] == bare["metrics"]
