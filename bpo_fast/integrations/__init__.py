"""bpo-fast inside other training libraries (a layer above ``models``/``train``, below ``cli``).

- :mod:`bpo_fast.integrations.trl`: TRL 1.16's ``DPOTrainer`` running bpo-fast's step
  (``from bpo_fast.integrations.trl import DPOTrainer``).
"""
