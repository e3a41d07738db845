"""EasyEdit's SERAC (``SERAC_MULTI``) on the plugin's models.

SERAC edits no weight. It keeps each edit (its prompt and new answer) in a memory; a scope
classifier scores every input against the memory, and a counterfactual model answers with the
closest edit written before the input. The output is the mixture
``(1 - s) p_base + s p_counterfactual`` with ``s`` the classifier's similarity (or a hard switch at
``s > 0.5`` with ``supervised`` and without ``soft_weighting``).

EasyEdit's ``SERAC_MULTI`` builds its counterfactual model only for its LAVIS classes: an OPT fed
by BLIP-2's Q-Former (``model.Qformer``, ``ln_vision``, ``visual_encoder``) or a Vicuna fed by
MiniGPT-4's ``encode_img``/``prompt_wrap``. ``PluginSERAC`` keeps everything else EasyEdit's - the
scope classifier and its similarity (``run_classifier``), the memory (``edit``), the contexts
written before an input (``build_rep_cache_contexts``), the archive (``state_dict``), what meta-
training optimises (``outer_parameters``) and the trainer's losses - and gives it the counterfactual
path a plugin model needs: a trainable copy of the base model's language model that reads the base
model's own image tokens (frozen), the matching edit and then the input, left-padded like the base
model's rows so the answer positions of both line up at the right end.

``compat`` routes EasyEdit's ``SERAC_MULTI(...)`` calls (its trainer, its executor, and
``SERAC_MULTI.edit`` itself) to ``PluginSERAC`` when the model is a plugin model (``registration``
hands it the class); EasyEdit's own models keep EasyEdit's class.
"""
from __future__ import annotations

import argparse
import copy
import os
from typing import List

import torch
import transformers
from torch import nn

from .. import compat
from ..errors import ODEditError, ODEditFileNotFoundError
from ..models.adapter import AdapterOutput, MultimodalLMAdapter, token_nll
from ..validation import LAVIS_PATH_NAMES

SERAC_MULTI = compat.easyedit_class("trainer.algs.SERAC", "SERAC_MULTI")


class _Borrowed(nn.Module):
    """Runs another model's module without owning it: its parameters are not this module's, so
    the counterfactual model's archive and optimiser never hold the base model's image encoder."""

    def __init__(self, module: nn.Module):
        super().__init__()
        object.__setattr__(self, "_module", module)

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self._module(*args, **kwargs)


class TextCausalLM(nn.Module):
    """A causal LM made of a decoder and an LM head: the text side of a model whose language-model
    module also holds its image side (LLaVA's ``LlavaForConditionalGeneration`` keeps the vision
    tower and projector next to the Llama decoder)."""

    def __init__(self, decoder: nn.Module, lm_head: nn.Module, config):
        super().__init__()
        self.model, self.lm_head, self.config = decoder, lm_head, config

    def get_decoder(self) -> nn.Module:
        return self.model

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head


def text_side_copy(language_model: nn.Module) -> nn.Module:
    """A trainable copy of what the counterfactual model runs: the decoder and the LM head. A
    language model that holds nothing else (BLIP-2's OPT, MiniGPT-4's Vicuna) is copied whole, so
    its archive keys stay those of the model class; LLaVA's vision tower and projector (0.3 B
    parameters at 7B) are left out: the counterfactual model reads the base model's image tokens."""
    decoder, head = language_model.get_decoder(), language_model.get_output_embeddings()
    text = {id(p) for p in decoder.parameters()} | {id(p) for p in head.parameters()}
    if all(id(p) in text for p in language_model.parameters()):
        return copy.deepcopy(language_model)
    decoder, head = copy.deepcopy((decoder, head))  # one copy: a head tied to the embeddings stays tied
    return TextCausalLM(decoder, head, language_model.config.get_text_config())


