"""Every error and warning class of tinyllm. The CLI prints an error as one `error:` line and exits 2."""


class TinyLLMError(Exception):
    """Base class of every error tinyllm raises for bad input or a missing resource."""


class ModelError(TinyLLMError):
    """A model directory is missing, incomplete, or describes an architecture we do not run."""


class PullError(TinyLLMError):
    """The default model could not be downloaded, verified or converted."""


class ContextError(TinyLLMError):
    """A prompt does not fit in the model's context window."""


class NumericsError(TinyLLMError):
    """With numerics checking on: an op produced NaN or Inf, or a checkpoint holds them."""


class ScheduleError(TinyLLMError):
    """An op schedule names an unknown op, variant or preset, an unavailable variant, or a conflict."""


class ModelWarning(UserWarning):
    """A model loads, but something in its files looks wrong (unused tensors, NaN/Inf weights)."""


class ContextLimitWarning(UserWarning):
    """Generation stopped because the model's context window is full."""
