"""A strict test double of the `tensorrt` Python module, built per release from NVIDIA's binding surface.

    python tests/trt_double.py --trim ../shared/trt-api        # refresh tests/data/trt_api/ from the full data

The data (tests/data/trt_api/v*.json, trimmed from ../shared/trt-api: the classes and enums this
project touches, with every method, keyword and property the release has) says what each release
exposes; this file makes a module of it:
  - an attribute that the release's class lacks raises AttributeError, on read and on write
    (every class has __slots__; properties are the release's property names only);
  - a method call is checked against the release's pybind11 overloads: too many positional
    arguments, an unknown keyword or a missing required one raise TypeError;
  - enum members exist only where that release has them; values come from the headers (a
    member whose value the headers do not give, e.g. a deprecated one, gets a value >= 1000,
    so code that depends on it shows up);
  - classes TensorRT does not let Python construct (ICudaEngine, ...) raise TypeError when called.
Behaviour (what a call returns) comes from a `Scenario`, kept small: a serialized "plan" is JSON
that the double's Runtime reads back, so `python -m export.tensorrt` and the TensorRT backend run
end to end against the same double. Device work goes through a fake cudart (tests/cudart_double.py).
What the data cannot tell (return values, None on failure) follows NVIDIA's documentation, cited
where used. Constructors are not in the data: their signatures are NVIDIA's documented ones (CTORS).

Reuse (e.g. an INT8 Q/DQ export):
    trt, sc = install(monkeypatch, "11.1")              # or "10.3", "10.13.3"; Scenario(...) for failures
    cudart_double.install(monkeypatch, cudart_double.FakeCudart())
    export.tensorrt.main([...])                          # a graph with Q/DQ nodes builds as "int8" and the
                                                         # inspector answers with NVIDIA's QAT-INT8 sample
    [c[1] for c in sc.calls if c[0] == "build"]          # what was built: flags, precision, profile, ...
"""

from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from trt_api_surface import (CLASSES, CTORS, DATA, ENUMS, PLAN_MAGIC, RELEASES, EnumMember, check_call,  # noqa: F401
                             instance, load_api, make_class, make_enum, trim)

# ------------------------------------------------------------------------------------ behaviour

@dataclass
class Scenario:
    """What the double's calls return. Defaults: everything succeeds."""

    parse_errors: list[str] = field(default_factory=list)   # non-empty: parse_from_file returns False
    build_returns_none: bool = False        # build_serialized_network -> None (NVIDIA: None on failure)
    timing_cache_none: bool = False         # create_timing_cache -> None
    timing_cache_refused: bool = False      # set_timing_cache -> False
    profile_index: int = 0                  # add_optimization_profile's result (-1 on failure)
    input_shapes_ok: bool = True            # False: set_input_shape refuses every shape (returns False)
    inspector: str | None = None            # engine-inspector JSON; None: a real sample for the precision
    compute: Callable[[np.ndarray], np.ndarray] | None = None   # (N,3,S,S) -> (N,C) for execute_async_v3
    device: Any = None                      # the cudart double that owns device memory and streams
    calls: list[tuple] = field(default_factory=list)


def _onnx_graph(path: str) -> dict[str, Any]:
    """What a real parser learns from the file: I/O names, dtypes, the graph's compute precision."""
    import onnx

    m = onnx.load(path)
    inits = {i.name for i in m.graph.initializer}
    (inp,) = [v for v in m.graph.input if v.name not in inits]
    (out,) = m.graph.output
    kinds = {onnx.TensorProto.FLOAT: "FLOAT", onnx.TensorProto.FLOAT16: "HALF"}
    sizes = [(int(np.prod(t.dims)), t.data_type == onnx.TensorProto.FLOAT16) for t in m.graph.initializer]
    n16, n = sum(k for k, half in sizes if half), sum(k for k, _ in sizes)
    qdq = any(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in m.graph.node)
    precision = "int8" if qdq else ("fp16" if n and 2 * n16 >= n else "fp32")   # by weight volume
    return {"input": inp.name, "output": out.name, "in_dtype": kinds[inp.type.tensor_type.elem_type],
            "out_dtype": kinds[out.type.tensor_type.elem_type], "graph_precision": precision,
            "num_classes": out.type.tensor_type.shape.dim[1].dim_value}


