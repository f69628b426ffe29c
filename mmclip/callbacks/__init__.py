"""Lightning callbacks: evaluation during fit (zero-shot, retrieval, linear probe)."""

from mmclip.callbacks.evaluation import LinearProbeEval, RetrievalEval, ZeroShotEval

__all__ = ["LinearProbeEval", "RetrievalEval", "ZeroShotEval"]
