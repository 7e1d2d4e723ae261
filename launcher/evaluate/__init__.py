"""Evaluation: the held-out loss (:mod:`.loss`), and generation with task metrics (:mod:`.generation`,
:mod:`.tasks`), during training and for a finished model (``python -m launcher.evaluate``, :mod:`.__main__`)."""

from launcher.evaluate.loss import Evaluator, LossFn, eval_source

__all__ = ["Evaluator", "LossFn", "eval_source"]
