"""The packages' public names (`__all__` of fdrl, fdrl.models, fdrl.scorers) exist, and
`from fdrl import *` gives what the README's snippet imports."""

import importlib

import pytest


@pytest.mark.parametrize("name", ["fdrl", "fdrl.models", "fdrl.scorers"])
def test_public_names_exist(name):
    module = importlib.import_module(name)
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names {missing}, which {name} lacks"
    # Every public function and class the package imports is listed.
    public = {n for n, v in vars(module).items()
              if not n.startswith("_") and (getattr(v, "__module__", None) or "").startswith("fdrl.")}
    assert public <= set(module.__all__), sorted(public - set(module.__all__))


def test_star_import_gives_the_loss_and_the_registry():
    namespace = {}
    exec("from fdrl import *", namespace)
    assert callable(namespace["fdpg_loss"]) and "js" in namespace["DIVERGENCES"]