def counterfactual_model(base: MultimodalLMAdapter) -> MultimodalLMAdapter:
    """The base model's image encoder (borrowed, frozen) in front of a trainable copy of its language
    model's text side, in the base model's own adapter class: the same row layout (MiniGPT-4's image
    prompt around the image tokens, LLaVA's chat format), tokenizer and image size."""
    language_model = text_side_copy(base.language_model)
    model = type(base)(_Borrowed(base.image_encoder), language_model, base.tokenizer, base.image_size,
                       dict(base.config))
    # SERAC_MULTI sizes an (OPT-side) projection by ``replacement.config.hidden_size``
    model.config.hidden_size = language_model.config.get_text_config().hidden_size
    model.prompts_len_counts_special_tokens = True  # PluginSERAC counts them itself
    return model


class PluginSERAC(SERAC_MULTI):
    """``SERAC_MULTI`` with the counterfactual path of a plugin model (see the module docstring)."""

    def __init__(self, model, config, model_constructor, classifier=None, classifier_tok=None,
                 replacement=None, replacement_tok=None, cache_inputs=None, cache_labels=None, scale=None):
        if config.model_name not in LAVIS_PATH_NAMES:
            raise ODEditError("model_name", config.model_name, "use blip2 or minigpt4 (EasyEdit's multimodal "
                              "trainer and SERAC read a plugin model through that path)",
                              problem="is not a path EasyEdit's SERAC_MULTI can edit a plugin model on")
        if classifier is None:
            _check_scope_classifier(config.cls_name)
        if replacement is None:
            if getattr(config, "freeze_cntr", False):
                raise ODEditError("host_hparams.freeze_cntr", True, "set it to false: on a plugin model the "
                                  "counterfactual model is a trainable copy of the base language model",
                                  problem="is not supported on the plugin's models")
            replacement, replacement_tok = counterfactual_model(model), model.tokenizer
        with compat.serac_projection_width(model, replacement.config.hidden_size):
            super().__init__(model, config, model_constructor, classifier, classifier_tok, replacement,
                             replacement_tok, cache_inputs, cache_labels, scale)
        # the counterfactual model reads the base model's image tokens at its own width: no projection
        self.language_projection = nn.Identity()

    def forward(self, *inputs, return_logits_only=True, eps=torch.finfo(torch.float32).eps, pos_pairs=None,
                **kwargs):
        if pos_pairs is not None or kwargs or len(inputs) != 1:
            raise ODEditError("SERAC input", type(inputs[0]).__name__ if inputs else None,
                              "call the model with one EasyEdit sample dict (image, text_input, labels, prompts_len)",
                              problem="is not supported on the plugin's models")
        samples = inputs[0]
        with torch.set_grad_enabled(self.training and torch.is_grad_enabled()):
            with torch.no_grad():
                base = self.model(samples)
            if not self.cache_inputs:
                return base
            with compat.cpu_redirect():  # EasyEdit moves the classifier's tokens to ``config.device``
                sims, idxs, cls_logits = self.run_classifier(samples)
            counterfactual = self.replacement(self.counterfactual_samples(samples, idxs))
            width = base.logits.shape[1]
            rep_logits = counterfactual.logits[:, -width:].float()
            mixture = self.mix(base.logits.float(), rep_logits, sims.view(-1, 1, 1).to(rep_logits.device), eps)
        if not return_logits_only:
            stats = {"sims/mean": sims.mean().item(), "sims/pos": (sims >= 0.5).float().mean().item(),
                     "sims/neg": (sims < 0.5).float().mean().item(), "params/scale": float(self.scale)}
            return mixture, cls_logits, rep_logits, stats
        return AdapterOutput(loss=token_nll(mixture, base.labels), logits=mixture, labels=base.labels,
                             attention_mask=base.attention_mask,
                             hidden_states=counterfactual.hidden_states[:, -width:])

    def mix(self, base_logits: torch.Tensor, rep_logits: torch.Tensor, sims: torch.Tensor, eps: float):
        """SERAC's output: the similarity-weighted mixture of the two distributions (log), or with
        ``supervised`` and without ``soft_weighting`` the counterfactual model's logits where the
        classifier says the input is in scope."""
        if not self.config.supervised or self.config.soft_weighting:
            return ((1 - sims) * base_logits.softmax(-1) + sims * rep_logits.softmax(-1) + eps).log()
        return torch.where(sims > 0.5, rep_logits, base_logits)

    def counterfactual_samples(self, samples: dict, idxs: torch.Tensor) -> dict:
        """The counterfactual model's rows: EasyEdit's context of the closest edit, then the input;
        the prompt now ends where the input's prompt ends (the answer is the same suffix)."""
        contexts = self.build_rep_cache_contexts()
        tokenizer = self.replacement.tokenizer
        texts, counts = [], []
        for text, n_prompt, i in zip(samples["text_input"], self.model._prompt_counts(samples["prompts_len"]), idxs):
            n_answer = len(tokenizer(text)["input_ids"]) - n_prompt
            texts.append(contexts[int(i)] + text)
            counts.append(len(tokenizer(texts[-1])["input_ids"]) - n_answer)
        return {"image": samples.get("image"), "text_input": texts, "prompts_len": counts}


