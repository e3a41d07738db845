"""``ODEditHyperParams``: one YAML that names the host method, the host's hyper-parameters and
ODEdit's own settings, and looks to EasyEdit like any other hparams object.

Example (``hparams/ODEdit/minimmedit-ft-l.yaml``)::

    alg_name: ODEdit
    host: FT-L
    host_hparams: {layers: [3], num_steps: 20, lr: 1e-3}   # or a path to the host's own YAML
    model_name: blip2            # EasyEdit's LAVIS code path
    name: easyedit_odedit/assets/minimmedit-base
    device: 0
    environments: {locality_pool: minimmedit:train}   # or a train-split E-VQA JSON of yours
    penalty: {warmup_steps: 5}

Attributes EasyEdit reads (``model_name``, ``name``, ``tokenizer_*``, ``coco_image``, ...) come from
the top level, else from the host's hparams; anything else EasyEdit asks for (a MEND trainer reads
``lr``, ``opt``, ``max_iters``...) is delegated to the host's hparams object.
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

import yaml

from ..errors import ODEditError, ODEditFileNotFoundError
from ..hosts import HOSTS, host_spec
from ..settings import EASYEDIT_FIELDS, typed


@dataclass
class EnvironmentSettings:
    """How each edit is seen: IN (the request), SE (must carry the edit), OUT (must not change)."""

    se_text: int = 2            # rephrased-text environments drawn each step
    se_image: int = 2           # image views of the same content drawn each step
    se_joint: int = 1           # both shifted at once
    out_text: int = 2           # text-only locality prompts drawn each step
    out_image: int = 4          # image locality prompts drawn each step
    pool_factor: int = 2        # the per-edit pool holds pool_factor x the per-step count
    near_miss_share: float = 0.5  # share of OUT image prompts that are near misses
    near_miss_search: int = 2   # pool images searched per OUT image row of the per-edit pool (encoded once)
    out_past: int = 2           # earlier edits of a sequence (not restored since) drawn each step: must not change
    past_edits: int = 64        # the most recent earlier edits kept for that (their images on the CPU)
    # What an OUT row of a sequence's edit must keep. "current": the model as the edit finds it (the
    # earlier edits replayed as OUT rows). "sequence_start": the model before the sequence's first
    # edit, so what earlier edits spilled is repaired; each earlier edit carries ``past_rows`` of its
    # own rows (half that keep its target, half its near misses and protecting rows).
    past_reference: str = "current"
    past_rows: int = 6
    locality_pool: Optional[str] = None   # train-split E-VQA/E-IC JSON, or a JSON list of prompts
    locality_image_root: Optional[str] = None  # image root for the pool (default: coco_image)
    paraphrases: Optional[str] = None     # "pkg.module:function" or a JSON {prompt: [variants]}
    templates: List[str] = field(default_factory=lambda: ["{prompt}", "{prompt} ?", "please answer . {prompt}"])
    word_dropout: float = 0.15  # word-level perturbation: drop each non-final word with this chance
    crop_scale: List[float] = field(default_factory=lambda: [0.75, 1.0])
    max_shift: float = 0.08     # translation, as a fraction of the image side
    hflip: bool = True
    noise_std: float = 0.03
    blur_sigma: float = 0.6
    colour_jitter: float = 0.0  # off by default: colour is content for many questions
    # Content-aware environments (``environments.ContentMiner``): pool images described by the
    # unedited model's answers to the edit's question and to ``probes``. 0 pool images: off.
    probes: List[str] = field(default_factory=list)  # prompts that describe an image (besides the edit's own)
    probe_pool: int = 0         # pool images described per edit (drawn from the locality pool's images)
    near_miss_rows: int = 8     # near misses drawn each step (those sharing the edit's answer first)
    same_content_rows: int = 4  # same-content images drawn each step: must carry the edit
    protect_rows: int = 2       # the other probes on the edit and same-content images drawn each step
    probe_batch: int = 64       # probe rows answered per forward pass
    pool_index: str = "memory"  # where the pool index lives: "memory" (this process), "auto" (the
                                # plugin's cache folder) or a folder; saved, it is loaded by later runs
    # MEND's meta-training (``alg: ODEdit``) also meets each training edit's near misses and
    # same-content images (``trainer.ContentRows``). Off: on MiniMMEdit it made MEND's own edits worse
    # (docs/near-misses.md, "Content in MEND's meta-training")
    meta_training_rows: bool = False


@dataclass
class RiskSettings:
    kl_direction: str = "post_pre"      # the paper's KL(post || pre); "pre_post" is EasyEdit's
    kl_positions: str = "answer"        # "answer" or "all" positions of an OUT prompt
    loc_weight: float = 1.0
    gen_weight: float = 1.0             # MMD weight
    se_nll_weight: float = 1.0          # supervised NLL on SE prompts (0 turns it off)
    mmd_feature: str = "last_prompt_token"   # or "answer_mean"
    mmd_bandwidths: List[float] = field(default_factory=lambda: [0.25, 0.5, 1.0, 2.0, 4.0])
    mmd_detach_edit: bool = True        # pull rephrases towards the edit, not the edit towards them


@dataclass
class PenaltySettings:
    weight: float = 1.0                 # TV penalty weight after warm-up
    warmup_steps: int = 3               # no penalty before this step; optimiser reset when it starts
    lambda_input: str = "delta_norms"   # "delta_norms" | "edit_hidden" | "constant"
    lambda_hidden: int = 16
    lambda_init: float = 1.0
    lambda_max: float = 10.0
    dual_lr: float = 0.01
    tv_tolerance: float = 0.0           # dual ascent on lambda * (TV - tolerance); 0 is the paper's Eq. 13
    normalise: bool = True              # divide G by (1 + w * lambda), as DomainBed's IRM does


@dataclass
class OptimiserSettings:
    steps: int = 10                     # ODEdit refinement steps for hosts that edit on their own
    lr: Optional[float] = None          # default: the host's learning rate
    grad_clip: float = 1.0
    cache_prefix: bool = True           # compute activations below the edited layers once per edit
    refine_start: str = "better"        # refine family: "better" of the host's solution and the weights
                                        # before it (lower objective on the edit's rows), or always "host"


@dataclass
class ConstraintSettings:
    """When an edit is done. Off: the host's fixed number of steps (the paper). On: every
    ``check_every`` steps the edit's own rows are checked - the IN row gives the target, the SE rows
    carry it, the OUT rows keep their answers - and the edit stops once all hold, at the latest after
    ``max_steps``; at a check, the weight of each violated group (SE, OUT) is multiplied by
    ``growth`` (a multiplier that rises while its constraint is violated)."""

    enabled: bool = False
    max_steps: int = 100
    check_every: int = 5
    se_share: float = 1.0       # share of SE rows that must give the edit's target
    out_share: float = 1.0      # share of OUT rows whose answer must stay the unedited model's
    out_kl: float = 0.1         # and the OUT rows' mean KL to the unedited model at most this
    growth: float = 1.5
    max_weight: float = 8.0     # a group's weight stays at most this multiple of its configured weight
    # after the edit, the described pool images asked again on the edited weights: those whose answer
    # moved become OUT rows (``OUT_spill``) of another round, at most this many rounds
    reprobe_rounds: int = 0


SECTIONS = {"environments": EnvironmentSettings, "risks": RiskSettings,
            "penalty": PenaltySettings, "optimiser": OptimiserSettings, "constraints": ConstraintSettings}

# Named formulations a YAML selects with ``preset:``; the YAML's own sections override them key by key.
PRESETS: Dict[str, Dict[str, Dict[str, Any]]] = {
    # the paper's: a fixed number of host steps, SE by augmentation, OUT from the pool by image distance
    "paper": {"constraints": {"enabled": False}, "environments": {"probe_pool": 0}, "risks": {"loc_weight": 1.0}},
    # content-aware environments (needs environments.probes) and an edit that stops when its rows hold
    "content": {"constraints": {"enabled": True},
                # many OUT rows a step: an edit that stops when its rows hold is only as local as they
                # are wide (LoRA's low-rank update carried the target into text questions 8 rows missed)
                "environments": {"probe_pool": 256, "se_text": 4, "out_text": 32, "out_image": 16,
                                 "near_miss_rows": 16, "past_reference": "sequence_start", "out_past": 8,
                                 "past_edits": 16},
                "risks": {"loc_weight": 20.0}},
}

@dataclass
class ODEditHyperParams:
    host: str
    host_hparams: Union[str, Dict[str, Any]] = field(default_factory=dict)
    alg_name: str = "ODEdit"
    alg: str = "ODEdit"      # MultimodalTrainer looks up ALG_TRAIN_DICT[config.alg.upper()]
    enabled: bool = True     # false: the host alone, same parameters, optimiser and steps
    progress: bool = False   # a progress bar for each edit's optimisation steps
    preset: str = "paper"    # the formulation the sections start from (``PRESETS``)
    environments: EnvironmentSettings = field(default_factory=EnvironmentSettings)
    risks: RiskSettings = field(default_factory=RiskSettings)
    penalty: PenaltySettings = field(default_factory=PenaltySettings)
    optimiser: OptimiserSettings = field(default_factory=OptimiserSettings)
    constraints: ConstraintSettings = field(default_factory=ConstraintSettings)
    easyedit: Dict[str, Any] = field(default_factory=dict)
    source_path: Optional[str] = None
    host_params: Any = None  # the host's own hparams object, built by its host class

    # -- loading -----------------------------------------------------------------------------
    @classmethod
    def from_hparams(cls, hparams_name_or_path: str) -> "ODEditHyperParams":
        path = _resolve_yaml_path(hparams_name_or_path)
        config = _read_yaml(path, "hparams file")
        return cls.from_dict(config, source_path=path)

    @classmethod
    def from_dict(cls, config: Dict[str, Any], source_path: Optional[str] = None) -> "ODEditHyperParams":
        config = dict(config)
        where = os.path.basename(source_path) if source_path else "hparams"
        alg_name = config.pop("alg_name", "ODEdit")
        config.pop("alg", None)
        if alg_name != "ODEdit":
            raise ODEditError(f"{where}: alg_name", alg_name, "set `alg_name: ODEdit` (the host goes in `host:`)")
        if "host" not in config:
            raise ODEditError(f"{where}: host", None, "add `host:` naming the method ODEdit decorates "
                              f"({', '.join(HOSTS)})", problem="is missing")
        host = typed(f"{where}: host", config.pop("host"), str)
        spec = host_spec(host, where)
        preset_name = _preset_name(where, config.pop("preset", None), config.get("environments"))
        preset = PRESETS[preset_name]
        _refuse_unread_optimiser_keys(where, spec, config.get("optimiser"))
        sections = {}
        for key, section_cls in SECTIONS.items():
            raw = config.pop(key, None) or {}
            if isinstance(raw, dict):
                raw = {**preset.get(key, {}), **raw}
            sections[key] = _build_section(f"{where}: {key}", section_cls, raw)
        if preset is PRESETS["content"] and not sections["environments"].probes:
            # the probes are questions in the model's own prompt format: no preset can name them
            raise ODEditError(f"{where}: environments.probes", [], "name the questions that describe an image, "
                              "e.g. ['Question: what color is it? Short answer:', 'Question: what is it? Short answer:']",
                              problem="is empty, and preset: content needs them")
        if sections["environments"].meta_training_rows and (spec.name != "MEND" or not sections["environments"].probes
                                                            or not sections["environments"].probe_pool):
            raise ODEditError(f"{where}: environments.meta_training_rows", True, "set it only for host MEND with "
                              "environments.probes named and probe_pool > 0 (the near misses are mined by them), "
                              "or remove it", problem="cannot be met")
        host_raw = config.pop("host_hparams", {})
        flags = {k: typed(f"{where}: {k}", config.pop(k), bool) for k in ("enabled", "progress") if k in config}
        easyedit = {}
        for key in list(config):
            if key not in EASYEDIT_FIELDS:
                valid = sorted(["host", "host_hparams", "enabled", "progress", "preset", *SECTIONS, *EASYEDIT_FIELDS])
                raise ODEditError(f"{where}: {key}", config[key],
                                  f"remove it or use one of: {', '.join(valid)}", problem="is not a known key")
            easyedit[key] = config.pop(key)
        base_dir = os.path.dirname(os.path.abspath(source_path)) if source_path else os.getcwd()
        host_mapping = _host_mapping(f"{where}: host_hparams", host_raw, base_dir)
        hp = cls(host=spec.name, host_hparams=host_raw, easyedit=easyedit, source_path=source_path,
                 preset=preset_name, **flags, **sections)
        hp.host_params = spec.build_hparams(host_mapping, _inherited(easyedit), where)
        _validate_settings(hp, where)
        return hp

    # -- what EasyEdit sees -------------------------------------------------------------------
    def __getattr__(self, name: str):
        # Only called for attributes the dataclass does not define.
        if name.startswith("__") or name in ("easyedit", "host_params"):
            raise AttributeError(name)
        if name in self.easyedit:
            return self.easyedit[name]
        host_params = self.__dict__.get("host_params")
        if host_params is not None and hasattr(host_params, name):
            return getattr(host_params, name)
        if name in EASYEDIT_FIELDS:
            return EASYEDIT_FIELDS[name]
        raise AttributeError(f"ODEditHyperParams has no attribute {name!r}")

    def __setattr__(self, name: str, value):
        # EasyEdit assigns e.g. ``hparams.batch_size = 1``; keep those next to the other host fields.
        if name in {f.name for f in dataclasses.fields(self)}:
            object.__setattr__(self, name, value)
        else:
            self.easyedit[name] = value
            host_params = self.__dict__.get("host_params")
            if host_params is not None and hasattr(host_params, name):
                setattr(host_params, name, value)

    @property
    def host_params_alg(self) -> str:
        """The host's key in EasyEdit's ALG_TRAIN_DICT (MEND, SERAC_MULTI)."""
        return host_spec(self.host).easyedit_alg

    def to_dict(self) -> Dict[str, Any]:
        out = {"alg_name": self.alg_name, "host": self.host, "host_hparams": self.host_hparams, "preset": self.preset}
        out.update({k: dataclasses.asdict(getattr(self, k)) for k in SECTIONS})
        out.update(self.easyedit)
        return out


# -------------------------------------------------------------------------------------------------
def _resolve_yaml_path(path: str) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise ODEditError("hparams path", path, "pass the path of a YAML file, e.g. 'hparams/ODEdit/x.yaml'")
    path = str(path)
    if not path.endswith((".yaml", ".yml")) and not os.path.exists(path):
        path += ".yaml"
    if not os.path.isfile(path):
        raise ODEditFileNotFoundError("hparams path", path, "check the path (relative paths start at the "
                                      f"current directory, {os.getcwd()})")
    return path


def _read_yaml(path: str, what: str) -> Dict[str, Any]:
    try:
        with open(path) as f:
            config = yaml.safe_load(f)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ODEditError(f"{what} {path}", f"YAML syntax error{where}", "fix the YAML syntax",
                          problem="cannot be parsed") from None
    if not isinstance(config, dict):
        raise ODEditError(f"{what} {path}", config, "the file must hold a mapping of `key: value` lines",
                          problem="is not a mapping")
    return config


def _preset_name(where: str, name, environments) -> str:
    """The YAML's ``preset:``; left out, ``content`` where the YAML names probes (the questions it
    describes images by) and ``paper`` where it cannot describe content."""
    if name is None:
        probes = environments.get("probes") if isinstance(environments, dict) else None
        return "content" if probes else "paper"
    if name not in PRESETS:
        raise ODEditError(f"{where}: preset", name, f"use one of: {', '.join(PRESETS)} (or leave it out)")
    return name


def _host_mapping(field_name: str, raw, base_dir: str) -> Dict[str, Any]:
    if isinstance(raw, dict):
        return dict(raw)
    if isinstance(raw, str):
        path = raw if os.path.isabs(raw) else os.path.join(base_dir, raw)
        if not os.path.isfile(path):
            raise ODEditFileNotFoundError(field_name, path, "give the host's YAML path relative to the "
                                          "ODEdit YAML, or an inline mapping")
        return _read_yaml(path, "host hparams file")
    raise ODEditError(field_name, raw, "give a path to the host's YAML or an inline mapping")


def _inherited(easyedit: Dict[str, Any]) -> Dict[str, Any]:
    """Model fields defined at the top level override the host's (one YAML defines the model)."""
    return {k: v for k, v in easyedit.items() if k in EASYEDIT_FIELDS}


