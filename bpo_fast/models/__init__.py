"""The model layer: one adapter per VLM family (``vlm``), the policy/reference forward
(``preference``), tiny test builds (``tiny``, ``tiny_vlm``).

Importing it checks transformers against the floor the layer needs
(:data:`bpo_fast.versions.TRANSFORMERS`): an older one would run every VLM without its images,
so it stops here, in one line naming the installed and the needed version.
"""

from bpo_fast.versions import TRANSFORMERS, require

require("transformers", TRANSFORMERS,
        "bpo-fast's model layer (VLM forwards with precomputed image features, "
        "mm_encoder_outputs)")
