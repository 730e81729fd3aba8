"""The two exceptions fusion_core raises on purpose."""


class FusionError(ValueError):
    """Bad input: the message names the input and what would be accepted."""


class Cancelled(RuntimeError):
    """The caller's ``should_stop`` asked the optimisation to stop."""
