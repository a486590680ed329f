"""Research code beside the library: the edit metrics and the eval runner, general ability,
MEMIT and AlphaEdit (``baselines``), ``ndb tune``, ``ndb bench``, synthetic keys and the
real-fact generator. The core library never imports it (tests/test_imports.py)."""
