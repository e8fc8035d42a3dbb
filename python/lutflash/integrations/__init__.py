"""Integrations with other libraries.

Each integration registers itself only once its library is imported, so that `import lutflash`
stays fast and never imports a library the user did not ask for. For Hugging Face transformers,
the trigger is `transformers.modeling_utils` (where `AttentionInterface` lives, imported before
any model is built); from then on `attn_implementation="lutflash"` is available.
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from collections.abc import Callable

__all__ = ["register_transformers"]

_TRANSFORMERS_TRIGGER = "transformers.modeling_utils"


def register_transformers() -> None:
    """Registers attn_implementation="lutflash" with transformers now (imports it). Idempotent.

    Importing lutflash.integrations.transformers is what registers; that keeps this safe when
    the trigger fires while that very module is being imported (it then finishes and registers).
    """
    importlib.import_module(".transformers", __name__)


class _RunAfterImport:
    """A sys.meta_path finder that finds nothing itself. When `module_name` is about to be
    imported, it lets the other finders find it, then runs `callback` once the module has
    executed, restores the module's own loader and removes itself from sys.meta_path."""

    def __init__(self, module_name: str, callback: Callable[[], None]):
        self.module_name = module_name
        self.callback = callback
        self._searching = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.module_name or self._searching:
            return None
        self._searching = True  # importlib.util.find_spec below walks sys.meta_path, us included
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._searching = False
        if spec is None or spec.loader is None:
            return None
        spec.loader = _CallbackLoader(spec.loader, self._done)
        return spec

    def _done(self, module) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        try:
            self.callback()
        except Exception as error:  # a failed registration must not break the user's import
            warnings.warn(f"lutflash: could not register with {self.module_name}: {error!r}",
                          RuntimeWarning, stacklevel=2)


class _CallbackLoader:
    """Wraps a loader: executes the module, puts the original loader back, calls `done`."""

    def __init__(self, loader, done: Callable):
        self.loader = loader
        self.done = done

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        module.__loader__ = self.loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self.loader
        self.done(module)

    def __getattr__(self, name):
        return getattr(self.loader, name)


def _install_transformers_hook() -> None:
    if _TRANSFORMERS_TRIGGER in sys.modules:
        register_transformers()
    elif importlib.util.find_spec("transformers") is not None:
        if not any(isinstance(finder, _RunAfterImport) for finder in sys.meta_path):
            sys.meta_path.insert(0, _RunAfterImport(_TRANSFORMERS_TRIGGER, register_transformers))


_install_transformers_hook()
