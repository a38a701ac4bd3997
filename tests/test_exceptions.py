"""The error contract: every error actclust raises derives from ActClustError, every warning it
emits is one of its public warning classes."""

import ast
import builtins
import inspect
from pathlib import Path

import pytest

import actclust
from actclust import exceptions

SRC = Path(actclust.__file__).parent
BUILTIN_ERRORS = {n for n in dir(builtins) if isinstance(getattr(builtins, n), type)
                  and issubclass(getattr(builtins, n), BaseException)} - {"NotImplementedError"}


def _calls(tree):
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)]


def _modules():
    return sorted(SRC.rglob("*.py"))


# no module raises a bare built-in exception (ValueError, RuntimeError...): callers catch ActClustError
@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_no_builtin_raise(path):
    bad = []
    tree = ast.parse(path.read_text())
    allowed = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "__getattr__"
               for n in ast.walk(f)}  # a module's __getattr__ must raise AttributeError
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None and id(node) not in allowed:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(exc, ast.Name) and exc.id in BUILTIN_ERRORS:
                bad.append(f"line {node.lineno}: raise {exc.id}")
    assert not bad, bad


# every warnings.warn names one of actclust's public warning classes
@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_warnings_have_public_categories(path):
    public = {n for n in exceptions.__all__ if n.endswith("Warning")}
    bad = []
    for call in _calls(ast.parse(path.read_text())):
        f = call.func
        if isinstance(f, ast.Attribute) and f.attr == "warn" and isinstance(f.value, ast.Name) and f.value.id == "warnings":
            category = call.args[1] if len(call.args) > 1 else next(
                (k.value for k in call.keywords if k.arg == "category"), None)
            name = category.id if isinstance(category, ast.Name) else ast.unparse(category) if category else None
            if name not in public and name != "category":  # 'category': re-emitting a caught warning as is
                bad.append(f"line {call.lineno}: warnings.warn(..., {name})")
    assert not bad, bad


# the classes themselves: every error an ActClustError and a built-in, every warning an ActClustWarning,
# all exported from the package
def test_classes_and_exports():
    for name in exceptions.__all__:
        cls = getattr(exceptions, name)
        assert getattr(actclust, name) is cls, name
        if name.endswith("Warning"):
            assert issubclass(cls, exceptions.ActClustWarning)
        else:
            assert issubclass(cls, exceptions.ActClustError)
            if cls is not exceptions.ActClustError:
                assert any(b.__module__ == "builtins" and b is not Exception for b in inspect.getmro(cls)[1:]), name


# the errors the issue found outside the contract now are inside it
def test_former_strays(model, data, fitted, tmp_path):
    from actclust import ActivationClustering, ActClustError

    with pytest.raises(ActClustError, match="Unknown layer 'nope'"):
        ActivationClustering(model, ["nope"], progress=False).fit(data[0])
    with pytest.raises(ActClustError, match="'n_clusters' parameter .* must be an int >= 2"):
        ActivationClustering(model, ["fc1"], n_clusters=1, progress=False).fit(data[0])
    with pytest.raises(ActClustError, match="y must hold integer class indices"):
        ActivationClustering(model, ["fc1"], progress=False).fit(data[0], data[1] + 0.5)
    fitted.save(tmp_path / "run")
    with pytest.raises(ActClustError, match="already exists") as info:
        fitted.save(tmp_path / "run")
    assert isinstance(info.value, FileExistsError)
