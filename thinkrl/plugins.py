"""``plugins=[my_algo.py, mypackage.rl]``: the user's own components, imported before the config
is checked, so that what they register (an advantage estimator, a policy loss, a reward, a
task, a template, a sampler) can be named in the same config. See docs/extending.md."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from thinkrl.errors import ConfigError

_loaded: dict[str, object] = {}


def load_plugins(refs: list) -> None:
    """Import each plugin once: a path to a ``.py`` file, or an importable module name."""
    if not isinstance(refs, list) or not all(isinstance(r, str) and r for r in refs):
        raise ConfigError(f"plugins must be a list of .py files or module names, got {refs!r}")
    for ref in refs:
        if ref in _loaded:
            continue
        if ref.endswith(".py"):
            path = Path(ref).expanduser().resolve()
            if not path.is_file():
                raise ConfigError(f"plugins: file not found: {path}")
            name = f"thinkrl_plugin_{path.stem}_{abs(hash(str(path)))}"
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # dataclasses and pickling look a module up by name
            run = lambda: spec.loader.exec_module(module)  # noqa: E731
        else:
            run = lambda: importlib.import_module(ref)  # noqa: E731
        try:
            _loaded[ref] = run()
        except ModuleNotFoundError as e:
            raise ConfigError(f"plugins: cannot import '{ref}': {e}") from None
        except ConfigError:
            raise
        except Exception as e:
            raise ConfigError(f"plugins: importing '{ref}' failed: {type(e).__name__}: {e}") from None
