"""Build a TensorRT engine (plan) from the exported ONNX, with a manifest beside it. TensorRT 10.x and 11.x.

    python -m export.tensorrt --onnx model_fp16.onnx --output model.plan --fp16 [--min-batch 1]
        [--opt-batch 8] [--max-batch 32] [--workspace-gib 4] [--timing-cache PATH]
        [--hardware-compatible] [--version-compatible]

Precision, by TensorRT version (export/trt_build.py: build_plan):
  - the FP16 graph (model_fp16.onnx from `python -m export.onnx --fp16`: float32 I/O, FP32 head,
    verified against PyTorch) with --fp16, or an INT8 Q/DQ graph: STRONGLY TYPED on every 10.x and
    11.x release, so the graph's dtypes are the engine's (the FP32 head stays FP32).
  - the FP32 model.onnx with --fp16: only TensorRT 10.0-10.11 (e.g. JetPack 6), weakly typed +
    BuilderFlag.FP16; refused on 10.12+ and 11.x (exit 2) instead of silently building FP32
    (the failure rf-detr #1453 hit on TensorRT 11).
  - the FP32 model.onnx without --fp16: an FP32 reference engine with TF32 disabled.
After the build the engine inspector's per-layer dtypes are checked against what was asked for
(fp16 / int8 / fp32): a wrong engine fails loudly (exit 1). Writes OUTPUT (a pure TensorRT plan:
trtexec and Triton load it) and OUTPUT.json (runtime/trt_manifest.py), each atomically. Build on
the GPU that will run it; --hardware-compatible (Ampere+) needs a build GPU of compute capability 8.0+.

Exit codes: 0 ok; 1 build failed or wrong precision; 2 usage error, or no TensorRT / no CUDA GPU here.
NOTE: no machine this project is developed on has TensorRT. This file runs in the tests against
strict doubles of TensorRT 10.3, 10.13.3 and 11.1 built from NVIDIA's binding sources
(tests/trt_double.py) and a strict cuda-python double; a real build has never run.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from export.trt_build import (EnginePrecisionError, UsageError, build_plan, check_engine_precision, check_output_path,
                              check_profile, layer_precisions, load_timing_cache, onnx_facts, profile_shapes,
                              save_timing_cache, timing_cache_key, workspace_bytes)
from runtime.trt_manifest import AMPERE_PLUS_MIN_CC, this_platform
from runtime.fileio import atomic_write_bytes, sha256_file

NEED_TRT = ("error: TensorRT is not installed here (Python package `tensorrt`): install TensorRT 10.x or 11.x "
            "(pip install tensorrt, which fetches NVIDIA's wheels; on Jetson it comes with JetPack) and "
            "cuda-python of the driver's CUDA major (pip install 'probres[gpu-cu12]' or '[gpu-cu13]'), "
            "then build on the GPU that will run the engine")
NEED_GPU = "error: no CUDA GPU is visible ({why}): TensorRT builds engines on the GPU they will run on"


class BuildError(RuntimeError):
    """TensorRT failed to parse or build; the message carries TensorRT's own errors."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m export.tensorrt", description=__doc__.split("\n\n")[0])
    ap.add_argument("--onnx", required=True, help="model.onnx (FP32) or model_fp16.onnx (FP16, for --fp16)")
    ap.add_argument("--output", required=True, help="model.plan; the manifest goes to model.plan.json")
    ap.add_argument("--fp16", action="store_true", help="FP16 engine (see the module docstring)")
    ap.add_argument("--min-batch", type=int, default=1)
    ap.add_argument("--opt-batch", type=int, default=8, help="the batch size kernels are tuned for")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--workspace-gib", type=float, default=4.0)
    ap.add_argument("--timing-cache", default=None, help="loaded if it matches this GPU/TensorRT, then saved")
    ap.add_argument("--hardware-compatible", action="store_true", help="AMPERE_PLUS engine (runs on CC >= 8.0)")
    ap.add_argument("--version-compatible", action="store_true", help="runs on later TensorRT runtimes")
    return ap.parse_args(argv)


def import_tensorrt() -> tuple[Any, Any]:
    """(tensorrt, cudart); SystemExit(2) with a one-line message saying what to install."""
    from runtime.backends.base import BackendError
    from runtime.backends.tensorrt import import_cudart

    try:
        import tensorrt as trt
    except ImportError:
        print(NEED_TRT, file=sys.stderr)
        raise SystemExit(2) from None
    try:
        return trt, import_cudart()
    except BackendError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


@dataclass(frozen=True)
class BuildHost:
    """What the build machine is, each figure named for what it really is."""

    gpu_name: str
    compute_capability: str        # "8.7"
    cuda_driver_version: str       # the driver's CUDA (cudaDriverGetVersion), "12.6"
    cuda_python_version: str       # cuda-python's own version; its CUDA runtime is linked in statically


