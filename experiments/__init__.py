"""Experiment scripts: each runs as `python experiments/NAME.py` or `python -m experiments.NAME`.

They import gptjax and each other (`from experiments import finished_runs`); gptjax never imports them.
"""
