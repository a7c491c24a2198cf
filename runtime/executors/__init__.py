"""Executor backends, one module each; the port is ``runtime.executor``.

- ``process``: warm local Python processes, one pool per function version,
  with rlimits, a private working directory and a clean environment; its
  ``Launcher`` starts them, and the sandboxes below are launchers.
- ``sandbox``: the process sandbox, each warm process under bubblewrap in
  namespaces and cgroups of its own, with a seccomp filter.
- ``container``: the docker sandbox, each warm process a container of the
  runtime image, optionally under gVisor.
"""
