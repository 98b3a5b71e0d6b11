"""Evaluation: reconstruction metrics and the MME / GenEval / POPE / shapes harnesses.

Import modules explicitly (``from eval.x import Y``); ``eval`` is also a Python builtin.
"""
