import json
import random
import re

import pytest

from bpo_fast.data.inject import (DEFAULT_LEXICON, LLMInjector, RuleInjector, fill_template,
                                  load_template)
from bpo_fast.data.schema import normalize_text

WORD_OR_NUM = re.compile(r"\d+(?:\.\d+)?|[A-Za-z]+")

TEXTS = [
    "A red cup and two books are on the left side of the table.",
    "There are 3 dogs and 12 cats. The dog on the right is black.",
    "The man is standing behind a blue car, above him is a kite.",
    "An apple lies near an umbrella.",
    "Bounding box: [0.12, 0.345, 0.9, 1.0]; another at [0.002, 0.5, 0.75, 0.999].",
    "The photo was taken at 07 in the morning with 2.5 seconds exposure.",
    "Hello, world!",           # nothing to change: a hallucinated sentence is appended
    "",                        # empty answer
    "...",                     # punctuation only
    "THE DOG IS BROWN.",
    "People sit on benches under the trees.",
    "Line one has a cat.\nLine two has five birds.\n\n- bullet with a green box",
]


def _random_texts(n, seed):
    rng = random.Random(seed)
    vocab = (DEFAULT_LEXICON["colors"] + DEFAULT_LEXICON["objects"] + list(DEFAULT_LEXICON["spatial"])
             + ["the", "a", "is", "on", "with", "and", "three", "7", "0.42", "zebra", "quickly", ","])
    out = []
    for _ in range(n):
        words = [rng.choice(vocab) for _ in range(rng.randint(0, 14))]
        out.append(" ".join(words) + rng.choice(["", ".", "?", "\n"]))
    return out


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_rule_injector_always_changes_the_text(seed):
    inj = RuleInjector(seed=seed)
    for t in TEXTS + _random_texts(300, seed):
        out = inj.inject(t, key="k")
        assert isinstance(out, str) and out.strip()
        assert normalize_text(out) != normalize_text(t), (t, out)


def test_rule_injector_keeps_text_parseable():
    inj = RuleInjector(seed=3, max_edits=3)
    for t in TEXTS + _random_texts(200, 5):
        out = inj.inject(t)
        if WORD_OR_NUM.sub("", out) != WORD_OR_NUM.sub("", t):
            # only the no-candidate fallback may change the structure: it appends one sentence
            assert out.startswith(t.rstrip()) and out.rstrip().endswith("."), (t, out)
            continue
        # same punctuation/whitespace skeleton, same number of words and numbers
        a, b = WORD_OR_NUM.findall(t), WORD_OR_NUM.findall(out)
        assert len(a) == len(b)
        changed = [(x, y) for x, y in zip(a, b) if x != y]
        assert 1 <= len(changed) <= 3
        for x, y in changed:
            assert x[0].isdigit() == y[0].isdigit()      # numbers stay numbers, words stay words
            if x[0].isdigit():
                float(y)
                assert ("." in x) == ("." in y)
                if "." in x:
                    assert len(x.split(".")[1]) == len(y.split(".")[1])  # same decimal places


def test_rule_injector_boxes_stay_valid_json_in_unit_range():
    inj = RuleInjector(seed=0, max_edits=4)
    text = "[0.12, 0.345, 0.9, 1.0]"
    for k in range(50):
        out = inj.inject(text, key=str(k))
        vals = json.loads(out)
        assert len(vals) == 4 and all(0.0 <= v <= 1.0 for v in vals)


def test_rule_injector_is_deterministic_per_seed_and_key():
    a, b, c = RuleInjector(seed=11), RuleInjector(seed=11), RuleInjector(seed=12)
    outs_a = [a.inject(t, key=str(i)) for i, t in enumerate(TEXTS)]
    assert outs_a == [b.inject(t, key=str(i)) for i, t in enumerate(TEXTS)]
    # the call order does not matter (no shared RNG state)
    assert outs_a[::-1] == [b.inject(t, key=str(i)) for i, t in reversed(list(enumerate(TEXTS)))]
    outs_c = [c.inject(t, key=str(i)) for i, t in enumerate(TEXTS)]
    assert outs_a != outs_c


