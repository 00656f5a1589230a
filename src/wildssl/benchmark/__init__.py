"""``wildssl benchmark``: suites of pre-training runs at equal images seen, evaluated with the same probes.

- :mod:`wildssl.benchmark.suite`: the suite file (YAML) and what one scale resolves it to.
- :mod:`wildssl.benchmark.prepare`: the named data sets converted from the shared real data.
- :mod:`wildssl.benchmark.tiny`: the ``--scale tiny`` profile (seconds per suite, for the tests).
- :mod:`wildssl.benchmark.runner`: trains and evaluates every (entry, seed) and the random-init floor,
  recording each run as it finishes (a killed suite resumes).
- :mod:`wildssl.benchmark.table`: ``results.json``, ``table.md`` and the plots, from the recorded runs.
"""
