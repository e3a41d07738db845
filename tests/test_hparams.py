import os

import pytest
import yaml

from easyedit_odedit import ODEditError, ODEditFileNotFoundError, ODEditHyperParams
from easyedit_odedit.hosts.builtin import FTHyperParams
from tests.conftest import write_yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_loads_and_exposes_what_easyedit_reads(world):
    hp = ODEditHyperParams.from_hparams(write_yaml(world, penalty={"warmup_steps": 2, "lambda_max": "5"}))
    assert hp.alg_name == "ODEdit" and hp.host == "FT-L"
    assert isinstance(hp.host_params, FTHyperParams) and hp.host_params.num_steps == 6
    assert hp.penalty.lambda_max == 5.0 and hp.penalty.warmup_steps == 2
    assert hp.model_name == "blip2" and hp.coco_image == str(world)
    for attr in ("tokenizer_class", "tokenizer_name", "qformer_checkpoint", "state_dict_file", "exact_match"):
        getattr(hp, attr)  # EasyEdit's editor and evaluators read these
    hp.batch_size = 1  # EasyEdit assigns this
    assert hp.batch_size == 1


def test_host_hparams_from_a_path_relative_to_the_yaml(world):
    (world / "ft.yaml").write_text("layers: [0]\nnum_steps: 3\nlr: 1e-3\n")
    hp = ODEditHyperParams.from_hparams(write_yaml(world, host_hparams="ft.yaml"))
    assert hp.host_params.layers == [0] and hp.host_params.lr == 1e-3


@pytest.mark.parametrize("change, field", [
    ({"colour": 1}, "colour"),
    ({"environments": {"se_txt": 2}}, "environments.se_txt"),
    ({"environments": {"se_text": "two"}}, "environments.se_text"),
    ({"risks": {"kl_direction": "sideways"}}, "risks.kl_direction"),
    ({"penalty": {"lambda_max": -1.0}}, "penalty.lambda_init/lambda_max"),
    ({"enabled": "yes"}, "enabled"),
])
def test_bad_values_name_the_field(world, change, field):
    with pytest.raises(ODEditError, match=field.replace(".", r"\.").replace("/", "/")):
        ODEditHyperParams.from_hparams(write_yaml(world, **change))


def test_unknown_host_and_ike_and_bad_host_key(world):
    with pytest.raises(ODEditError, match="host .*not a known host"):
        ODEditHyperParams.from_hparams(write_yaml(world, host="ROME"))
    with pytest.raises(ODEditError, match="cannot be decorated.*in context"):
        ODEditHyperParams.from_hparams(write_yaml(world, host="IKE"))
    with pytest.raises(ODEditError, match="host_hparams.num_stepz"):
        ODEditHyperParams.from_hparams(write_yaml(world, host_hparams={"num_stepz": 3}))
    with pytest.raises(ODEditError, match="host_hparams.lr"):
        ODEditHyperParams.from_hparams(write_yaml(world, host_hparams={"lr": "fast"}))


@pytest.mark.parametrize("key, host_key", [("lr", "lr"), ("steps", "num_steps")])
def test_an_optimiser_pace_a_builtin_host_would_ignore_is_refused(world, key, host_key):
    """FT-L edits inside ODEdit's loop at host_hparams' lr and num_steps; optimiser.lr/steps pace the
    hosts that edit on their own, and were silently ignored for it."""
    with pytest.raises(ODEditError, match=rf"optimiser\.{key} is not read for host FT-L.*host_hparams\.{host_key}"):
        ODEditHyperParams.from_hparams(write_yaml(world, optimiser={key: 3}))
    hp = ODEditHyperParams.from_hparams(write_yaml(world, optimiser={"grad_clip": 0.5}))
    assert hp.optimiser.grad_clip == 0.5


def test_missing_and_malformed_files(world, tmp_path):
    with pytest.raises(ODEditFileNotFoundError, match="hparams path"):
        ODEditHyperParams.from_hparams(str(tmp_path / "nope.yaml"))
    with pytest.raises(FileNotFoundError, match="host_hparams"):
        ODEditHyperParams.from_hparams(write_yaml(world, host_hparams="missing/ft.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("host: FT-L\nhost_hparams: {layers: [1\n")
    with pytest.raises(ODEditError, match="cannot be parsed.*line"):
        ODEditHyperParams.from_hparams(str(bad))
    listing = tmp_path / "list.yaml"
    listing.write_text("- host\n")
    with pytest.raises(ODEditError, match="not a mapping"):
        ODEditHyperParams.from_hparams(str(listing))
    missing_host = tmp_path / "nohost.yaml"
    missing_host.write_text("alg_name: ODEdit\n")
    with pytest.raises(ODEditError, match="host is missing"):
        ODEditHyperParams.from_hparams(str(missing_host))


def test_a_model_folder_that_is_not_there_fails_before_easyedit_builds_anything(world, tmp_path):
    """The real-model YAMLs ship with /path/to/... entries. Left in place, EasyEdit built its own LAVIS
    model instead, trying to download its weights for minutes without a hub (and ODEdit cannot edit
    that model anyway); the PyPI release on a GitHub-main-only model failed with an UnboundLocalError.
    Now the editor and the trainer fail at once, naming the field."""
    from easyeditor import MultimodalEditor, MultimodalTrainer

    from easyedit_odedit import compat

    cases = [({"name": "/path/to/llava-1.5-7b-hf"}, ODEditFileNotFoundError, "name names a file"),
             ({"name": str(world / "img")}, ODEditError, "name is not a model folder the plugin can load")]
    if compat.flavour() != compat.MAIN:
        cases.append(({"model_name": "/path/to/qwen2-vl-7b-instruct"}, ODEditError, "model_name is not a model"))
    for fields, error, words in cases:
        hp = ODEditHyperParams.from_hparams(write_yaml(world, **fields))
        with pytest.raises(error, match=words):
            MultimodalEditor.from_hparams(hp)
    training = os.path.join(ROOT, "hparams", "TRAINING", "ODEdit")
    with open(os.path.join(training, "tiny-mend.yaml")) as f:
        config = dict(yaml.safe_load(f), name="/path/to/blip2-opt-2.7b", results_dir=str(tmp_path))
    hp = ODEditHyperParams.from_dict(config, source_path=os.path.join(training, "x.yaml"))
    with pytest.raises(ODEditFileNotFoundError, match="name names a file"):
        MultimodalTrainer(config=hp, train_set=None, val_set=None)