def _build_section(where: str, section_cls, raw) -> Any:
    if isinstance(raw, section_cls):
        return raw
    if not isinstance(raw, dict):
        raise ODEditError(where, raw, f"give a mapping of {section_cls.__name__} fields")
    fields = {f.name: f for f in dataclasses.fields(section_cls)}
    hints = typing.get_type_hints(section_cls)
    values = {}
    for key, value in raw.items():
        if key not in fields:
            raise ODEditError(f"{where}.{key}", value, f"use one of: {', '.join(fields)}",
                              problem="is not a known key")
        values[key] = typed(f"{where}.{key}", value, hints[key])
    return section_cls(**values)


_CHOICES = {("risks", "kl_direction"): ("post_pre", "pre_post"),
            ("risks", "kl_positions"): ("answer", "all"),
            ("risks", "mmd_feature"): ("last_prompt_token", "answer_mean"),
            ("penalty", "lambda_input"): ("delta_norms", "edit_hidden", "constant"),
            ("optimiser", "refine_start"): ("better", "host"),
            ("environments", "past_reference"): ("current", "sequence_start")}


def _refuse_unread_optimiser_keys(where: str, spec, optimiser) -> None:
    """``optimiser.lr`` and ``optimiser.steps`` pace the hosts that edit on their own (ODEdit refines
    what they did); a host that runs inside ODEdit's loop takes its own ``lr`` and ``num_steps``, so
    setting them here would be silently ignored."""
    if spec.family != "optimise" or not isinstance(optimiser, dict):
        return
    for key, host_key in (("lr", "lr"), ("steps", "num_steps")):
        if key in optimiser:
            raise ODEditError(f"{where}: optimiser.{key}", optimiser[key],
                              f"set host_hparams.{host_key} instead: {spec.name} edits inside ODEdit's loop at its own "
                              f"learning rate and steps (optimiser.{key} paces hosts that edit on their own: MEND, "
                              "WISE, GRACE, ...)", problem=f"is not read for host {spec.name}")