def build_host(cudart: Any) -> BuildHost:
    """The GPU and versions here; SystemExit(2) with one line without a usable GPU.

    The name and capability come from runtime.backends.tensorrt.gpu_identity, so the manifest holds exactly
    what the runtime will compare against.
    """
    from runtime.backends.base import BackendError
    from runtime.backends.tensorrt import cuda_check, cuda_python_version, driver_cuda_version, gpu_identity

    try:
        name, cc = gpu_identity(cudart)       # a specific message for cudaErrorInsufficientDriver
        if not cuda_check(cudart, cudart.cudaGetDeviceCount(), "cudaGetDeviceCount"):
            raise BackendError("cudaGetDeviceCount returned 0")
        driver = driver_cuda_version(cudart)
    except BackendError as e:
        msg = str(e)
        print(f"error: {msg}" if "cudaErrorInsufficientDriver" in msg else NEED_GPU.format(why=msg), file=sys.stderr)
        raise SystemExit(2) from None
    return BuildHost(name, cc, driver, cuda_python_version())


def build_engine(trt: Any, onnx_path: str | Path, plan: Any, facts: Any, shapes: tuple, cache: bytes, logger: Any,
                 *, workspace_gib: float = 4.0, hardware_compatible: bool = False,
                 version_compatible: bool = False, timing_cache_path: str | None = None) -> tuple[bytes, bytes]:
    """Parse the ONNX and build the serialized engine; returns (plan bytes, timing cache bytes).

    workspace_gib: the builder's workspace (workspace_bytes); hardware_compatible: AMPERE_PLUS;
    version_compatible: VERSION_COMPATIBLE; timing_cache_path: only named in errors (`cache` holds its bytes).

    Every failure TensorRT reports by a return value (False, None, -1) or an exception on bad shapes
    becomes a one-line BuildError.
    """
    builder = trt.Builder(logger)
    flags = 0
    if plan.network_flags == "strongly_typed":
        # 10.x: opt in to strong typing; the header value is 1, so the flags word is 2. In 11.x every
        # network is strongly typed and the flag is gone from the headers, so 11.x passes 0.
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise BuildError(f"{onnx_path}: the ONNX parser failed: {errors[:1000]}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes(workspace_gib))
    # DETAILED: the inspector then reports per-layer dtypes, which the precision check below reads.
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if plan.fp16_flag:
        config.set_flag(trt.BuilderFlag.FP16)          # 10.0-10.11 weak builds only: removed in 11.0
    if plan.disable_tf32:
        config.clear_flag(trt.BuilderFlag.TF32)        # FP32 reference: TF32 is on by default (NVIDIA/TensorRT #4492)
    if hardware_compatible:
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    if version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)

    profile = builder.create_optimization_profile()
    try:
        profile.set_shape(facts.input_name, *shapes)   # (min, opt, max) NCHW; kernels are tuned for opt
    except (ValueError, RuntimeError, TypeError) as e:
        raise BuildError(f"TensorRT refused the profile {shapes} for {facts.input_name!r}: {e}") from None
    if config.add_optimization_profile(profile) < 0:
        raise BuildError(f"TensorRT refused the optimization profile {shapes} (add_optimization_profile returned -1)")

    timing_cache = config.create_timing_cache(cache)   # b"" -> an empty cache; None on failure
    if timing_cache is None:
        raise BuildError(f"TensorRT could not read the timing cache {timing_cache_path or '(new)'}; delete it")
    if not config.set_timing_cache(timing_cache, False):   # ignore_mismatch=False, as Polygraphy does
        raise BuildError(f"TensorRT rejected the timing cache {timing_cache_path} (device mismatch); delete it")

    serialized = builder.build_serialized_network(network, config)   # None on failure (errors go to the logger)
    if serialized is None:
        raise BuildError("build_serialized_network failed (see the TensorRT errors above)")
    return bytes(serialized), bytes(config.get_timing_cache().serialize())


