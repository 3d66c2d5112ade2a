"""Error injection: rewrite the chosen answer with small, plausible errors (BPO's 2nd strategy).

Two injectors with the same interface, ``inject_batch(samples) -> list[str]`` (a sample has
``chosen``, ``question`` and ``pair_id``):

- :class:`RuleInjector`: deterministic word-level rewriter, no model. It swaps numbers (digits
  keep their format: integers stay integers, decimals keep their places and [0, 1] boxes stay in
  [0, 1]), number words, colours, spatial words (left/right, above/below, ...), attribute words
  (small/large, open/closed, wooden/metal, ...) and object nouns from a lexicon (singular/plural
  kept, "a"/"an" fixed). Only whole words are replaced, so punctuation, whitespace and line
  structure are untouched and the text stays parseable; when nothing matches it appends one
  hallucinated-object sentence, so the text always changes.
  Randomness is ``random.Random`` seeded from (seed, key, text), so a given seed gives the same
  rewrite in any process and any order.
- :class:`LLMInjector`: the model's language backbone, text only, prompted with a template
  (``bpo_fast/resources/inject_template.txt`` or a user file with ``{question}`` / ``{answer}``).
"""

import json
import os
import random
import re

from bpo_fast.data.jsonl import load_json
from bpo_fast.data.schema import normalize_text

__all__ = ["RuleInjector", "LLMInjector", "load_template", "DEFAULT_LEXICON", "default_template_path"]

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve"]
# "one" is too often a pronoun ("the one on the left"); it may be produced but is not replaced.
_NUMBER_WORDS_REPLACEABLE = set(NUMBER_WORDS) - {"one", "zero"}

DEFAULT_LEXICON = {
    "colors": ["red", "green", "blue", "yellow", "orange", "purple", "pink", "white", "black",
               "gray", "brown"],
    # word -> its swap partner (applied both ways)
    # attribute word -> a plausible wrong one (applied both ways): sizes, states, materials
    "attributes": {"small": "large", "big": "tiny", "tall": "short", "open": "closed",
                   "empty": "full", "old": "new", "wooden": "metal", "sitting": "standing",
                   "wet": "dry", "bright": "dark", "striped": "plain"},
    "spatial": {"left": "right", "above": "below", "top": "bottom", "upper": "lower",
                "front": "back", "inside": "outside", "under": "over", "near": "far",
                "beneath": "atop", "behind": "ahead"},
    # singular nouns; plurals are formed by rule unless listed in "plurals"
    "objects": [
        "person", "man", "woman", "child", "boy", "girl", "dog", "cat", "horse", "cow", "sheep",
        "bird", "elephant", "bear", "zebra", "giraffe", "car", "bus", "truck", "bicycle",
        "motorcycle", "train", "boat", "airplane", "bench", "chair", "couch", "bed", "table",
        "desk", "cup", "mug", "glass", "bottle", "bowl", "plate", "fork", "knife", "spoon",
        "banana", "apple", "sandwich", "pizza", "cake", "donut", "book", "clock",
        "vase", "laptop", "phone", "keyboard", "television", "umbrella", "backpack", "bag",
        "hat", "shirt", "tree", "flower", "kite", "ball", "box", "lamp", "window", "door",
        "sign", "building", "fence", "circle", "square", "triangle", "star", "cross", "ring",
    ],
    "plurals": {"person": "people", "man": "men", "woman": "women", "child": "children",
                "sheep": "sheep", "knife": "knives", "glass": "glasses", "bus": "buses",
                "box": "boxes", "cross": "crosses", "sandwich": "sandwiches",
                "couch": "couches", "bench": "benches"},
    "places": ["on the left", "on the right", "in the middle", "at the top", "at the bottom",
               "in the background"],
}

_TOKEN = re.compile(r"\d+(?:\.\d+)?|[A-Za-z]+")
_VOWEL = re.compile(r"^[aeiou]", re.I)