def _validate_settings(hp: ODEditHyperParams, where: str) -> None:
    for (section, key), choices in _CHOICES.items():
        value = getattr(getattr(hp, section), key)
        if value not in choices:
            raise ODEditError(f"{where}: {section}.{key}", value, f"use one of: {', '.join(choices)}")
    counts = {k: getattr(hp.environments, k) for k in ("se_text", "se_image", "se_joint", "out_text",
                                                       "out_image", "out_past", "past_edits", "past_rows", "pool_factor",
                                                       "near_miss_search", "probe_pool", "near_miss_rows",
                                                       "same_content_rows", "protect_rows", "probe_batch")}
    for key, value in counts.items():
        if value < 0 or (key in ("pool_factor", "near_miss_search", "probe_batch") and value < 1):
            raise ODEditError(f"{where}: environments.{key}", value,
                              "use a non-negative count (pool_factor, near_miss_search and probe_batch >= 1)")
    if not hp.environments.pool_index.strip():
        raise ODEditError(f"{where}: environments.pool_index", hp.environments.pool_index,
                          "use `memory`, `auto` (the plugin's cache folder) or the folder to keep the index in")
    if any(not isinstance(p, str) or not p.strip() for p in hp.environments.probes):
        raise ODEditError(f"{where}: environments.probes", hp.environments.probes,
                          "give prompts as the model sees them, e.g. 'Question: what color is the shape? Short answer:'")
    if not 0.0 <= hp.environments.near_miss_share <= 1.0:
        raise ODEditError(f"{where}: environments.near_miss_share", hp.environments.near_miss_share,
                          "use a fraction between 0 and 1")
    if hp.penalty.lambda_max <= 0 or hp.penalty.lambda_init < 0 or hp.penalty.lambda_init >= hp.penalty.lambda_max:
        raise ODEditError(f"{where}: penalty.lambda_init/lambda_max",
                          (hp.penalty.lambda_init, hp.penalty.lambda_max),
                          "use 0 <= lambda_init < lambda_max")
    if not hp.risks.mmd_bandwidths or any(b <= 0 for b in hp.risks.mmd_bandwidths):
        raise ODEditError(f"{where}: risks.mmd_bandwidths", hp.risks.mmd_bandwidths, "give positive multipliers")
    if hp.penalty.tv_tolerance < 0:
        raise ODEditError(f"{where}: penalty.tv_tolerance", hp.penalty.tv_tolerance, "use 0 or a positive number")
    env = hp.environments
    if not env.templates:
        raise ODEditError(f"{where}: environments.templates", env.templates, "give at least one template, e.g. '{prompt}'")
    for template in env.templates:
        try:
            template.format(prompt="x")
        except (KeyError, IndexError, ValueError):
            raise ODEditError(f"{where}: environments.templates", template,
                              "use only the {prompt} placeholder (double other braces: {{ }})") from None
    if len(env.crop_scale) != 2 or not 0 < env.crop_scale[0] <= env.crop_scale[1] <= 1:
        raise ODEditError(f"{where}: environments.crop_scale", env.crop_scale, "give [low, high] with 0 < low <= high <= 1")
    if not 0 <= env.word_dropout < 1:
        raise ODEditError(f"{where}: environments.word_dropout", env.word_dropout, "use a fraction in [0, 1)")
    finite_non_negative = {"penalty.weight": hp.penalty.weight, "penalty.dual_lr": hp.penalty.dual_lr,
                           "penalty.tv_tolerance": hp.penalty.tv_tolerance, "penalty.lambda_max": hp.penalty.lambda_max,
                           "optimiser.grad_clip": hp.optimiser.grad_clip, "risks.loc_weight": hp.risks.loc_weight,
                           "risks.gen_weight": hp.risks.gen_weight, "risks.se_nll_weight": hp.risks.se_nll_weight}
    for name, value in finite_non_negative.items():
        if not math.isfinite(value) or value < 0:
            raise ODEditError(f"{where}: {name}", value, "use a finite number >= 0")
    if hp.optimiser.lr is not None and not (math.isfinite(hp.optimiser.lr) and hp.optimiser.lr > 0):
        raise ODEditError(f"{where}: optimiser.lr", hp.optimiser.lr, "use a positive learning rate (or leave it unset)")
    seed = hp.easyedit.get("seed", EASYEDIT_FIELDS["seed"])
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ODEditError(f"{where}: seed", seed, "give a whole number")
    c = hp.constraints
    if c.max_steps < 1 or c.check_every < 1 or c.reprobe_rounds < 0:
        raise ODEditError(f"{where}: constraints.max_steps/check_every/reprobe_rounds",
                          (c.max_steps, c.check_every, c.reprobe_rounds), "use whole numbers >= 1 (reprobe_rounds >= 0)")
    for name in ("se_share", "out_share"):
        if not 0.0 <= getattr(c, name) <= 1.0:
            raise ODEditError(f"{where}: constraints.{name}", getattr(c, name), "use a fraction between 0 and 1")
    if not (math.isfinite(c.out_kl) and c.out_kl >= 0 and c.growth >= 1 and c.max_weight >= 1):
        raise ODEditError(f"{where}: constraints.out_kl/growth/max_weight", (c.out_kl, c.growth, c.max_weight),
                          "use out_kl >= 0, growth >= 1 and max_weight >= 1")
    if hp.optimiser.steps < 0:
        raise ODEditError(f"{where}: optimiser.steps", hp.optimiser.steps, "use 0 or more steps")
