"""Executor backends, one module each; the port is ``runtime.executor``.

- ``process``: warm local Python processes, one pool per function version,
  with rlimits, a private working directory and a clean environment.
"""
