"""The MiniMMEdit world: easy-vqa images with derived (shape, colour), question families and
templates, the held-out rephrase templates, and a text-only question set.

Everything here is data, derived deterministically from the PyPI package ``easy_vqa`` (1.0) and a
few fixed constants; nothing depends on a run's seed. The splits an editor must never see are
fixed constants of the benchmark (``SPLIT_SEED``), so that a record seed can never move a held-out
item into the train split:

* rephrase templates: one template per paraphrase group (``REPHRASE_TEMPLATES``) is held out for
  T-Gen; ``editor_templates`` and ``paraphrases`` never return it;
* text-only questions: ``text_questions("train")`` / ``text_questions("heldout")``.

Importers that act at edit time (ODEdit's environment sampler) must use the train split only:
``images("train")``, ``questions("train")``, ``text_questions("train")``, ``editor_templates``.
"""
from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import easy_vqa

COLOURS: Tuple[str, ...] = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPES: Tuple[str, ...] = ("circle", "rectangle", "triangle")
YES_NO: Tuple[str, ...] = ("yes", "no")
FAMILIES: Tuple[str, ...] = ("colour", "shape", "yesno")
SPLITS: Tuple[str, ...] = ("train", "test")
TEXT_SPLITS: Tuple[str, ...] = ("train", "heldout")
SPLIT_SEED = 20261126  # fixes the text-only split; never a run's seed
VQA_PROMPT = "Question: {} Short answer:"
PROMPT_WORDS: Tuple[str, ...] = ("question", "short", "answer", ":")


# ---------------------------------------------------------------------------------------------
# Templates
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Template:
    """One easy-vqa question form. ``pattern`` has at most one slot, ``{colour}`` or ``{shape}``.

    family: what the answer is (``colour``, ``shape`` or ``yesno``).
    group: the paraphrase group: templates of one group ask the same thing in other words
        (``colour``, ``shape``, ``yesno.colour``, ``yesno.colour.not``, ``yesno.shape``,
        ``yesno.shape.not``).
    """

    id: str
    group: str
    pattern: str

    @property
    def family(self) -> str:
        return self.group.split(".")[0]

    @property
    def slot(self) -> Optional[str]:
        return "colour" if "{colour}" in self.pattern else "shape" if "{shape}" in self.pattern else None

    @property
    def negated(self) -> bool:
        return self.group.endswith(".not")


def _group(group: str, prefix: str, patterns: Sequence[str]) -> List[Template]:
    return [Template(f"{prefix}{i + 1}", group, p) for i, p in enumerate(patterns)]


TEMPLATES: Tuple[Template, ...] = tuple(
    _group("colour", "c", ["what color is the shape?", "what is the color of the shape?",
                           "what color is the {shape}?", "what is the color of the {shape}?"])
    + _group("shape", "s", ["what shape is in the image?", "what shape is present?",
                            "what is the {colour} shape?", "what shape does the image contain?"])
    + _group("yesno.colour", "yc", ["is there a {colour} shape?", "is there a {colour} shape in the image?",
                                    "does the image contain a {colour} shape?", "is a {colour} shape present?"])
    + _group("yesno.colour.not", "ycn", ["is there not a {colour} shape?",
                                         "is there not a {colour} shape in the image?",
                                         "does the image not contain a {colour} shape?",
                                         "is no {colour} shape present?"])
    + _group("yesno.shape", "ys", ["is there a {shape}?", "is there a {shape} in the image?",
                                   "does the image contain a {shape}?", "is a {shape} present?"])
    + _group("yesno.shape.not", "ysn", ["is there not a {shape}?", "is there not a {shape} in the image?",
                                        "does the image not contain a {shape}?", "is no {shape} present?"])
)
TEMPLATE_BY_ID: Dict[str, Template] = {t.id: t for t in TEMPLATES}
GROUPS: Tuple[str, ...] = tuple(dict.fromkeys(t.group for t in TEMPLATES))

# The last template of every group is held out for T-Gen (the record's ``rephrase``).
REPHRASE_TEMPLATES: Dict[str, str] = {"colour": "c4", "shape": "s4", "yesno.colour": "yc4",
                                      "yesno.colour.not": "ycn4", "yesno.shape": "ys4",
                                      "yesno.shape.not": "ysn4"}


