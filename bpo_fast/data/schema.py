"""The preference-pair record: what the pair builder writes and the trainer reads.

One JSON object per line (JSONL)::

    {
      "id": "000123:t0:image_weakened:500",   # unique: source id, turn, strategy, level
      "image": "coco/000123.jpg",              # relative to --image-root (or null: text only)
      "prompt": [                              # the conversation up to the answer, LLaVA turns,
        {"from": "human", "value": "<image>\nWhat is on the table?"}   # ends with a human turn
      ],
      "chosen": "A red cup and a book.",       # the data set's own answer
      "rejected": "A blue cup and a plate.",   # bootstrapped from the model
      "strategy": "image_weakened",            # or "error_injection"
      "noise_step": 500,                       # diffusion step for image_weakened, else null
      "injector": null,                        # "llm" / "rules" for error_injection, else null
      "generation": {...},                     # generation settings (temperature, top_p, ...)
      "seed": 0
    }

LLaVA turns use ``from`` in {"human", "gpt"} (also accepted: "user"/"assistant") and the
``<image>`` placeholder in the text; :func:`turns_to_messages` turns them into Hugging Face chat
messages for ``processor.apply_chat_template``.
"""

IMAGE_PLACEHOLDER = "<image>"
STRATEGIES = ("image_weakened", "error_injection")
INJECTORS = ("llm", "rules")
REQUIRED_FIELDS = ("id", "image", "prompt", "chosen", "rejected", "strategy", "noise_step",
                   "injector")
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
          "system": "system"}


class SchemaError(ValueError):
    """A record that does not follow the pair schema (the message names the field)."""


def validate_turns(turns, what="prompt"):
    if not isinstance(turns, list) or not turns:
        raise SchemaError(f"{what}: expected a non-empty list of turns {{'from', 'value'}}")
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            raise SchemaError(f"{what}[{i}]: expected an object with 'from' and 'value'")
        if t["from"] not in _ROLES:
            raise SchemaError(f"{what}[{i}].from: expected one of {sorted(_ROLES)}, got {t['from']!r}")
        if not isinstance(t["value"], str):
            raise SchemaError(f"{what}[{i}].value: expected a string")


def validate_pair(rec):
    """Raise :class:`SchemaError` naming the field if ``rec`` is not a valid pair record."""
    if not isinstance(rec, dict):
        raise SchemaError(f"record: expected a JSON object, got {type(rec).__name__}")
    missing = [k for k in REQUIRED_FIELDS if k not in rec]
    if missing:
        raise SchemaError(f"record: missing field(s) {missing}")
    if not isinstance(rec["id"], str) or not rec["id"]:
        raise SchemaError("id: expected a non-empty string")
    if rec["image"] is not None and not isinstance(rec["image"], str):
        raise SchemaError("image: expected a path string or null")
    validate_turns(rec["prompt"])
    if _ROLES[rec["prompt"][-1]["from"]] != "user":
        raise SchemaError("prompt: the last turn must be a human turn (the question)")
    for k in ("chosen", "rejected"):
        if not isinstance(rec[k], str) or not rec[k].strip():
            raise SchemaError(f"{k}: expected a non-empty string")
    # build-pairs writes one of STRATEGIES; the official BPO data may carry other types, kept as
    # strategies of their own name (bpo_format)
    if not isinstance(rec["strategy"], str) or not rec["strategy"].strip():
        raise SchemaError(f"strategy: expected a name (build-pairs writes one of "
                          f"{list(STRATEGIES)}), got {rec['strategy']!r}")
    ns = rec["noise_step"]
    if ns is not None and (not isinstance(ns, int) or isinstance(ns, bool) or ns < 0):
        raise SchemaError("noise_step: expected a non-negative integer or null")
    if rec["injector"] is not None and rec["injector"] not in INJECTORS:
        raise SchemaError(f"injector: expected one of {list(INJECTORS)} or null, got {rec['injector']!r}")


def placeholder_mismatch(turns, n_images):
    """Why the ``<image>`` placeholders of ``turns`` disagree with a pair's ``n_images`` images
    (one placeholder per image), or None when they agree."""
    n = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in turns
            if isinstance(t, dict) and isinstance(t.get("value"), str))
    if n == n_images:
        return None
    return (f"prompt: {n} {IMAGE_PLACEHOLDER} placeholder(s) for {n_images} image(s) (one "
            f"{IMAGE_PLACEHOLDER} per image)")


def turns_to_messages(turns):
    """LLaVA turns -> HF chat messages; each ``<image>`` becomes a ``{"type": "image"}`` item
    (in front of the turn's text, LLaVA's layout)."""
    validate_turns(turns, "turns")
    messages = []
    for t in turns:
        role = _ROLES[t["from"]]
        text = t["value"]
        content = []
        if IMAGE_PLACEHOLDER in text:
            content.extend({"type": "image"} for _ in range(text.count(IMAGE_PLACEHOLDER)))
            text = text.replace(IMAGE_PLACEHOLDER, "").strip()
        content.append({"type": "text", "text": text})
        messages.append({"role": role, "content": content})
    return messages


def normalize_text(text):
    """Whitespace- and case-normalised text, to detect rejected == chosen."""
    return " ".join(str(text).lower().split())
