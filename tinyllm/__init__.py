"""tinyllm: a small, readable LLM inference engine in NumPy (see README.md).

The public names load lazily (on first use), so that importing the command line does not import NumPy:
`--threads` must set the BLAS and Numba thread variables before NumPy loads its BLAS."""
from importlib import import_module

__version__ = "0.1.0"

# public name -> the submodule that defines it
_EXPORTS = {
    "load": "api", "Model": "api",
    "TinyLLMError": "errors", "ModelError": "errors", "PullError": "errors", "ContextError": "errors",
    "NumericsError": "errors", "ScheduleError": "errors", "ContextLimitWarning": "errors", "ModelWarning": "errors",
}
__all__ = ["load", "Model", "TinyLLMError", "ModelError", "PullError", "ContextError", "NumericsError",
           "ScheduleError", "ContextLimitWarning", "ModelWarning", "__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # found once; later lookups are plain attribute reads
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