def templates(group_or_family: Optional[str] = None) -> List[Template]:
    """All templates (held-out ones included) of a family (``colour``/``shape``/``yesno``), a
    paraphrase group, or all of them."""
    return [t for t in TEMPLATES if group_or_family in (None, t.group, t.family)]


def is_rephrase_template(template_id: str) -> bool:
    """True for the templates held out as T-Gen rephrasings."""
    return template_id in REPHRASE_TEMPLATES.values()


def editor_templates(group_or_family: Optional[str] = None) -> List[Template]:
    """The templates an editor's augmenter may use: every template except the held-out ones."""
    return [t for t in templates(group_or_family) if not is_rephrase_template(t.id)]


def rephrase_template(group: str) -> Template:
    """The held-out T-Gen template of a paraphrase group."""
    return TEMPLATE_BY_ID[REPHRASE_TEMPLATES[group]]


_SLOT_WORD = re.compile(r"\b(" + "|".join(COLOURS + SHAPES) + r")\b")
_PATTERN_INDEX = {t.pattern: t for t in TEMPLATES}


def parse_question(question: str) -> Tuple[Template, Optional[str]]:
    """(template, slot value) of an easy-vqa question; raises ``ValueError`` on unknown forms."""
    text = " ".join(question.lower().strip().split())
    slot_values = _SLOT_WORD.findall(text)
    pattern = _SLOT_WORD.sub(lambda m: "{colour}" if m.group(1) in COLOURS else "{shape}", text)
    template = _PATTERN_INDEX.get(pattern)
    if template is None or len(slot_values) > 1:
        raise ValueError(f"not an easy-vqa question form: {question!r}")
    return template, (slot_values[0] if slot_values else None)


def fill(template: Template, slot_value: Optional[str] = None) -> str:
    """The question text of a template with its slot filled."""
    if template.slot is None:
        return template.pattern
    if slot_value not in (COLOURS if template.slot == "colour" else SHAPES):
        raise ValueError(f"{template.id} needs a {template.slot}, got {slot_value!r}")
    return template.pattern.format(**{template.slot: slot_value})


def answer(template: Template, slot_value: Optional[str], shape: str, colour: str) -> str:
    """The true answer of a filled template on an image showing ``shape`` in ``colour``."""
    if template.family == "colour":
        return colour
    if template.family == "shape":
        return shape
    present = slot_value == (colour if template.slot == "colour" else shape)
    return "yes" if present != template.negated else "no"


def question_for(template: Template, shape: str, colour: str, slot_value: Optional[str] = None) -> str:
    """Fill a template for an image. Colour/shape templates name the image's own other attribute
    (as easy-vqa does); yes/no templates need ``slot_value``, the attribute asked about."""
    if template.family == "colour" and template.slot:
        slot_value = shape
    elif template.family == "shape" and template.slot:
        slot_value = colour
    return fill(template, slot_value)


def image_prompt(question: str) -> str:
    """The prompt EasyEdit builds for an image question (the target follows after a space)."""
    return VQA_PROMPT.format(question)


# ---------------------------------------------------------------------------------------------
# easy-vqa images and questions
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Image:
    id: int
    split: str
    path: str
    shape: str
    colour: str


@dataclass(frozen=True)
class Question:
    text: str
    answer: str
    image_id: int
    split: str
    template_id: str
    slot_value: Optional[str]

    @property
    def template(self) -> Template:
        return TEMPLATE_BY_ID[self.template_id]

    @property
    def family(self) -> str:
        return self.template.family


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


@functools.lru_cache(maxsize=None)
def _raw(split: str):
    _check_split(split)
    texts, answers, image_ids = getattr(easy_vqa, f"get_{split}_questions")()
    paths = getattr(easy_vqa, f"get_{split}_image_paths")()
    return tuple(texts), tuple(answers), tuple(image_ids), dict(paths)


def raw_questions(split: str) -> Tuple[Tuple[str, ...], Tuple[str, ...], Tuple[int, ...]]:
    """easy-vqa's own (texts, answers, image ids) of a split, every image included."""
    return _raw(split)[:3]


def image_paths(split: str) -> Dict[int, str]:
    """easy-vqa's PNG path of every image id of a split (kept or dropped)."""
    return dict(_raw(split)[3])


