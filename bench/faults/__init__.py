"""Fault runs against the real service: each module is a script (``python -m bench.faults.NAME``
from the repo root) that starts what it needs, injects one fault, checks what survived and
prints a verdict (exit status 0 = PASS). tests/test_faults.py runs the same checks, smaller."""
