"""The C preprocessing kernel on aarch64 (NEON), on this x86 machine: cross-compiled, run under qemu-user.

    python -m benchmarks.cext_cross [--reps 5]      (`make test-aarch64` installs the tools and runs this)

Builds runtime/_cext/harness.c (the kernel without Python) with Debian's aarch64-linux-gnu-gcc,
checks it bit for bit against the numpy twin (runtime/preprocess.py) on COCO shapes, then
counts the guest instructions per image, NEON vs the generic C loop, with the qemu plugin
benchmarks/qemu_insn_count.c (built with the host compiler): a run of N images minus a run of
0 images, over N, so the harness's own start-up and image generation cancel out. Instructions,
not time: qemu's speed says nothing about a real Cortex-A78 (Jetson Orin). tests/test_cext.py
uses the same build and case helpers.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import numpy as np

CEXT = Path(__file__).resolve().parents[1] / "runtime" / "_cext"
PLUGIN_SRC = Path(__file__).resolve().parent / "qemu_insn_count.c"
# setup.py's flags for the extension (tests/test_cext.py checks they agree): -ffp-contract=off
# is what keeps x*scale + bias two roundings, as numpy.
CFLAGS = ["-O3", "-ffp-contract=off", "-fno-fast-math", "-std=c11"]
CROSS_CC = "aarch64-linux-gnu-gcc"
QEMU = ("qemu-aarch64", "qemu-aarch64-static")       # Debian's qemu-user, qemu-user-static
APT = "apt-get install gcc-aarch64-linux-gnu qemu-user"


def cross_tools() -> tuple[str, str] | str:
    """(cross compiler, qemu) paths, or a sentence naming what is missing."""
    cc, qemu = shutil.which(CROSS_CC), next((q for q in map(shutil.which, QEMU) if q), None)
    if cc and qemu:
        return cc, qemu
    missing = [n for n, p in ((CROSS_CC, cc), ("qemu-aarch64", qemu)) if not p]
    return f"aarch64 cross tools absent ({', '.join(missing)}): `make test-aarch64` installs them ({APT})"


def build_harness(cc: str, out: Path, static: bool = True) -> Path:
    """Compile the standalone kernel harness with `cc` (static: runs under qemu-user without a sysroot)."""
    cmd = [cc, *CFLAGS, *(["-static"] if static else []), "-o", str(out), str(CEXT / "harness.c")]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr}")
    return out


def write_case(path: Path, img: np.ndarray, expected: np.ndarray, scale, bias) -> Path:
    """One case file in harness.c's format: the image and the numpy twin's float32 (3, h, w) result."""
    H, W, _ = img.shape
    _, h, w = expected.shape
    with open(path, "wb") as f:
        f.write(b"FNC1" + struct.pack("<4i6d", H, W, h, w, *map(float, scale), *map(float, bias)))
        f.write(np.ascontiguousarray(img).tobytes())
        f.write(expected.astype("<f4").tobytes())
        f.write(expected.astype("<f2").tobytes())             # numpy's float16 rounding of it
    return path


def run_harness(cmd: list[str], cases: list[Path]) -> tuple[int, list[tuple[tuple[int, ...], set[str]]], str]:
    """Run the harness on case files: (exit status, [((H, W, h, w), kernels used)] per ok case, output)."""
    p = subprocess.run([*cmd, *map(str, cases)], capture_output=True, text=True, timeout=600)
    used = []
    for line in p.stdout.splitlines():
        m = re.match(r"ok (\d+) (\d+) (\d+) (\d+) (.*)", line)
        if m:
            used.append((tuple(int(g) for g in m.groups()[:4]), set(m.group(5).split())))
    return p.returncode, used, p.stdout + p.stderr


def count_insns(qemu: str, plugin: Path, harness: Path, hw: tuple[int, int], size: int, kernel: str, reps: int) -> tuple[float, str]:
    """Guest instructions per image for `kernel` ('auto' or 'generic') on an H x W image to size x size."""
    counts, used = [], "-"
    for n in (0, reps):
        p = subprocess.run([qemu, "-plugin", str(plugin), str(harness), "--bench", str(hw[0]), str(hw[1]), str(size), str(size), str(n)],
                           capture_output=True, text=True, check=True, env={**os.environ, "FN_KERNEL": kernel}, timeout=600)
        counts.append(int(re.search(r"insns (\d+)", p.stderr).group(1)))
        used = p.stdout.split()[-1] if n else used
    return (counts[1] - counts[0]) / reps, used


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5, help="images per counted run (default 5)")
    args = ap.parse_args(argv)
    tools = cross_tools()
    if isinstance(tools, str):
        ap.error(tools)
    cc, qemu = tools
    host_cc = shutil.which("cc") or shutil.which("gcc")
    if host_cc is None:
        ap.error("no host C compiler (cc, gcc) for the qemu plugin")
    from runtime.preprocess import normalize_coefficients, resize_normalize_into

    scale, bias = normalize_coefficients((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    shapes = [(480, 640), (640, 480), (427, 640), (640, 426), (612, 612), (375, 500),   # COCO's, to 448
              (720, 1280), (1080, 1920)]                                           # camera frames
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        harness = build_harness(cc, tmp / "fn_harness")
        plugin = tmp / "insn.so"
        subprocess.run([host_cc, "-shared", "-fPIC", "-O2", "-o", str(plugin), str(PLUGIN_SRC)], check=True)
        rng = np.random.default_rng(0)
        cases = []
        for i, (H, W) in enumerate(shapes):
            img = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
            twin = np.empty((3, 448, 448), np.float32)
            resize_normalize_into(img, twin, scale, bias, use_ext=False)
            cases.append(write_case(tmp / f"case{i}.bin", img, twin, scale, bias))
        rc, used, out = run_harness([qemu, str(harness)], cases)
        print(out.strip())
        if rc != 0:
            print("aarch64 kernel differs from the numpy twin")
            return 1
        print(f"\nqemu-aarch64 guest instructions per image (plugin count, {args.reps} images minus 0), to 448x448:")
        print("| source (W x H) | generic | NEON | ratio |\n|---|---|---|---|")
        for H, W in shapes:
            gen, _ = count_insns(qemu, plugin, harness, (H, W), 448, "generic", args.reps)
            neon, k = count_insns(qemu, plugin, harness, (H, W), 448, "auto", args.reps)
            print(f"| {W} x {H} | {gen / 1e6:.2f} M | {neon / 1e6:.2f} M ({k}) | {gen / neon:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
