"""Runnable programs that use the library end to end: ``python -m fusionlib.examples.NAME``.

They sit above every other module (they may import the training loop, the
models, the data), so nothing in the library imports them. ``ddp_demo``:
one process against two on the same global batch (chapter 7, section 7.7).
"""
