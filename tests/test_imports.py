import importlib
import pkgutil

import thinkrl


def test_every_module_imports():
    names = [m.name for m in pkgutil.walk_packages(thinkrl.__path__, prefix="thinkrl.")]
    assert "thinkrl.trainer.rl" in names and "thinkrl.cli" in names
    for name in names:
        importlib.import_module(name)
