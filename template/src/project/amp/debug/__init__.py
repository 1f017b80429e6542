"""The AMP debugger: the audit, the meters, the loop checks, the overflow locator, the numerics report and ``auto``
by measurement, one module each (amptpl's docs, docs/project.md, lists them). The kernel never needs it: a copy of
the core may leave it out (``amptpl add --minimal``).
"""
