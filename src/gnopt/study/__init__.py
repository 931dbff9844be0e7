"""``gnopt study``: a declared experiment run end to end, resumably, then analysed and reported.

* :mod:`gnopt.study.spec` — the experiment TOML schema, its validation, the plan of runs;
* :mod:`gnopt.study.runner` — the shared warm start, every run of the sweep, progress and ETA, resuming;
* :mod:`gnopt.study.analysis` — steps / tokens / passes to target, best settings, the S(B) fit and the
  critical batch size;
* :mod:`gnopt.study.report` — ``runs.csv``, ``runs.json``, ``study.json``, the PNG plots and ``report.md``;
* :mod:`gnopt.study.cli` — the ``gnopt study`` subcommand.

Importing this package is cheap (no torch import); the submodules are imported where they are used.
"""
