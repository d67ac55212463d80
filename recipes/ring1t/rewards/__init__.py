"""Reward functions for the Ring-1T stage recipes (verl custom reward functions, loaded by path).

``math_reward.py`` (math-verify equivalence), ``code_reward.py`` (tests in ``sandbox.py``, an
isolated process sandbox) and ``stem_reward.py`` (choice letters / numeric tolerance / text).
Each is used as ``reward.custom_reward_function.path=recipes/ring1t/rewards/<file>.py`` with
``reward.custom_reward_function.name=compute_score``.
"""