def _unsigned_qdq(path: str) -> list[str]:
    """The real parser refuses UINT8 Q/DQ (onnx/onnx-tensorrt #884: TensorRT quantizes to signed INT8 only)."""
    import onnx

    m = onnx.load(path)
    u8 = {i.name for i in m.graph.initializer if i.data_type == onnx.TensorProto.UINT8}
    return [f"{n.name}: {n.op_type} with a UINT8 zero point is not supported; TensorRT supports INT8 only"
            for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2
            and n.input[2] in u8][:1]


def inspector_sample(precision: str, schema: int) -> str:
    """NVIDIA's real 10.x inspector JSON of a ResNet (tests/data/trt_inspector); schema 11 splits the
    'Format/Datatype' field into 'Format' and 'Datatype' (the key names of NVIDIA's 11.1 tools)."""
    d = json.loads((DATA.parent / "trt_inspector" / f"resnet_{'qat' if precision == 'int8' else precision}.json")
                   .read_text())
    if schema >= 11:
        for layer in d["Layers"]:
            for t in layer.get("Inputs", []) + layer.get("Outputs", []):
                fmt = t.pop("Format/Datatype")
                dt = next((w for w in fmt.split() if w.lower() in ("fp16", "fp32", "int8", "half", "float")), "")
                t["Format"], t["Datatype"] = " ".join(w for w in fmt.split() if w != dt), dt
    return json.dumps(d)