def derive_attributes(qa: Sequence[Tuple[str, str]]) -> Tuple[Optional[str], Optional[str]]:
    """(shape, colour) of one image from its own (question, answer) pairs, or None for an
    attribute its answers do not determine or contradict.

    Evidence: the answer of a colour or shape question; a yes/no answer that asserts presence
    ("is there a red shape?" yes, "is no red shape present?" no); elimination when the answers rule
    out every value but one.
    """
    out = []
    for attribute, values in (("shape", SHAPES), ("colour", COLOURS)):
        present, absent = set(), set()
        for text, ans in qa:
            template, slot_value = parse_question(text)
            if template.family == attribute:
                present.add(ans)
            elif template.family == "yesno" and template.slot == attribute:
                (present if (ans == "yes") != template.negated else absent).add(slot_value)
        if present & absent or len(present) > 1:
            out.append(None)
        elif present:
            out.append(next(iter(present)))
        else:
            left = [v for v in values if v not in absent]
            out.append(left[0] if len(left) == 1 else None)
    return out[0], out[1]


@functools.lru_cache(maxsize=None)
def _world(split: str) -> Tuple[Tuple[Image, ...], Tuple[Question, ...], Tuple[int, ...]]:
    texts, answers, image_ids, paths = _raw(split)
    per_image: Dict[int, List[Tuple[str, str]]] = {}
    for text, ans, image_id in zip(texts, answers, image_ids):
        per_image.setdefault(image_id, []).append((text, ans))
    kept: Dict[int, Image] = {}
    dropped = []
    for image_id in sorted(paths):
        shape, colour = derive_attributes(per_image.get(image_id, []))
        if shape is None or colour is None:
            dropped.append(image_id)
        else:
            kept[image_id] = Image(image_id, split, paths[image_id], shape, colour)
    questions = []
    for text, ans, image_id in zip(texts, answers, image_ids):
        if image_id in kept:
            template, slot_value = parse_question(text)
            questions.append(Question(text, ans, image_id, split, template.id, slot_value))
    return tuple(kept.values()), tuple(questions), tuple(dropped)


def images(split: str) -> List[Image]:
    """The images of a split whose (shape, colour) could be derived, by id."""
    return list(_world(split)[0])


def image_index(split: str) -> Dict[int, Image]:
    return {im.id: im for im in _world(split)[0]}


def dropped_images(split: str) -> List[int]:
    """Ids of the images left out because their answers do not determine shape and colour."""
    return list(_world(split)[2])


def questions(split: str, family: Optional[str] = None) -> List[Question]:
    """easy-vqa's own questions on the kept images of a split (optionally one family)."""
    return [q for q in _world(split)[1] if family in (None, q.family)]


def images_with(split: str, shape: Optional[str] = None, colour: Optional[str] = None) -> List[Image]:
    return [im for im in _world(split)[0]
            if shape in (None, im.shape) and colour in (None, im.colour)]


def paraphrases(prompt: str, described: Optional[Dict[str, str]] = None) -> List[str]:
    """Editor-reachable rephrasings of an easy-vqa question (bare or in the VQA prompt): the other
    non-held-out templates of its paraphrase group. A template with a slot the question does not
    fill ("what color is the {shape}?" for "what color is the shape?") is filled from
    ``described``, the unedited model's answers to colour and shape questions on the edit image
    (ODEdit's ``ContentMiner`` passes them), and left out without them. Usable as ODEdit's
    ``environments.paraphrases`` (``easyedit_odedit.benchmark.world:paraphrases``); never returns a
    held-out template. Unknown prompts give []."""
    question, in_prompt = _unwrapped(prompt)
    try:
        template, slot_value = parse_question(question)
    except ValueError:
        return []
    shown = _shown(described or {})
    out = []
    for other in editor_templates(template.group):
        if other.id == template.id:
            continue
        value = slot_value if other.slot == template.slot else shown.get(other.slot)
        if other.slot is not None and value is None:
            continue  # the other form needs a value neither the question nor the description gives
        text = fill(other, value if other.slot else None)
        out.append(VQA_PROMPT.format(text) if in_prompt else text)
    return out


_VQA_PROMPT = re.compile(r"Question: (.*) Short answer:\s*")