def _plural(word, plurals):
    if word in plurals:
        return plurals[word]
    if re.search(r"(s|x|z|ch|sh)$", word):
        return word + "es"
    if re.search(r"[^aeiou]y$", word):
        return word[:-1] + "ies"
    return word + "s"


def _match_case(new, old):
    if old.isupper() and len(old) > 1:
        return new.upper()
    if old[:1].isupper():
        return new[:1].upper() + new[1:]
    return new


def _in_vocab(vocabulary):
    if isinstance(vocabulary, str) or not all(isinstance(w, str) for w in vocabulary):
        raise TypeError("vocabulary: expected a collection of words (strings)")
    vocab = {w.lower() for w in vocabulary}
    return lambda w: w.lower() in vocab


def load_lexicon(path_or_dict=None):
    """The default lexicon, updated with a dict or a JSON file of the same keys.

    List entries (colors, objects, places) replace the default list, so a small world (e.g. the
    demo's vocabulary) can keep every replacement inside its vocabulary; mapping entries
    (attributes, spatial, plurals) are merged into the defaults.
    """
    lex = {k: (dict(v) if isinstance(v, dict) else list(v)) for k, v in DEFAULT_LEXICON.items()}
    if path_or_dict is None:
        return lex
    extra = path_or_dict
    if isinstance(path_or_dict, (str, os.PathLike)):
        try:
            extra = load_json(path_or_dict)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"lexicon: {os.fspath(path_or_dict)!r} is not a JSON file ({exc})") from None
    if not isinstance(extra, dict):
        raise TypeError("lexicon: expected a dict or a JSON file holding an object")
    unknown = set(extra) - set(DEFAULT_LEXICON)
    if unknown:
        raise ValueError(f"lexicon: unknown keys {sorted(unknown)}; expected {sorted(DEFAULT_LEXICON)}")
    for k, v in extra.items():
        if isinstance(lex[k], dict):
            if not isinstance(v, dict):
                raise TypeError(f"lexicon[{k!r}]: expected an object")
            lex[k].update({str(a).lower(): str(b).lower() for a, b in v.items()})
        else:
            if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
                raise TypeError(f"lexicon[{k!r}]: expected a list of non-empty strings")
            lex[k] = [x.lower() if k != "places" else x for x in v]
    return lex