def _impls(mod: types.ModuleType, sc: Scenario) -> dict[str, Callable]:
    major = int(mod.__version__.split(".")[0])

    def member_of(enum: str, v: Any, where: str) -> EnumMember:
        e = getattr(mod, enum)
        if not isinstance(v, EnumMember) or e.__members__.get(v.name) is not v:
            raise TypeError(f"{where}: expected tensorrt.{enum}, got {v!r}")
        return v

    def create_network(self, flags=0):
        if not isinstance(flags, int) or isinstance(flags, bool):
            raise TypeError(f"Builder.create_network: flags must be an int, got {flags!r}")
        sc.calls.append(("create_network", flags))
        st = 1 << int(mod.NetworkDefinitionCreationFlag.STRONGLY_TYPED.value) if major == 10 else 0
        return instance(mod.INetworkDefinition, {"flags": flags, "strong": major >= 11 or bool(flags & st)})

    def parse_from_file(self, model):
        if not isinstance(model, str):
            raise TypeError(f"OnnxParser.parse_from_file: model must be a str path, got {type(model).__name__}")
        sc.calls.append(("parse_from_file", model))
        self._state["errors"] = list(sc.parse_errors) or _unsigned_qdq(model)
        self._props["num_errors"] = len(self._state["errors"])
        if self._state["errors"]:
            return False
        self._state["network"]._state["graph"] = _onnx_graph(model)
        return True

    def get_error(self, index):
        return instance(mod.ParserError, {"desc": self._state["errors"][index]})

    def onnx_parser_ctor(self, network, logger):
        self._state.update(network=network, errors=[])
        self._props["num_errors"] = 0

    def config():
        c = instance(mod.IBuilderConfig, {"flags": set(), "profiles": [], "cache": None})
        c._props.update(profiling_verbosity=mod.ProfilingVerbosity.LAYER_NAMES_ONLY,
                        hardware_compatibility_level=mod.HardwareCompatibilityLevel.NONE)
        return c

    def set_flag(self, flag):
        self._state["flags"].add(member_of("BuilderFlag", flag, "IBuilderConfig.set_flag").name)

    def clear_flag(self, flag):
        self._state["flags"].discard(member_of("BuilderFlag", flag, "IBuilderConfig.clear_flag").name)
        sc.calls.append(("clear_flag", flag.name))

    def set_pool(self, pool, pool_size):
        member_of("MemoryPoolType", pool, "IBuilderConfig.set_memory_pool_limit")
        sc.calls.append(("set_memory_pool_limit", pool.name, pool_size))

    def set_shape(self, input, min, opt, max):
        dims = [tuple(int(x) for x in d) for d in (min, opt, max)]
        if len({len(d) for d in dims}) != 1 or not all(a <= b <= c for a, b, c in zip(*dims)):
            raise ValueError("IOptimizationProfile.set_shape: min <= opt <= max does not hold")
        self._state[input] = dims

    def add_profile(self, profile):
        self._state["profiles"].append(profile)
        return sc.profile_index

    def create_timing_cache(self, serialized_timing_cache):
        sc.calls.append(("create_timing_cache", bytes(serialized_timing_cache)))
        return None if sc.timing_cache_none else instance(mod.ITimingCache, {"data": bytes(serialized_timing_cache)})

    def set_timing_cache(self, cache, ignore_mismatch):
        if not isinstance(cache, mod.ITimingCache):
            raise TypeError(f"IBuilderConfig.set_timing_cache: expected ITimingCache, got {cache!r}")
        sc.calls.append(("set_timing_cache", ignore_mismatch))
        self._state["cache"] = cache
        return not sc.timing_cache_refused

    def build(self, network, config):
        graph = network._state.get("graph")
        if graph is None:
            raise RuntimeError("double: build_serialized_network on a network nothing was parsed into")
        if sc.build_returns_none or not config._state["profiles"]:
            return None
        flags = config._state["flags"]
        strong = network._state["strong"]
        precision = graph["graph_precision"] if strong else ("fp16" if "FP16" in flags else "fp32")
        (profile,) = config._state["profiles"]
        plan = dict(graph, precision=precision, strong=strong, flags=sorted(flags),
                    network_flags=network._state["flags"], profile=profile._state[graph["input"]],
                    version_compatible="VERSION_COMPATIBLE" in flags,
                    hardware=config._props["hardware_compatibility_level"].name,
                    verbosity=config._props["profiling_verbosity"].name)
        sc.calls.append(("build", plan))
        return instance(mod.IHostMemory, {"data": PLAN_MAGIC + json.dumps(plan).encode()})

    def deserialize(self, serialized_engine):
        data = bytes(serialized_engine)
        if not data.startswith(PLAN_MAGIC):
            return None                                   # NVIDIA: None on failure, errors to the logger
        plan = json.loads(data[len(PLAN_MAGIC):])
        if plan["version_compatible"] and self._props.get("engine_host_code_allowed") is not True:
            # "Version Compatibility" (TensorRT 10.x docs): a version-compatible plan embeds host code
            # that IRuntime runs only when engine_host_code_allowed is set; else deserialization fails.
            sc.calls.append(("deserialize refused", "engine_host_code_allowed is False"))
            return None
        sc.calls.append(("deserialize", plan["precision"]))
        return instance(mod.ICudaEngine, {"plan": plan}, num_io_tensors=2)

    def tensor_name(self, index):
        return (self._state["plan"]["input"], self._state["plan"]["output"])[index]

    def tensor_dtype(self, name):
        p = self._state["plan"]
        return getattr(mod.DataType, p["in_dtype"] if name == p["input"] else p["out_dtype"])

    def tensor_mode(self, name):
        return mod.TensorIOMode.INPUT if name == self._state["plan"]["input"] else mod.TensorIOMode.OUTPUT

    def profile_shape(self, name, profile_index):
        if name != self._state["plan"]["input"] or profile_index != 0:
            raise RuntimeError(f"double: no profile {profile_index} shape for {name!r}")
        return [tuple(d) for d in self._state["plan"]["profile"]]

    def create_context(self, strategy=None, runtime_config=None):
        return instance(mod.IExecutionContext, {"engine": self, "shape": None, "addr": {}})

    def set_input_shape(self, name, shape):
        lo, _, hi = self._state["engine"]._state["plan"]["profile"]
        shape = tuple(int(x) for x in shape)
        if not sc.input_shapes_ok or name != self._state["engine"]._state["plan"]["input"] or len(shape) != len(lo) or \
                not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
            return False                                  # real: False, plus an error in the log
        self._state["shape"] = shape
        return True

    def tensor_shape(self, name):
        plan, shape = self._state["engine"]._state["plan"], self._state["shape"]
        return shape if name == plan["input"] else (shape[0], plan["num_classes"])

    def set_address(self, name, memory):
        if not isinstance(memory, int):
            raise TypeError(f"IExecutionContext.set_tensor_address: memory must be an int, got {type(memory).__name__}")
        self._state["addr"][name] = memory
        return True

    def execute(self, stream_handle):
        if not isinstance(stream_handle, int):
            raise TypeError(f"execute_async_v3: stream_handle must be an int, got {type(stream_handle).__name__}")
        plan, shape, addr = self._state["engine"]._state["plan"], self._state["shape"], dict(self._state["addr"])
        if shape is None or set(addr) != {plan["input"], plan["output"]}:
            return False
        dtypes = {"FLOAT": np.float32, "HALF": np.float16}
        out_shape = (shape[0], plan["num_classes"])

        def run():   # at stream time: reads device input, writes device output (cudart double memory)
            x = sc.device.view(addr[plan["input"]], shape, dtypes[plan["in_dtype"]])
            y = sc.device.view(addr[plan["output"]], out_shape, dtypes[plan["out_dtype"]])
            y[:] = sc.compute(x.astype(np.float32))
        sc.device.enqueue(stream_handle, run, "execute")
        sc.calls.append(("execute", shape[0]))
        return True

    def engine_info(self, format):
        member_of("LayerInformationFormat", format, "EngineInspector.get_engine_information")
        if sc.inspector is not None:
            return sc.inspector
        return inspector_sample(self._state["engine"]._state["plan"]["precision"], major)

    def cache_serialize(self):
        return instance(mod.IHostMemory, {"data": b"cache:" + self._state["data"]})

    return {
        "Builder.create_network": create_network,
        "Builder.create_builder_config": lambda self: config(),
        "Builder.create_optimization_profile": lambda self: instance(mod.IOptimizationProfile),
        "Builder.build_serialized_network": build,
        "OnnxParser.parse_from_file": parse_from_file, "OnnxParser.get_error": get_error,
        "ParserError.desc": lambda self: self._state["desc"],
        "IBuilderConfig.set_flag": set_flag, "IBuilderConfig.clear_flag": clear_flag,
        "IBuilderConfig.get_flag": lambda self, flag: member_of("BuilderFlag", flag, "get_flag").name
        in self._state["flags"],
        "IBuilderConfig.set_memory_pool_limit": set_pool,
        "IBuilderConfig.add_optimization_profile": add_profile,
        "IBuilderConfig.create_timing_cache": create_timing_cache,
        "IBuilderConfig.set_timing_cache": set_timing_cache,
        "IBuilderConfig.get_timing_cache": lambda self: self._state["cache"],
        "ITimingCache.serialize": cache_serialize,
        "IOptimizationProfile.set_shape": set_shape,
        "Runtime.deserialize_cuda_engine": deserialize,
        "ICudaEngine.get_tensor_name": tensor_name, "ICudaEngine.get_tensor_dtype": tensor_dtype,
        "ICudaEngine.get_tensor_mode": tensor_mode, "ICudaEngine.get_tensor_profile_shape": profile_shape,
        "ICudaEngine.create_execution_context": create_context,
        "ICudaEngine.create_engine_inspector": lambda self: instance(mod.EngineInspector, {"engine": self}),
        "IExecutionContext.set_input_shape": set_input_shape, "IExecutionContext.get_tensor_shape": tensor_shape,
        "IExecutionContext.set_tensor_address": set_address, "IExecutionContext.execute_async_v3": execute,
        "EngineInspector.get_engine_information": engine_info,
    }, {"OnnxParser": onnx_parser_ctor}


