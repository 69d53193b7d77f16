"""tinyllm: a small, readable LLM inference engine in NumPy (see README.md)."""
from .api import ContextLimitWarning, Model, load
from .errors import ContextError, ModelError, ModelWarning, NumericsError, PullError, TinyLLMError
from .schedule import ScheduleError

__version__ = "0.1.0"
__all__ = ["load", "Model", "TinyLLMError", "ModelError", "PullError", "ContextError", "NumericsError",
           "ScheduleError", "ContextLimitWarning", "ModelWarning", "__version__"]