class RuleInjector:
    """Deterministic, seedable rule-based error injector (see the module docstring).

    ``max_edits``: at most this many words are changed per answer (at least one is).
    ``lexicon``: a dict or JSON file overriding the default lexicon (:func:`load_lexicon`).
    ``vocabulary``: optional collection of words; replacements are drawn only from it (for
    word-level tokenizers such as the tiny models', where other words would become ``<unk>``).
    """

    name = "rules"

    def __init__(self, seed=0, lexicon=None, max_edits=2, vocabulary=None):
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
        if not isinstance(max_edits, int) or max_edits < 1:
            raise ValueError(f"max_edits: expected an int >= 1, got {max_edits!r}")
        self.seed = seed
        self.max_edits = max_edits
        lex = load_lexicon(lexicon)
        # vocabulary: keep only words (and swap pairs) inside it, so a word-level tokenizer
        # never sees an out-of-vocabulary replacement.
        ok = (lambda w: True) if vocabulary is None else _in_vocab(vocabulary)
        self.colors = [c for c in dict.fromkeys(lex["colors"]) if ok(c)]
        self.singulars = [w for w in dict.fromkeys(lex["objects"]) if ok(w)]
        if len(self.colors) < 2 or len(self.singulars) < 2:
            raise ValueError("lexicon: needs at least two colors and two objects"
                             + (" inside the vocabulary" if vocabulary is not None else ""))
        self.lexicon = lex
        self.spatial, self.attributes = {}, {}
        for name, table in (("spatial", self.spatial), ("attributes", self.attributes)):
            for a, b in lex[name].items():
                if ok(a) and ok(b):
                    table[a], table[b] = b, a
        self.plural_of = {w: _plural(w, lex["plurals"]) for w in self.singulars}
        plurals = [p for p in dict.fromkeys(self.plural_of.values()) if ok(p)]
        # A word that is both (e.g. "sheep") counts as singular.
        self.noun_kind = {p: "plural" for p in plurals}
        self.noun_kind.update({s: "singular" for s in self.singulars})
        self.plurals = plurals if len(plurals) >= 2 else []
        if not self.plurals:
            self.noun_kind = {s: "singular" for s in self.singulars}
        self.number_words = [w for w in NUMBER_WORDS if ok(w)]
        self.places = [p for p in lex["places"] if all(ok(w) for w in p.split())]
        self.vocabulary_ok = ok
        # digits are rewritten digit by digit: only when the vocabulary can spell them
        self.digits_ok = all(ok(str(d)) for d in range(10))

    # -- candidates -------------------------------------------------------------------------
    def _kind(self, tok):
        low = tok.lower()
        if tok[0].isdigit():
            return "digit" if self.digits_ok else None
        if low in _NUMBER_WORDS_REPLACEABLE and len(self.number_words) > 2:
            return "numword"
        if low in self.colors:
            return "color"
        if low in self.spatial:
            return "spatial"
        if low in self.attributes:
            return "attribute"
        if low in self.noun_kind:
            return "noun"
        return None

    def _replace(self, tok, kind, rng):
        low = tok.lower()
        if kind == "digit":
            return self._new_number(tok, rng)
        if kind == "numword":
            choices = [w for w in self.number_words if w != low and w != "zero"]
            i = NUMBER_WORDS.index(low)
            near = [w for w in choices if abs(NUMBER_WORDS.index(w) - i) <= 2]
            return _match_case(rng.choice(near or choices), tok)
        if kind == "color":
            return _match_case(rng.choice([c for c in self.colors if c != low]), tok)
        if kind == "spatial":
            return _match_case(self.spatial[low], tok)
        if kind == "attribute":
            return _match_case(self.attributes[low], tok)
        pool = self.plurals if self.noun_kind.get(low) == "plural" else self.singulars
        return _match_case(rng.choice([w for w in pool if w != low]), tok)

    @staticmethod
    def _new_number(tok, rng):
        if "." in tok:
            whole, frac = tok.split(".")
            places = len(frac)
            val = float(tok)
            unit = 10 ** -places
            lo, hi = (0.0, 1.0) if 0.0 <= val <= 1.0 else (0.0, max(2 * val, val + 10 * unit))
            for _ in range(20):
                # a nearby but clearly different value: 5-30% of the range, at least one unit
                delta = max(unit, round(rng.uniform(0.05, 0.3) * (hi - lo if hi > lo else 1), places))
                new = val + delta if rng.random() < 0.5 else val - delta
                new = min(hi, max(lo, new))
                s = f"{new:.{places}f}"
                if s != tok:
                    return s
            return f"{val + unit:.{places}f}"
        n = int(tok)
        choices = [m for m in range(max(0, n - 3), n + 4) if m != n and (n == 0 or m > 0)]
        s = str(rng.choice(choices))
        if len(tok) > 1 and tok.startswith("0"):  # zero-padded ids / times keep their width
            s = s.zfill(len(tok))
        return s

    # -- public -----------------------------------------------------------------------------
    def inject(self, text, key=""):
        """Return ``text`` with 1..max_edits plausible errors (always different from ``text``)."""
        if not isinstance(text, str):
            raise TypeError(f"text: expected a string, got {type(text).__name__}")
        rng = random.Random(f"{self.seed}\x1f{key}\x1f{text}")
        toks = [(m.start(), m.end(), m.group()) for m in _TOKEN.finditer(text)]
        cands = [(i, k) for i, (_, _, t) in enumerate(toks) if (k := self._kind(t)) is not None]
        out = text
        if cands:
            n = rng.randint(1, min(self.max_edits, len(cands)))
            chosen = sorted(rng.sample(cands, n), key=lambda c: c[0])
            new = {i: self._replace(toks[i][2], k, rng) for i, k in chosen}
            # Fix "a"/"an" in front of a replaced word.
            for i in list(new):
                if i > 0 and toks[i - 1][2].lower() in ("a", "an") and toks[i][2][0].isalpha():
                    art = toks[i - 1][2]
                    want = "an" if _VOWEL.match(new[i]) else "a"
                    if art.lower() != want and (i - 1) not in new:
                        new[i - 1] = _match_case(want, art)
            parts, pos = [], 0
            for i, (s, e, _) in enumerate(toks):
                if i in new:
                    parts.append(text[pos:s])
                    parts.append(new[i])
                    pos = e
            parts.append(text[pos:])
            out = "".join(parts)
        if normalize_text(out) == normalize_text(text):
            out = self._append_hallucination(text, rng)
        return out

    def _append_hallucination(self, text, rng):
        obj = rng.choice(self.singulars)
        color = rng.choice(self.colors)
        art = "an" if _VOWEL.match(color) else "a"
        ok = self.vocabulary_ok
        lead = "There is also" if ok("also") else "There is"
        if not (ok("there") and ok("is") and ok(art)):
            lead, art = "", ""
        place = f" {rng.choice(self.places)}" if self.places else ""
        sentence = " ".join(w for w in (lead, art, color, obj) if w) + place + "."
        sentence = sentence[0].upper() + sentence[1:]
        body = text.rstrip()
        if not body:
            return sentence
        sep = " " if body[-1] in ".!?" else ". "
        return body + sep + sentence + text[len(body):]

    def inject_batch(self, samples):
        return [self.inject(s.chosen, key=s.pair_id("error_injection", self.name)) for s in samples]