def nptype(mod: types.ModuleType) -> Callable:
    """tensorrt.nptype as tensorrt/__init__.py defines it: a TypeError for types numpy lacks (BF16, FP8, FP4...)."""
    def f(trt_type):
        table = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "INT64": np.int64,
                 "BOOL": np.bool_, "UINT8": np.uint8}
        if isinstance(trt_type, EnumMember) and trt_type.name in table:
            return table[trt_type.name]
        raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")
    return f


def make_tensorrt(release: str, scenario: Scenario | None = None,
                  edit: Callable[[dict[str, Any]], None] | None = None) -> tuple[types.ModuleType, Scenario]:
    """A fresh `tensorrt` double of `release` ("10.3", "10.13.3", "11.1"); `edit` may change the API data
    first (e.g. delete an enum member) to show that the double follows the data."""
    api = load_api(release)
    if edit is not None:
        edit(api)
    sc = scenario or Scenario()
    mod = types.ModuleType("tensorrt")
    mod.__version__ = RELEASES[release][1]
    for e, members in api["enums"].items():
        setattr(mod, e, make_enum(e, members, api["enum_values_from_headers"].get(e, {})))
    impls, ctors = _impls(mod, sc)

    def store(self, **kw):
        for k, v in kw.items():
            self._props[k] = v
    default_ctor = {"Builder": lambda self, logger: None, "Logger": lambda self, min_severity=None: None,
                    "Runtime": lambda self, logger: self._props.update(engine_host_code_allowed=False), **ctors}
    def enum_of(e):
        return lambda v: isinstance(v, EnumMember) and getattr(mod, e).__members__.get(v.name) is v
    # the types of the properties the project writes (NVIDIA Python API reference)
    prop_types = {"IBuilderConfig.profiling_verbosity": enum_of("ProfilingVerbosity"),
                  "IBuilderConfig.hardware_compatibility_level": enum_of("HardwareCompatibilityLevel"),
                  "Runtime.engine_host_code_allowed": lambda v: isinstance(v, bool),
                  "EngineInspector.execution_context": lambda v: isinstance(v, mod.IExecutionContext)}
    for c, spec in api["classes"].items():
        setattr(mod, c, make_class(c, spec, impls, default_ctor.get(c), prop_types))
    logger_cls = mod.Logger
    for m, v in mod.Severity.__members__.items():          # trt.Logger.WARNING: pybind11 export_values
        type.__setattr__(logger_cls, m, v)
    type.__setattr__(logger_cls, "Severity", mod.Severity)
    for c in ("IHostMemory",):                              # the buffer protocol, as bytes()
        type.__setattr__(getattr(mod, c), "__bytes__", lambda self: self._state["data"])
    mod.nptype = nptype(mod)
    return mod, sc


def install(monkeypatch: Any, release: str, scenario: Scenario | None = None, **kw: Any) -> tuple[types.ModuleType, Scenario]:
    """make_tensorrt, then put it in sys.modules as `tensorrt` for the test's duration."""
    mod, sc = make_tensorrt(release, scenario, **kw)
    monkeypatch.setitem(sys.modules, "tensorrt", mod)
    return mod, sc


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trim", required=True, help="the full data folder (../shared/trt-api)")
    src = Path(ap.parse_args().trim)
    DATA.mkdir(parents=True, exist_ok=True)
    for fname, _ in RELEASES.values():
        (DATA / fname).write_text(json.dumps(trim(json.loads((src / fname).read_text())), indent=1, sort_keys=True) + "\n")
    inspector = DATA.parent / "trt_inspector"
    inspector.mkdir(exist_ok=True)
    for f in sorted((src / "inspector-10x").glob("*.json")):
        (inspector / f.name).write_text(f.read_text())
    print(f"wrote {DATA} and {inspector}")
