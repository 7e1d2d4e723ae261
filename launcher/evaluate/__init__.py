"""Evaluation: the held-out loss (:mod:`.loss`), and generation scored with task metrics (:mod:`.generation`,
:mod:`.tasks`) during training and for a finished model (``python -m launcher.evaluate``, :mod:`.__main__`)."""
