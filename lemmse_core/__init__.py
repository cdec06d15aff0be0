"""lemmse_core: exact closed-form estimators for CNN inverse-problem solvers.

Companion package of *An analytic theory of convolutional neural network inverse
problems solvers* (Nguyen, Do, Pauwels, Weiss, 2026).
"""

__version__ = "0.1.0"
