"""``bpo-fast demo``: BPO end to end on the built-in shapes world.

- :mod:`bpo_fast.demo.world`: the shapes world (images, captions, QA, language prior, ground truth)
- :mod:`bpo_fast.demo.report`: plots and the Markdown report of a run
"""
