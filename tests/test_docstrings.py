"""Every docstring example in the package runs (tiny models built on the spot); SKIP only where a server or
real models are needed, with the reason next to it."""

import doctest
import importlib
import pkgutil

import pytest

import costeer_processor

MODULES = sorted(m.name for m in pkgutil.walk_packages(costeer_processor.__path__, "costeer_processor.")
                 if not m.name.endswith("__main__"))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, name):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"


def test_the_package_has_runnable_examples():
    finder = doctest.DocTestFinder(exclude_empty=True)
    examples = sum(len(t.examples) for name in MODULES for t in finder.find(importlib.import_module(name), name))
    assert examples >= 40
