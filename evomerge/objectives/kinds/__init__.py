"""Objective kinds, one module each, named after the kind; the registry imports every module here.

Adding a kind is one new module ``kinds/<name>.py`` that defines ``KIND``, a subclass of
:class:`evomerge.objectives.base.Objective` with ``kind: Literal["<name>"] = "<name>"`` and the kind's own
fields (the space validates its ``objectives:`` / ``report:`` entries with it, so a bad entry is one line
naming the field). It overrides what applies: ``is_bounded()`` (value known to lie in [0, 1]),
``supports_fidelity()`` (value is the mean of per-example scores in [0, 1]), ``fidelity_problem()``,
``portable()`` (file references made absolute for workers elsewhere), and ``evaluator(context)``, which
returns the object a worker builds once to score objectives of the kind (``prepare``, ``num_examples``,
``evaluate(model, objectives, window)``). Keep the module free of torch and other heavy imports at load
time: the CLI validates spaces without them. ``tests/test_objectives.py`` then wants a case for the kind.
"""
