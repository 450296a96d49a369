"""TranSend, the example SNS service: an image distillation proxy (Fox et al., SOSP '97).

:mod:`examples.transend.distill` holds its TACC workers (Pillow distiller and
contact-sheet aggregator).
"""

__all__ = ["distill"]
