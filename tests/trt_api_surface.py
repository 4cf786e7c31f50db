"""The strict half of the TensorRT double: NVIDIA's per-release API surface as Python classes and enums.

    python -m pytest -q tests/test_trt_double.py      # shows that it bites

Used by tests/trt_double.py (which adds behaviour). Classes have __slots__ and only the release's
properties; methods check their arguments against the release's pybind11 overloads; enums have
only the release's members, with the header values.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

DATA = Path(__file__).parent / "data" / "trt_api"
RELEASES = {"10.3": ("v10.3.0.json", "10.3.0.30"), "10.13.3": ("v10.13.3.json", "10.13.3.9"),
            "11.1": ("v11.1.json", "11.1.0.10")}
CLASSES = ("Builder", "IBuilderConfig", "INetworkDefinition", "OnnxParser", "ParserError", "IOptimizationProfile",
           "ITimingCache", "IHostMemory", "Runtime", "ICudaEngine", "IExecutionContext", "EngineInspector", "Logger")
ENUMS = ("BuilderFlag", "NetworkDefinitionCreationFlag", "DataType", "HardwareCompatibilityLevel",
         "ProfilingVerbosity", "LayerInformationFormat", "MemoryPoolType", "TensorIOMode", "Severity")
# Constructors (NVIDIA Python API reference, 10.x and 11.x: Builder(logger), Runtime(logger),
# OnnxParser(network, logger), Logger(min_severity=Logger.WARNING)); other classes are made by TensorRT.
CTORS = {"Builder": [["logger"]], "Runtime": [["logger"]], "OnnxParser": [["network", "logger"]],
         "Logger": [["min_severity="]]}
PLAN_MAGIC = b"TRTDOUBLE\n"


# ------------------------------------------------------------------------------------ the data

def trim(full: dict[str, Any]) -> dict[str, Any]:
    """The part of one release's full API JSON the project touches (INetworkDefinition: properties only)."""
    classes = {c: full["classes"][c] for c in CLASSES if c in full["classes"]}
    classes["INetworkDefinition"] = {"methods": {}, "properties": classes["INetworkDefinition"]["properties"]}
    return {"classes": classes, "enums": {e: full["enums"][e] for e in ENUMS},
            "enum_values_from_headers": {e: v for e, v in full["enum_values_from_headers"].items() if e in ENUMS}}


def load_api(release: str) -> dict[str, Any]:
    return json.loads((DATA / RELEASES[release][0]).read_text())


# ------------------------------------------------------------------------------------ strict pieces

def check_call(where: str, overloads: list[list[str]], args: tuple, kwargs: dict) -> None:
    """TypeError unless (args, kwargs) fits one overload: names in order, 'name=' has a default."""
    for names in overloads:
        plain = [n.rstrip("=") for n in names]
        if len(args) > len(plain) or any(k not in plain[len(args):] for k in kwargs):
            continue
        if all(n.endswith("=") or i < len(args) or n in kwargs for i, n in enumerate(names)):
            return
    raise TypeError(f"{where}(): incompatible function arguments {args!r} {kwargs!r}; "
                    f"the binding accepts {overloads}")


class EnumMember:
    """One pybind11 enum value: compared by identity, int() gives its value."""

    __slots__ = ("_enum", "name", "value")

    def __init__(self, enum: str, name: str, value: int) -> None:
        object.__setattr__(self, "_enum", enum)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "value", value)

    def __setattr__(self, k: str, v: Any) -> None:
        raise AttributeError(f"{self!r} is read-only")

    def __int__(self) -> int:
        return self.value

    __index__ = __int__

    def __hash__(self) -> int:
        return hash((self._enum, self.name))

    def __repr__(self) -> str:
        return f"<{self._enum}.{self.name}: {self.value}>"


class _Frozen(type):
    """Metaclass of the double's classes: no new class attributes (trt.BuilderFlag.FP61 = ... fails)."""

    def __setattr__(cls, k: str, v: Any) -> None:
        raise AttributeError(f"type object '{cls.__name__}' has no attribute {k!r} to set")


def make_enum(name: str, members: list[str], values: dict[str, int]) -> type:
    ns: dict[str, Any] = {"__slots__": ()}
    for i, m in enumerate(members):
        ns[m] = EnumMember(name, m, values.get(m, 1000 + i))
    ns["__members__"] = {m: ns[m] for m in members}
    return _Frozen(name, (), ns)


class Obj:
    """Base of the double's classes: a state dict, release properties, checked methods."""

    __slots__ = ("_state", "_props")

    def _prop(self, name: str) -> Any:
        try:
            return self._props[name]
        except KeyError:
            raise AttributeError(f"double: {type(self).__name__}.{name} has no value in this scenario") from None


def make_class(name: str, spec: dict[str, Any], impls: dict[str, Callable], ctor: Callable | None,
               prop_types: dict[str, Callable[[Any], bool]]) -> type:
    """A class with the release's properties and methods; methods without an implementation raise.

    prop_types["Class.prop"](value) -> bool: the setter's type check (pybind11 raises TypeError on a wrong type).
    """
    ns: dict[str, Any] = {"__slots__": ()}

    def setter(self, v, p):
        ok = prop_types.get(f"{name}.{p}")
        if ok is not None and not ok(v):
            raise TypeError(f"{name}.{p}: incompatible value {v!r}")
        self._props[p] = v
    for p in spec["properties"]:
        ns[p] = property(lambda self, p=p: self._prop(p), lambda self, v, p=p: setter(self, v, p))
    for m, overloads in spec["methods"].items():
        if m in ("__del__", "__getitem__", "__len__", "__bool__", "__nonzero__", "__repr__", "__str__"):
            continue

        def method(self, *args, _m=m, _o=overloads, **kwargs):
            check_call(f"{name}.{_m}", _o, args, kwargs)
            impl = impls.get(f"{name}.{_m}")
            if impl is None:
                raise NotImplementedError(f"double: {name}.{_m} is real API but this double does not implement it")
            return impl(self, *args, **kwargs)
        method.__name__ = m
        ns[m] = method

    def new(cls, *args, **kwargs):
        if ctor is None:
            raise TypeError(f"tensorrt.{name}: No constructor defined!")
        check_call(name, CTORS[name], args, kwargs)
        obj = object.__new__(cls)
        object.__setattr__(obj, "_state", {})
        object.__setattr__(obj, "_props", {})
        ctor(obj, *args, **kwargs)
        return obj
    ns["__new__"] = new
    ns["__init__"] = lambda self, *a, **k: None
    return _Frozen(name, (Obj,), ns)


def instance(cls: type, state: dict | None = None, **props: Any) -> Any:
    """An object TensorRT itself would make (bypasses the constructor check)."""
    obj = object.__new__(cls)
    object.__setattr__(obj, "_state", dict(state or {}))
    object.__setattr__(obj, "_props", dict(props))
    return obj
