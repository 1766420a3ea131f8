"""Every public name of structlora (its __all__, the public methods of PeftModel and of the configs) has its own
docstring, and that docstring names each argument (a config's docstring names each field it adds)."""

from __future__ import annotations

import dataclasses
import inspect
import re

import pytest

import structlora
from structlora.config import AdapterConfig

CLASSES_WITH_METHODS = ("PeftModel", *(name for name in structlora.__all__ if name.endswith("Config")))


def own_doc(obj) -> str:
    if isinstance(obj, type):
        doc = obj.__dict__.get("__doc__") or ""
        if dataclasses.is_dataclass(obj) and doc.startswith(f"{obj.__name__}("):
            return ""  # the signature dataclasses write when a class has no docstring
        return doc
    return inspect.getdoc(obj) if getattr(obj, "__doc__", None) else ""


def arguments(function) -> list[str]:
    skip = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return [name for name, parameter in inspect.signature(function).parameters.items()
            if name not in ("self", "cls") and not name.startswith("_") and parameter.kind not in skip]


def unnamed(doc: str, names: list[str]) -> list[str]:
    return [name for name in names if not re.search(rf"\b{re.escape(name)}\b", doc)]


def own_classes(cls: type) -> list[type]:
    """`cls` and the structlora mixins it is made of (PeftModel's AdapterInjection, AdapterIO), not public bases."""
    return [cls, *(base for base in cls.__mro__[1:]
                   if base.__module__.startswith("structlora.") and base.__name__ not in structlora.__all__)]


def public_members() -> list[tuple[str, object]]:
    members = []
    for class_name in CLASSES_WITH_METHODS:
        cls = getattr(structlora, class_name)
        seen = set()
        for attribute, value in (item for owner in own_classes(cls) for item in vars(owner).items()):
            if attribute.startswith("_") or attribute in seen:
                continue
            seen.add(attribute)
            if isinstance(value, property):
                members.append((f"{class_name}.{attribute}", value.fget))
            elif isinstance(value, (staticmethod, classmethod)):
                members.append((f"{class_name}.{attribute}", value.__func__))
            elif inspect.isfunction(value):
                members.append((f"{class_name}.{attribute}", value))
    return members


@pytest.mark.parametrize("name", structlora.__all__)
def test_every_public_name_has_a_docstring_naming_its_arguments(name):
    obj = getattr(structlora, name)
    doc = own_doc(obj)
    assert len(doc.strip()) >= 20, f"structlora.{name} has no docstring"
    if inspect.isfunction(obj):
        assert not unnamed(doc, arguments(obj)), f"structlora.{name}'s docstring does not name {unnamed(doc, arguments(obj))}"
    elif isinstance(obj, type) and not dataclasses.is_dataclass(obj) and "__init__" in vars(obj):
        missing = unnamed(doc, arguments(obj.__init__))  # the class docstring documents its constructor
        assert not missing, f"structlora.{name}'s docstring does not name the constructor's {missing}"


@pytest.mark.parametrize("name, function", public_members(), ids=[name for name, _ in public_members()])
def test_public_methods_have_docstrings_naming_their_arguments(name, function):
    doc = own_doc(function)
    assert len(doc.strip()) >= 20, f"{name} has no docstring"
    assert not unnamed(doc, arguments(function)), f"{name}'s docstring does not name {unnamed(doc, arguments(function))}"


@pytest.mark.parametrize("name", [n for n in structlora.__all__ if n.endswith("Config")])
def test_config_docstrings_name_every_field_they_add(name):
    cls = getattr(structlora, name)
    assert issubclass(cls, AdapterConfig)
    added = [field for field in cls.__dict__.get("__annotations__", {}) if field != "method"]
    assert added or cls is not AdapterConfig
    missing = unnamed(own_doc(cls), added)
    assert not missing, f"{name}'s docstring does not describe its fields {missing}"