def test_rule_injector_grammar_details():
    inj = RuleInjector(seed=0, max_edits=1)
    seen_article_fix = False
    for k in range(100):
        out = inj.inject("I see an apple.", key=str(k))
        word = out.split()[-1].rstrip(".")
        art = out.split()[-2]
        assert art == ("an" if word[0] in "aeiou" else "a"), out
        seen_article_fix |= art == "a"
        out = inj.inject("Two Dogs.", key=str(k))
        assert out[0].isupper()
    assert seen_article_fix
    # plural nouns are replaced by plural nouns, singular by singular
    for k in range(50):
        out = inj.inject("several cats", key=str(k))
        if out.startswith("several "):
            assert out.split()[1] in inj.plurals


def test_rule_injector_lexicon_and_argument_checks(tmp_path):
    p = tmp_path / "lex.json"
    p.write_text(json.dumps({"objects": ["widget", "gizmo"], "colors": ["teal", "mauve"]}))
    inj = RuleInjector(seed=0, lexicon=str(p), max_edits=1)
    assert inj.inject("a teal widget", key="x") != "a teal widget"
    with pytest.raises(ValueError, match="lexicon"):
        RuleInjector(lexicon={"bogus": []})
    with pytest.raises(TypeError, match="lexicon"):
        RuleInjector(lexicon={"objects": "cat"})
    with pytest.raises(ValueError, match="max_edits"):
        RuleInjector(max_edits=0)
    with pytest.raises(TypeError, match="seed"):
        RuleInjector(seed="0")
    with pytest.raises(TypeError, match="text"):
        RuleInjector().inject(None)


def test_template_default_and_override(tmp_path):
    tpl = load_template()
    assert "{question}" in tpl and "{answer}" in tpl
    assert fill_template(tpl, "Q?", "A {x}.").count("A {x}.") == 1
    own = tmp_path / "t.txt"
    own.write_text("rewrite badly: {answer}")
    assert load_template(str(own)) == "rewrite badly: {answer}"
    bad = tmp_path / "b.txt"
    bad.write_text("no placeholder")
    with pytest.raises(ValueError, match="answer"):
        load_template(str(bad))


def test_llm_injector_uses_template_and_strips_labels():
    from bpo_fast.data.llava_format import Sample

    calls = []

    def fake_generate(texts, keys):
        assert len(keys) == len(texts) and keys[0].endswith(":error_injection:llm")
        calls.append(texts)
        return ["Rewritten answer: a blue cup.", "  two dogs  "], 7

    inj = LLMInjector(fake_generate, chat_format=lambda s: f"USER: {s} ASSISTANT:",
                      template="Q={question} A={answer} ->")
    samples = [Sample("1", 0, "x.png", [{"from": "human", "value": "<image>\nWhat is it?"}],
                      "a red cup.", 1, 0),
               Sample("2", 0, None, [{"from": "human", "value": "How many?"}], "three dogs", 2, 1)]
    assert inj.inject_batch(samples) == ["a blue cup.", "two dogs"]
    assert calls[0][0] == "USER: Q=What is it? A=a red cup. -> ASSISTANT:"
    assert inj.generated_tokens == 7
    with pytest.raises(ValueError, match="answer"):
        LLMInjector(fake_generate, str, template="nothing")


def test_rule_injector_vocabulary_keeps_replacements_in_vocabulary():
    from bpo_fast.models.tiny import default_vocabulary

    vocab = set(default_vocabulary())
    inj = RuleInjector(seed=0, vocabulary=vocab, max_edits=3)
    texts = ["there are two red circles on the left of the blue square .",
             "a small green cat is sitting on the table near three dogs .",
             "hello world"] + _random_texts(100, 9)
    for i, t in enumerate(texts):
        out = inj.inject(t, key=str(i))
        assert normalize_text(out) != normalize_text(t)
        old = set(WORD_OR_NUM.findall(t.lower()))
        new = [w for w in WORD_OR_NUM.findall(out.lower()) if w not in old]
        assert all(w in vocab for w in new), (t, out)
    with pytest.raises(ValueError, match="vocabulary"):
        RuleInjector(vocabulary={"red", "cat"})
    with pytest.raises(TypeError, match="vocabulary"):
        RuleInjector(vocabulary="red cat")