def default_template_path():
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "resources", "inject_template.txt")


def load_template(path=None):
    """The LLM error-injection prompt: ours, or a file with ``{question}`` and ``{answer}``."""
    path = path or default_template_path()
    with open(path, encoding="utf-8") as f:
        tpl = f.read()
    if "{answer}" not in tpl:
        raise ValueError(f"inject template {path}: must contain the placeholder {{answer}} "
                         "(and usually {question})")
    return tpl.strip()


def fill_template(template, question, answer):
    # str.replace, not str.format: answers and user templates may hold other braces.
    return template.replace("{question}", question).replace("{answer}", answer)


_LABEL = re.compile(r"^\s*(rewritten answer( with errors)?|answer|rewrite)\s*:\s*", re.I)


class LLMInjector:
    """Error injection with the model's language backbone (text only, no image).

    ``generate_fn(texts, keys) -> (list[str], n_generated_tokens)`` runs batched text-only
    generation; ``keys`` are the pairs' ids, for per-pair random streams (the pair builder passes
    its own, which shares the model, padding and sampling settings).
    """

    name = "llm"

    def __init__(self, generate_fn, chat_format, template=None):
        if not callable(generate_fn) or not callable(chat_format):
            raise TypeError("generate_fn and chat_format: expected callables")
        self.generate_fn = generate_fn
        self.chat_format = chat_format
        self.template = template if template is not None else load_template()
        if "{answer}" not in self.template:
            raise ValueError("template: must contain the placeholder {answer}")
        self.generated_tokens = 0

    def prompts(self, samples):
        return [self.chat_format(fill_template(self.template, s.question, s.chosen)) for s in samples]

    def inject_batch(self, samples):
        keys = [s.pair_id("error_injection", self.name) for s in samples]
        texts, ntok = self.generate_fn(self.prompts(samples), keys)
        self.generated_tokens += ntok
        return [_LABEL.sub("", t).strip() for t in texts]