def inspect_engine(trt: Any, plan_bytes: bytes, facts: Any, opt_shape: tuple, logger: Any,
                   version_compatible: bool = False) -> str:
    """Engine inspector JSON with concrete shapes; also checks the engine's I/O names and dtypes."""
    runtime = trt.Runtime(logger)
    if version_compatible:
        # A version-compatible plan embeds its lean runtime, which IRuntime loads only when allowed
        # (setEngineHostCodeAllowed; Python: engine_host_code_allowed), "Version Compatibility", 10.x docs.
        runtime.engine_host_code_allowed = True
    engine = runtime.deserialize_cuda_engine(plan_bytes)
    if engine is None:
        raise BuildError("the freshly built plan does not deserialize")
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    if sorted(names) != sorted([facts.input_name, facts.output_name]):
        raise BuildError(f"engine I/O are {names}, expected {facts.input_name} and {facts.output_name}")
    for name in names:
        if engine.get_tensor_dtype(name) not in (trt.DataType.FLOAT, trt.DataType.HALF):
            raise BuildError(f"engine tensor {name} is {engine.get_tensor_dtype(name)}: the runtime needs float32 "
                             f"or float16 I/O (numpy has no type for BF16/FP8/FP4); export with float I/O")
    context = engine.create_execution_context()
    if not context.set_input_shape(facts.input_name, opt_shape):
        raise BuildError(f"the built engine refuses input shape {opt_shape} (set_input_shape returned False)")
    inspector = engine.create_engine_inspector()
    # Without a context whose input shapes are set, dynamic-shape layers print "N/A due to dynamic shapes".
    inspector.execution_context = context             # the 10.x and 11.x property name
    return inspector.get_engine_information(trt.LayerInformationFormat.JSON)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out = check_output_path(args.output)
        from runtime.outputs import OutputError, check_outputs
        from runtime.trt_manifest import manifest_path
        try:                                        # never write over what is read; writable before the work
            check_outputs([("--output", out), ("--output's manifest", manifest_path(out)),
                           ("--timing-cache", args.timing_cache)],
                          [("--onnx", args.onnx), ("--timing-cache", args.timing_cache)])
        except OutputError as e:
            raise UsageError(str(e)) from None
        check_profile(args.min_batch, args.opt_batch, args.max_batch)
        workspace_bytes(args.workspace_gib)
        facts = onnx_facts(args.onnx)
        check_profile(args.min_batch, args.opt_batch, args.max_batch, facts.batch_dim)
        from runtime.onnx_meta import OnnxMetaError, read_onnx_meta

        try:
            meta = read_onnx_meta(args.onnx)
        except OnnxMetaError as e:
            raise UsageError(f"--onnx {e}") from None
        if meta.contract.preprocess.size != facts.image_size:
            raise UsageError(f"--onnx {args.onnx}: input size {facts.image_size} != the contract's "
                             f"{meta.contract.preprocess.size}")
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    trt, cudart = import_tensorrt()
    host = build_host(cudart)
    here = this_platform()
    key = timing_cache_key(trt.__version__, host.gpu_name, host.compute_capability, args.hardware_compatible, here)
    try:
        if args.hardware_compatible and tuple(map(int, host.compute_capability.split("."))) < AMPERE_PLUS_MIN_CC:
            raise UsageError(f"--hardware-compatible builds an Ampere-and-newer engine, which needs a build GPU of "
                             f"compute capability 8.0 or later; {host.gpu_name} is {host.compute_capability}")
        plan = build_plan(trt.__version__, facts.precision, args.fp16, str(args.onnx))
        cache, cache_msg = load_timing_cache(args.timing_cache, key)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    shapes = profile_shapes(args.min_batch, args.opt_batch, args.max_batch, facts.image_size)
    print(f"TensorRT {trt.__version__} on {host.gpu_name} (CC {host.compute_capability}, driver CUDA "
          f"{host.cuda_driver_version}, cuda-python {host.cuda_python_version}): {plan.mode}ly typed, "
          f"{plan.precision.upper()} from {args.onnx} ({facts.precision} graph); profile {shapes}; {cache_msg}")

    logger = trt.Logger(trt.Logger.WARNING)
    t0 = time.time()
    try:
        plan_bytes, cache_out = build_engine(trt, args.onnx, plan, facts, shapes, cache, logger,
                                             workspace_gib=args.workspace_gib,
                                             hardware_compatible=args.hardware_compatible,
                                             version_compatible=args.version_compatible,
                                             timing_cache_path=args.timing_cache)
        info = inspect_engine(trt, plan_bytes, facts, shapes[1], logger, args.version_compatible)
        try:
            counts = layer_precisions(info)
        except ValueError:
            counts = None                                   # not JSON: fall back on the size check
        summary = check_engine_precision(plan.precision, counts, len(plan_bytes), facts.fp32_weight_bytes,
                                         args.version_compatible)
    except (BuildError, EnginePrecisionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"built in {time.time() - t0:.0f}s; {summary}")

    from runtime.trt_manifest import TrtManifest, write_manifest

    atomic_write_bytes(out, plan_bytes)
    manifest = TrtManifest(
        tensorrt_version=trt.__version__, gpu_name=host.gpu_name, compute_capability=host.compute_capability,
        precision=plan.precision, input_name=facts.input_name, output_name=facts.output_name,
        min_batch=args.min_batch, opt_batch=args.opt_batch, max_batch=args.max_batch, image_size=facts.image_size,
        onnx_sha256=sha256_file(args.onnx), plan_sha256=sha256_file(out), contract=meta.contract,
        hardware_compatible=args.hardware_compatible, version_compatible=args.version_compatible,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        cuda_driver_version=host.cuda_driver_version, cuda_python_version=host.cuda_python_version,
        os=here[0], arch=here[1], val_metrics=meta.val_metrics if isinstance(meta.val_metrics, dict) else None,
        input_dtype=facts.input_dtype, checkpoint_sha256=meta.checkpoint_sha256 or "")
    mpath = write_manifest(out, manifest)
    if args.timing_cache:
        save_timing_cache(args.timing_cache, cache_out, key)
    print(f"wrote {out} ({len(plan_bytes) / 1e6:.1f} MB) and {mpath}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
