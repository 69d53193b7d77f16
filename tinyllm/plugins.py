"""Plugins: modules a user names (`--plugin`, $TINYLLM_PLUGINS) whose imports register variants and presets.

A plugin is a dotted module name or a .py file; importing it runs its `@variant(...)` and
`register_preset(...)` lines, so its variants are listed, checked and scheduled like tinyllm's own.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path

from ops.registry import RegistryError

from .errors import ScheduleError, TinyLLMError


def load_plugins(modules) -> list[str]:
    """Import plugin modules (dotted names or .py file paths) so their variants and presets register."""
    loaded = []
    for spec in modules:
        spec = spec.strip()
        if not spec:
            continue
        try:
            if spec.endswith(".py") or os.sep in spec:
                path = Path(spec)
                if not path.is_file():
                    raise ScheduleError(f"plugin file {spec} does not exist")
                # one module per file, whatever its name: two plugins may both be called my_variants.py
                digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
                name = f"tinyllm_plugin_{path.stem}_{digest}"
                if name not in sys.modules:
                    module_spec = importlib.util.spec_from_file_location(name, path)
                    module = importlib.util.module_from_spec(module_spec)
                    sys.modules[name] = module
                    try:
                        module_spec.loader.exec_module(module)
                    except BaseException:
                        del sys.modules[name]
                        raise
            else:
                importlib.import_module(spec)
        except TinyLLMError:
            raise
        except RegistryError as e:
            raise ScheduleError(f"plugin {spec}: {e}") from None
        except Exception as e:  # a user's module may fail in any way: say which and why, in one line
            raise ScheduleError(f"cannot load plugin {spec}: {type(e).__name__}: {e}") from None
        loaded.append(spec)
    return loaded


def plugins_from_env() -> list[str]:
    return [m for m in os.environ.get("TINYLLM_PLUGINS", "").split(",") if m.strip()]
