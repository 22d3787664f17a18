"""The trainer, in parts: the run folder and its state (:mod:`training.run_state`), the data and
its skip accounting (:mod:`training.data`), distributed set-up and optimiser groups
(:mod:`training.setup`), the step (:mod:`training.step`) and the loop (:mod:`training.loop`).

``train.py`` is the command line over :func:`training.loop.run_training`.
"""
