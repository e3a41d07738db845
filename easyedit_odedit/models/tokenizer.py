"""An offline word-level tokenizer for small models.

Word-level on purpose: EasyEdit's evaluation tokenises ``prompt + " " + target`` and expects it to
end in exactly ``tok(target)``; with a word-level vocabulary that holds by construction (BPE with a
leading-space marker would not). No BOS/EOS is added, because EasyEdit's VQA collate builds label
ids with special tokens switched on.
"""
from __future__ import annotations

import re
from typing import Iterable, List

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<unk>", "</s>"]
_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> List[str]:
    """The same split the tokenizer applies (lower-cased words and single punctuation marks)."""
    return _WORD.findall(text.lower())


def build_word_tokenizer(texts: Iterable[str], extra_words: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    vocab_words = sorted({w for text in texts for w in words(text)} | set(map(str.lower, extra_words)))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + vocab_words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="</s>", padding_side="left")
