import pytest

from thinkrl.config import ConfigError
from thinkrl.registry import Registry


def test_registry_register_get_and_errors():
    reg = Registry("widget")

    @reg.register("b")
    def b():
        return "b"

    reg.register("a")(lambda: "a")
    assert reg.get("b") is b and reg.get("a")() == "a"
    assert reg.names() == ["a", "b"] and "a" in reg and "c" not in reg
    with pytest.raises(ConfigError, match="unknown widget 'c'; choose from: a, b"):
        reg.get("c")
    with pytest.raises(KeyError, match="widget 'a' is registered twice"):
        reg.register("a")(lambda: None)
