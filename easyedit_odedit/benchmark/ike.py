"""IKE (in-context knowledge editing) as a MiniMMEdit baseline, through EasyEdit's own multimodal
IKE: ``MultimodalEditor`` with ``IKEMultimodalHyperParams``, ``apply_ike_to_multimodal_model``
(demonstration retrieval) and ``compute_icl_multimodal_edit_quality`` (the in-context evaluation).

IKE changes no weight: an edit is a prompt prefix - the ``k`` train-split demonstrations nearest
to the new fact, then the new fact itself - in front of every evaluation question. ODEdit cannot
decorate it (the plugin rejects ``host: IKE``), so IKE runs alone and has no paired "+ODEdit" row.

Deviation from the paper's IKE: EasyEdit retrieves demonstrations with a sentence-transformers
model (``all-MiniLM-L6-v2``) from a hub this project cannot reach. Here the sentence model is a
sentence-transformers model saved to a local folder whose only module is ``HashedNgramEmbedder``:
the lower-cased words of a sentence and their bigrams, each hashed (CRC-32) into ``dim`` buckets,
counted, L2-normalised. Deterministic, no weights, no download; on MiniMMEdit's small templated
vocabulary word overlap is what makes two facts similar (same question family, shape, colour).

What IKE sees (the protocol's no-leakage rule): the demonstration pool is built from the *train*
split only (``demonstrations``: each train record's fact, its paraphrase and its text-locality
question in EasyEdit's demonstration format); the edit's query is built by EasyEdit from the
request's ``prompt`` and ``target``. The test record's evaluation fields (``rephrase_prompt``,
``image_rephrase``, ``locality_*``, ``multimodal_locality_*``) only enter EasyEdit's evaluation,
which appends the question under test after the IKE context. ``IkeMethod.leakage_check`` makes
the bench's weight check meaningful for a method without weights: the IKE context (the
demonstrations retrieved and their order) must be identical with the record's own and with another
record's evaluation fields, and must contain none of the record's evaluation strings.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import time
import zlib
from typing import Any, Dict, List, Optional, Sequence

import torch

from .. import compat
from .evaluation import EVALUATION_FIELDS, VQA, Evaluation, agreement, answer_ids, e_results
from .methods import Method, build_editor

# EasyEdit's demonstration / in-context format (``New Fact: <prompt> <target>\nPrompt: <question> <answer>``)
FACT = "New Fact: {prompt} {target}\nPrompt: {question} {answer}\n\n"
TASK_NAME = "minimmedit_vqa"
SENTENCE_MODEL_DIR = "hashed-ngram-embedder"
WORD = re.compile(r"[a-z0-9]+")


# -------------------------------------------------------------------------------------------------
# The sentence model
# -------------------------------------------------------------------------------------------------
def hashed_ngram_vector(text: str, dim: int = 512, ngram: int = 2) -> torch.Tensor:
    """Word and word-n-gram counts (n <= ``ngram``) hashed with CRC-32 into ``dim`` buckets,
    L2-normalised (a zero vector for a text without words)."""
    words = WORD.findall(text.lower())
    vec = torch.zeros(dim, dtype=torch.float32)
    for n in range(1, ngram + 1):
        for i in range(len(words) - n + 1):
            gram = " ".join(words[i:i + n])
            vec[zlib.crc32(f"{n}:{gram}".encode()) % dim] += 1.0
    norm = vec.norm()
    return vec / norm if norm > 0 else vec


def _module_base():
    compat.ensure_torchvision_importable()
    try:
        # sentence-transformers is EasyEdit's dependency, not the plugin's: loaded when IKE runs
        from sentence_transformers.sentence_transformer.modules import Module  # sentence-transformers >= 6
    except ImportError:
        from sentence_transformers.models import Module
    return Module


def _embedder_class():
    """``HashedNgramEmbedder``, a sentence-transformers ``Module`` (built lazily: importing
    sentence-transformers needs the plugin's torchvision shim first)."""
    global HashedNgramEmbedder
    if HashedNgramEmbedder is not None:
        return HashedNgramEmbedder
    Module = _module_base()

    class _HashedNgramEmbedder(Module):
        """Sentence embedding = ``hashed_ngram_vector`` of the sentence; no parameters."""

        config_keys = ["dim", "ngram"]

        def __init__(self, dim: int = 512, ngram: int = 2, **_):
            super().__init__()
            self.dim, self.ngram = int(dim), int(ngram)

        def tokenize(self, texts, **_):
            texts = [t if isinstance(t, str) else " ".join(map(str, t)) for t in texts]
            return {"hashed_ngrams": torch.stack([hashed_ngram_vector(t, self.dim, self.ngram) for t in texts])}

        preprocess = tokenize  # the name sentence-transformers >= 6 calls

        def forward(self, features, **_):
            features["sentence_embedding"] = features["hashed_ngrams"].float()
            return features

        def get_sentence_embedding_dimension(self) -> int:
            return self.dim

        get_embedding_dimension = get_sentence_embedding_dimension

        def save(self, output_path: str, *args, **kwargs) -> None:
            self.save_config(output_path)

    _HashedNgramEmbedder.__name__ = _HashedNgramEmbedder.__qualname__ = "HashedNgramEmbedder"
    _HashedNgramEmbedder.__module__ = __name__
    HashedNgramEmbedder = _HashedNgramEmbedder
    return HashedNgramEmbedder


HashedNgramEmbedder = None  # the class, once ``_embedder_class`` has built it


def __getattr__(name):  # sentence-transformers imports ``easyedit_odedit.benchmark.ike.HashedNgramEmbedder``
    if name == "HashedNgramEmbedder":
        return _embedder_class()
    raise AttributeError(name)


def sentence_model_scope():
    """The scope in which sentence-transformers loads this module from a saved folder
    (``compat.plugin_sentence_modules``: needed from sentence-transformers 6 on)."""
    cls = _embedder_class()
    return compat.plugin_sentence_modules({f"{cls.__module__}.{cls.__name__}": cls})


def save_sentence_model(path: str, dim: int = 512, ngram: int = 2) -> str:
    """A sentence-transformers model folder whose module is ``HashedNgramEmbedder``; EasyEdit's
    ``SentenceTransformer(hparams.sentence_model_name)`` loads it offline."""
    from sentence_transformers import SentenceTransformer  # EasyEdit's dependency (see _module_base)

    model = SentenceTransformer(modules=[_embedder_class()(dim=dim, ngram=ngram)], device="cpu")
    model.save(path)
    return path


# -------------------------------------------------------------------------------------------------
# The demonstration pool (train split only)
# -------------------------------------------------------------------------------------------------
def demonstrations(train_records: Sequence[dict]) -> List[str]:
    """EasyEdit-format demonstrations from train-split records: per record its new fact restated,
    its paraphrase answered with the new answer, and its text-locality question with the true
    answer (the three kinds of IKE's paper: copy, update, retain). Never a test record."""
    out = []
    for r in train_records:
        if (r.get("edit") or {}).get("split", "train") != "train":
            raise ValueError("IKE demonstrations must come from the train split")
        prompt, target = VQA.format(r["src"]), r["alt"]
        out.append(FACT.format(prompt=prompt, target=target, question=prompt, answer=target))
        out.append(FACT.format(prompt=prompt, target=target, question=VQA.format(r["rephrase"]), answer=target))
        out.append(FACT.format(prompt=prompt, target=target, question=r["loc"], answer=r["loc_ans"]))
    return out


def embedding_path(results_dir: str, task_name: str = TASK_NAME) -> str:
    """Where EasyEdit's ``apply_ike_to_multimodal_model`` reads the pool (both versions)."""
    return os.path.join(results_dir, "IKE", "embedding", f"{task_name}_embeddings.pkl")


def write_pool(sentence_model: str, sentences: Sequence[str], results_dir: str, task_name: str = TASK_NAME) -> str:
    """Encode the demonstrations with the sentence model and write them where EasyEdit reads them."""
    from sentence_transformers import SentenceTransformer  # EasyEdit's dependency (see _module_base)

    with sentence_model_scope():
        model = SentenceTransformer(sentence_model, device="cpu")
    embeddings = model.encode(list(sentences), show_progress_bar=False, convert_to_numpy=True)
    path = embedding_path(results_dir, task_name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump({"sentences": list(sentences), "embeddings": embeddings}, f)
    return path


def ike_hparams(model_dir: str, image_root: str, sentence_model: str, results_dir: str, k: int,
                task_name: str = TASK_NAME, device=0):
    """EasyEdit's ``IKEMultimodalHyperParams`` for the plugin-loaded model (``model_name: blip2``
    routes to the plugin's loader). The PyPI release requires every field; main defaults most and
    adds a few (``template``, ``exact_match``...), which keep their defaults."""
    cls = compat.module("models.ike.ike_hparams").IKEMultimodalHyperParams
    values = dict(k=int(k), results_dir=results_dir, device=device, name=model_dir, alg_name="IKE",
                  model_name="blip2", tokenizer_class="PreTrainedTokenizerFast", tokenizer_name=model_dir,
                  sentence_model_name=sentence_model, task_name=task_name, qformer_checkpoint=".",
                  qformer_name_or_path=".", state_dict_file=".", coco_image=image_root, rephrase_image=image_root,
                  pretrained_ckpt=None, exact_match=False, model_parallel=False)
    names = {f.name for f in dataclasses.fields(cls)}
    hp = cls(**{k_: v for k_, v in values.items() if k_ in names})
    compat.complete_host_hparams(hp)
    return hp


class TrainSplit(list):
    """What EasyEdit's IKE asks for as ``train_ds`` (only asserted non-None): the train records."""


def prepare(data: Dict[str, str], model_dir: str, results_dir: str, k: int, dim: int = 512):
    """Sentence model, train-split pool and IKE hparams for one bench world. Returns (hparams, train_ds)."""
    os.makedirs(results_dir, exist_ok=True)
    sentence_model = save_sentence_model(os.path.join(results_dir, SENTENCE_MODEL_DIR), dim=dim)
    with open(data["train"]) as f:
        train = TrainSplit(json.load(f))
    write_pool(sentence_model, demonstrations(train), results_dir)
    hp = ike_hparams(model_dir, os.path.abspath(data["image_root"]), sentence_model, results_dir, k)
    return hp, train


def retrieve(hp, train_ds, request: dict) -> List[str]:
    """EasyEdit's ``apply_ike_to_multimodal_model`` for one request: the IKE context."""
    apply = compat.alg_multimodal_dict()["IKE"]
    with compat.host_scope(), sentence_model_scope():
        return apply(None, None, request, hp, train_ds=train_ds)


def context_prefix(icl_examples: Sequence[str], request: dict) -> str:
    """What EasyEdit's in-context evaluation puts in front of a question under test (the
    demonstrations, then the new fact): ``''.join(icl) + 'New Fact: {prompt} {target}\\nPrompt: '``."""
    return "".join(icl_examples) + f"New Fact: {request['prompt']} {request['target']}\nPrompt: "


def prompt_positions(tok, icl_examples: Sequence[str], request: dict, question: str, answer: str,
                     image_tokens: int) -> int:
    """Decoder positions of one in-context evaluation row (image tokens + prefix + question + answer)."""
    text = context_prefix(icl_examples, request) + question + " " + answer
    return image_tokens + len(tok(text, add_special_tokens=False)["input_ids"])


# -------------------------------------------------------------------------------------------------
# The bench method
# -------------------------------------------------------------------------------------------------
class IkeMethod(Method):
    """IKE alone in the bench (single editing only: T sequential edits would be T facts in one
    context, far beyond the base model's positions). Config section ``ike: {k: 1}``.

    Per record: EasyEdit's ``MultimodalEditor.edit(..., train_ds=<train split>)`` (retrieval by
    ``apply_ike_to_multimodal_model``, Rel/T-Gen/I-Gen by ``compute_icl_multimodal_edit_quality``);
    then the bench's own locality, computed for IKE as for every other method - post-vs-pre argmax
    agreement on the answer positions, where "post" is the question under EasyEdit's IKE context
    (demonstrations + the new fact) and "pre" the question alone. (The PyPI release's IKE scores
    locality against the ground truth with that very answer placed in the prompt; main compares
    top-k tokens over whole rows of different lengths. Neither is comparable with the other rows.)
    The extra evaluation (Gen5, Near, Far, Other-Q) likewise puts the IKE context before each
    question."""

    runs_itself = True

    def __init__(self, ike: Optional[dict] = None):
        super().__init__("IKE", "", False)
        self.ike = dict(ike or {})
        self.k = int(self.ike.get("k", 1))

    def host_lr(self, hp) -> Optional[float]:
        return None

    def hparams(self, data, model_dir, seed, results_dir: Optional[str] = None):
        results_dir = results_dir or os.path.join(os.getcwd(), "ike", f"seed{seed}")
        return prepare(data, model_dir, results_dir, self.k, dim=int(self.ike.get("dim", 512)))

    def single(self, run, n: int, setting: str = "single") -> List[dict]:
        hp, train = self.hparams(run.data, run.config["base_model"], run.seed,
                                 os.path.join(run.out, "ike", f"seed{run.seed}"))
        editor = build_editor(hp)
        ev = Evaluation(editor, run.data["image_root"], run.images)
        snapshot = {k: v.detach().clone() for k, v in editor.model.state_dict().items()}
        original_apply = editor.apply_algo
        state: Dict[str, Any] = {}

        def timed_apply(model, tok, request, hparams, **kwargs):
            before = run.peak.reset()
            start = time.perf_counter()
            result = original_apply(model, tok, request, hparams, **kwargs)
            state["timing"] = (time.perf_counter() - start, run.peak.peak_mib(), before, {"steps": None})  # no optimisation steps
            state["icl"] = list(result)
            return result

        editor.apply_algo = timed_apply
        rows, positions = [], []
        records = list(enumerate(run.test[:n]))
        for index, record in records:
            items = ev.extra_items(record)
            extra_pre = run.pre_extra(ev, record, items)
            with sentence_model_scope():
                metrics, _, _ = editor.edit(**ev.edit_arguments([record]), keep_original_weight=True, verbose=False,
                                            train_ds=train)
            request = ev.requests([record])[0]
            prefix = context_prefix(state["icl"], request)
            post = _five(metrics[0]["post"])
            pre = _five(metrics[0]["pre"])
            post.update(self.locality(ev, request, prefix))
            in_context = [(m, kind, image, prefix + prompt, target) for m, kind, image, prompt, target in items]
            extra_post = ev.argmax(in_context)  # answer positions only, as for every method
            positions.append(prompt_positions(editor.tok, state["icl"], request, request["prompt"], request["target"],
                                              _image_tokens(editor)))
            rows += run.rows_for(self, hp, setting, [(index, record)], [post], [pre], [extra_post], [extra_pre],
                                 [items], [state["timing"]])
        for row, n_pos in zip(rows, positions):
            row.update(ike_k=self.k, ike_positions=n_pos)
        changed = [k for k, v in editor.model.state_dict().items() if not torch.equal(snapshot[k], v)]
        if changed:
            raise RuntimeError(f"IKE changed {len(changed)} tensors of the model: {changed[:3]}")
        if setting == "single":
            run.leakage[self.name] = self.leakage_check(hp, train, ev, records[:int(run.config["leakage_check"])])
        return rows

    @staticmethod
    def locality(ev: Evaluation, request: dict, prefix: str) -> Dict[str, float]:
        """T-Loc and I-Loc as the bench computes them for every method (post-vs-pre argmax
        agreement on the answer positions), post = the locality question under the IKE context."""
        out = {}
        e = ev.editor
        with compat.host_scope():
            for key, image_key in (("locality", None), ("multimodal_locality", "multimodal_locality_image")):
                if f"{key}_prompt" not in request:
                    continue
                image = request[image_key] if image_key else None
                if image is not None:
                    image = image.to(f"cuda:{e.hparams.device}")
                target = request[f"{key}_ground_truth"]
                n_answer = len(e.tok(target, add_special_tokens=False)["input_ids"])
                ids = []
                for prompt in (prefix + request[f"{key}_prompt"], request[f"{key}_prompt"]):
                    batch = ev._prepare(e.hparams, e.tok, target, prompt, image)
                    _, pred = ev._quality(e.model, batch)
                    ids.append(list(answer_ids(pred, n_answer)))
                out[f"{key}_acc"] = agreement(ids[0], ids[1])
        return out

    @staticmethod
    def leakage_check(hp, train, ev: Evaluation, records) -> Dict[str, int]:
        """The bench's no-leakage check for a method without weights: each record's IKE context
        (retrieved demonstrations, in order) must be identical with its own and with the next
        record's evaluation fields (``bit_identical``), and must contain neither its held-out
        rephrase nor its held-out text-locality question (``context_free``)."""
        identical = free = 0
        for (_, record), (_, other) in zip(records, records[1:] + records[:1]):
            swapped = {**record, **{k: other[k] for k in EVALUATION_FIELDS}}
            contexts = [retrieve(hp, train, ev.requests([rec])[0]) for rec in (record, swapped)]
            identical += contexts[0] == contexts[1]
            text = "".join(contexts[0])
            free += all(s not in text for s in (record["rephrase"], record["loc"]))
        return {"records": len(records), "bit_identical": identical, "context_free": free,
                "what": "IKE context (no weights change)"}


def _image_tokens(editor) -> int:
    with torch.no_grad():
        size = int(getattr(editor.model, "image_size", 64) or 64)
        return int(editor.model.encode_images(torch.zeros(1, 3, size, size)).shape[1])


def _five(result: dict) -> dict:
    """EasyEdit's IKE metrics under the bench's keys (IKE names I-Gen ``rephrase_image_acc``;
    its own locality entries are replaced by the bench's, see ``IkeMethod.locality``)."""
    out = e_results({k: v for k, v in result.items() if "locality" not in k})
    if "rephrase_image_acc" in out:
        out["image_rephrase_acc"] = out.pop("rephrase_image_acc")
    return out