def _check_scope_classifier(cls_name) -> None:
    """EasyEdit hands ``cls_name`` to ``from_pretrained``: a folder that is not there (a YAML's
    /path/to/ left in place) would fail deep inside transformers as a malformed hub id."""
    fix = ("point host_hparams.cls_name at a BERT folder: EasyEdit's distilbert-base-cased, or "
           "`python -m easyedit_odedit.hosts.serac --classifier <model dir> <folder>` where no hub is reachable")
    if not cls_name:
        raise ODEditError("host_hparams.cls_name", cls_name, fix, problem="is empty")
    looks_like_a_path = os.path.isabs(cls_name) or cls_name.startswith(("./", "../", "~"))
    if looks_like_a_path and not os.path.isdir(os.path.expanduser(cls_name)):
        raise ODEditFileNotFoundError("host_hparams.cls_name", cls_name, fix)


# -- a scope classifier for a model whose tokenizer BERT has never seen ---------------------------
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def write_scope_classifier(folder: str, words: List[str], seed: int = 0, hidden: int = 64, layers: int = 2,
                           heads: int = 2, max_positions: int = 128) -> str:
    """A small randomly initialised BERT and its word-piece tokenizer over ``words``, saved where
    SERAC's ``cls_name`` can load it (``cls_class: AutoModel``; the folder name contains ``bert``,
    which tells SERAC to embed with the [CLS] state). Real runs point ``cls_name`` at a pretrained
    DistilBERT instead; this is for worlds (MiniMMEdit, tests) that have no such download."""
    if "bert" not in os.path.basename(os.path.normpath(folder)).lower():
        raise ODEditError("scope classifier folder", folder, "use a folder name containing 'bert' (SERAC picks its "
                          "[CLS] embedding by that name)", problem="does not name a BERT")
    os.makedirs(folder, exist_ok=True)
    vocab = list(SPECIALS) + sorted({w.lower() for w in words if w and not w.startswith("<")} - set(SPECIALS))
    vocab_file = os.path.join(folder, "vocab.txt")
    with open(vocab_file, "w") as f:
        f.write("\n".join(vocab) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab_file=vocab_file, do_lower_case=True)
    tokenizer.save_pretrained(folder)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=heads, intermediate_size=4 * hidden,
                                     max_position_embeddings=max_positions)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformers.BertModel(config).save_pretrained(folder)
    return folder


def scope_classifier_for(model_dir: str, folder: str, seed: int = 0) -> str:
    """``write_scope_classifier`` over the vocabulary of the plugin model saved in ``model_dir``
    (kept when the folder already holds one)."""
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    return write_scope_classifier(folder, list(tokenizer.get_vocab()), seed=seed)


def main(argv=None) -> None:
    """``python -m easyedit_odedit.hosts.serac --classifier MODEL_DIR FOLDER``: write the small scope
    classifier for a model saved in MODEL_DIR (``scope_classifier_for``) and print its folder."""
    parser = argparse.ArgumentParser(prog="python -m easyedit_odedit.hosts.serac", description=main.__doc__)
    parser.add_argument("--classifier", nargs=2, metavar=("MODEL_DIR", "FOLDER"), required=True,
                        help="FOLDER's name must contain 'bert' (SERAC's cls_name)")
    args = parser.parse_args(argv)
    print(scope_classifier_for(*args.classifier))


if __name__ == "__main__":
    main()