def _unwrapped(prompt: str) -> Tuple[str, bool]:
    """The question inside ``VQA_PROMPT`` (and True), or the prompt as it is (and False)."""
    match = _VQA_PROMPT.fullmatch(prompt)
    return (match.group(1), True) if match else (prompt, False)


def _shown(described: Dict[str, str]) -> Dict[str, str]:
    """{"colour": ..., "shape": ...} as far as answers to colour and shape questions tell."""
    shown = {}
    for question, said in described.items():
        try:
            family = parse_question(_unwrapped(question)[0])[0].family
        except ValueError:
            continue
        value = " ".join("".join(c if c.isalpha() else " " for c in said.lower()).split())
        if value in {"colour": COLOURS, "shape": SHAPES}.get(family, ()):
            shown.setdefault(family, value)
    return shown


# ---------------------------------------------------------------------------------------------
# Text-only questions (text locality)
# ---------------------------------------------------------------------------------------------
NUMBER_WORDS: Tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                                 "nine", "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen",
                                 "sixteen", "seventeen", "eighteen", "nineteen", "twenty")
TEXT_KINDS: Tuple[str, ...] = ("plus", "larger", "smaller")
TEXT_HELDOUT_FRACTION = 1 / 3


@dataclass(frozen=True)
class TextQuestion:
    text: str
    answer: str
    kind: str
    split: str


def _text_forms(kind: str, a: int, b: int) -> Tuple[str, str]:
    n = NUMBER_WORDS
    if kind == "plus":
        return f"what is {n[a]} plus {n[b]} ?", n[a + b]
    pick = max(a, b) if kind == "larger" else min(a, b)
    return f"which is {kind} , {n[a]} or {n[b]} ?", n[pick]


@functools.lru_cache(maxsize=None)
def _text_world() -> Tuple[TextQuestion, ...]:
    """Number facts in words, answers single words: ``what is three plus four ?`` -> ``seven``
    (sums up to twenty), ``which is larger , three or seven ?`` -> ``seven`` (and ``smaller``).

    Held-out split: for a fixed third of the unordered pairs {a, b} (a != b) of each kind, one of
    the two orders is held out and the other is trained, so every held-out question is answerable
    from trained knowledge (commutativity / symmetry) but never seen verbatim. Pairs a == b and
    the other two thirds are train only."""
    rng = random.Random(SPLIT_SEED)
    out: List[TextQuestion] = []
    for kind in TEXT_KINDS:
        top = len(NUMBER_WORDS) - 1
        pairs = [(a, b) for a in range(top + 1) for b in range(a + 1, top + 1)
                 if kind != "plus" or a + b <= top]
        rng.shuffle(pairs)
        n_held = round(len(pairs) * TEXT_HELDOUT_FRACTION)
        for k, (a, b) in enumerate(pairs):
            first, second = ((a, b), (b, a)) if rng.random() < 0.5 else ((b, a), (a, b))
            out.append(TextQuestion(*_text_forms(kind, *first), kind, "train"))
            out.append(TextQuestion(*_text_forms(kind, *second), kind, "heldout" if k < n_held else "train"))
        if kind == "plus":
            out += [TextQuestion(*_text_forms(kind, a, a), kind, "train") for a in range(top // 2 + 1)]
    return tuple(sorted(out, key=lambda q: (q.kind, q.text)))


def text_questions(split: Optional[str] = None) -> List[TextQuestion]:
    """The text-only questions of a split (``train``/``heldout``), or all of them."""
    if split is not None and split not in TEXT_SPLITS:
        raise ValueError(f"text split must be one of {TEXT_SPLITS}, got {split!r}")
    return [q for q in _text_world() if split in (None, q.split)]


# ---------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------
def vocabulary_texts() -> List[str]:
    """Every text the model must tokenise: all template fillings, answers, text-only questions,
    and the VQA prompt words."""
    texts = [" ".join(PROMPT_WORDS), " ".join(COLOURS + SHAPES + YES_NO)]
    for template in TEMPLATES:
        values = {"colour": COLOURS, "shape": SHAPES, None: (None,)}[template.slot]
        texts += [fill(template, v) for v in values]
    texts += [f"{q.text} {q.answer}" for q in text_questions()]
    return texts
