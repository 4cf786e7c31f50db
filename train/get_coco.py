"""Download COCO-2014 (train, val, annotations), verified, into the layout probres-train reads.

    python -m train.get_coco data/coco                    # then: probres-train --coco-root data/coco ...
    python -m train.get_coco data/coco --base-url http://mirror.example/coco --keep-archives

ROOT gets train2014/, val2014/ and annotations/ (instances_{train,val}2014.json among them),
the layout runtime/coco.py reads. For each archive, smallest first: download to ROOT/NAME.part,
resuming with an HTTP range request after a dropped connection (or on the next run), check its
size and sha256 against the published figures below, unzip into ROOT/.get_coco/ (zip CRCs
checked) and move the result into place, then delete the archive (unless --keep-archives).
ROOT/.get_coco/NAME.done lists what an archive put in place: a re-run with everything there
does nothing, not even a request. Before starting, it checks that ROOT's file system has room
for what is left to do. A ROOT/NAME.zip already there (copied in by hand) is verified and used.

Exit codes: 0 done; 2 nothing was started (bad ROOT, not enough space, a train2014/ or val2014/
that get_coco did not put there); 1 a download, verification or extraction failed (re-run to resume).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from runtime.fileio import atomic_write_text, sha256_file

BASE_URL = "http://images.cocodataset.org"
CHUNK = 1 << 20
RETRY_WAIT_S = 2.0        # x attempt number, between retries of a dropped transfer
SPACE_MARGIN = 256 << 20  # bytes kept free beyond the estimate


@dataclass(frozen=True)
class Archive:
    name: str          # file name, e.g. train2014.zip
    path: str          # its path under the base URL
    size: int          # bytes
    sha256: str
    top: str           # the one top-level folder every member sits in
    unpacked: int      # bytes once extracted: an estimate for the free-space check before starting


# Sizes and sha256: TensorFlow Datasets' tensorflow_datasets/url_checksums/coco2014.txt (the figures
# TFDS records and checks for these URLs); the sizes are also the Content-Length the official server
# sends. JPEGs do not compress, so the image archives unpack to about their own size; the annotation
# archive's six JSON files to about 0.85 GB. See docs/datasets-coco.md for the sources (and the md5s).
ARCHIVES: tuple[Archive, ...] = (
    Archive("annotations_trainval2014.zip", "annotations/annotations_trainval2014.zip", 252872794,
            "031296bbc80c45a1d1f76bf9a90ead27e94e99ec629208449507a4917a3bf009", "annotations", 844813048),
    Archive("val2014.zip", "zips/val2014.zip", 6645013297,
            "fe9be816052049c34717e077d9e34aa60814a55679f804cd043e3cbee3b9fde0", "val2014", 6645013297),
    Archive("train2014.zip", "zips/train2014.zip", 13510573713,
            "ede4087e640bddba550e090eae701092534b554b42b05ac33f0300b984b31775", "train2014", 13510573713),
)
# What probres-train needs (runtime/coco.py); each comes from one archive above.
REQUIRED = ("train2014", "val2014", "annotations/instances_train2014.json", "annotations/instances_val2014.json")


class GetCocoError(Exception):
    """A one-line failure; `code` is the exit status (2: nothing started, 1: a step failed)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def say(msg: str) -> None:
    print(f"get_coco: {msg}", file=sys.stderr, flush=True)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _state(root: Path) -> Path:
    return root / ".get_coco"


def is_done(root: Path, a: Archive) -> bool:
    """The archive was extracted by get_coco and every file it put in place is still there."""
    marker = _state(root) / f"{a.name}.done"
    if not marker.is_file():
        return False
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, OSError):
        return False
    return all((root / f).is_file() for f in files)


def _have(root: Path, a: Archive) -> int:
    """Bytes of this archive already on disk (a complete ROOT/NAME or a partial ROOT/NAME.part)."""
    for p in (root / a.name, root / f"{a.name}.part"):
        if p.is_file():
            return min(p.stat().st_size, a.size)
    return 0


def check_space(root: Path, todo: list[Archive], keep: bool) -> None:
    """Refuse before starting when ROOT's file system lacks room for the rest (archives go one at a time)."""
    need, later = 0, 0      # later: bytes that stay on disk after the archives done so far
    for a in todo:
        missing = a.size - _have(root, a)
        need = max(need, later + missing + a.unpacked)
        later += a.unpacked + (missing if keep else -_have(root, a))
    need += SPACE_MARGIN
    free = shutil.disk_usage(root).free
    if free < need:
        raise GetCocoError(f"{root}: {_gb(free)} free, {_gb(need)} needed for {', '.join(a.name for a in todo)} "
                           f"(downloads and extracted files); free some space or choose another ROOT", code=2)


def _preflight(root: Path, todo: list[Archive]) -> None:
    for a in todo:
        dest = root / a.top
        if a.top != "annotations" and dest.exists():
            raise GetCocoError(f"{dest} exists but get_coco did not complete it; move it away (or delete it) "
                               f"and re-run", code=2)


def download(url: str, part: Path, a: Archive, retries: int, timeout: float) -> None:
    """Fetch `url` into `part` until it holds a.size bytes, resuming with Range requests."""
    reason = ""
    for attempt in range(retries + 1):
        if attempt:
            say(f"{a.name}: transfer interrupted at {part.stat().st_size if part.exists() else 0} of {a.size} "
                f"bytes ({reason}); resuming (retry {attempt} of {retries})")
            time.sleep(RETRY_WAIT_S * attempt)
        have = part.stat().st_size if part.exists() else 0
        if have > a.size:         # longer than the published file: not ours to resume
            part.unlink()
            have = 0
        if have == a.size:
            return
        headers = {"User-Agent": "probres-get-coco"} | ({"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as r:
                if have and r.status == 206:
                    crange = r.headers.get("Content-Range", "")
                    if not crange.startswith(f"bytes {have}-") or not crange.endswith(f"/{a.size}"):
                        raise GetCocoError(f"{url}: the server answered a range request for byte {have} on with "
                                           f"'{crange}', not a part of the {a.size}-byte {a.name}")
                    mode = "ab"
                else:
                    if have:
                        say(f"{a.name}: the server does not resume transfers (HTTP {r.status} to a range "
                            f"request); starting again from byte 0")
                    length = r.headers.get("Content-Length")
                    if length is not None and int(length) != a.size:
                        raise GetCocoError(f"{url}: the server sends {length} bytes, but the published {a.name} "
                                           f"has {a.size}; not the COCO-2014 archive (check --base-url)")
                    mode, have = "wb", 0
                with open(part, mode) as f, tqdm(total=a.size, initial=have, unit="B", unit_scale=True,
                                                 desc=a.name, disable=not sys.stderr.isatty()) as bar:
                    while chunk := r.read(CHUNK):
                        if have + len(chunk) > a.size:
                            raise GetCocoError(f"{url}: the server sends more than the {a.size} bytes of {a.name}")
                        f.write(chunk)
                        have += len(chunk)
                        bar.update(len(chunk))
            if have == a.size:
                return
            reason = "the connection closed early"
        except urllib.error.HTTPError as e:
            if e.code < 500:
                raise GetCocoError(f"{url}: HTTP {e.code} {e.reason} (check --base-url)") from None
            reason = f"HTTP {e.code}"
        except (OSError, http.client.HTTPException) as e:     # URLError, resets, timeouts, IncompleteRead
            reason = str(getattr(e, "reason", None) or e) or type(e).__name__
    got = part.stat().st_size if part.exists() else 0
    raise GetCocoError(f"{a.name}: download failed after {retries} retries ({reason}) at {got} of {a.size} bytes; "
                       f"{part} is kept: re-run to resume")


def fetch(root: Path, a: Archive, base_url: str, retries: int, timeout: float) -> Path:
    """ROOT/NAME, downloaded (or found) and verified against the published size and sha256."""
    final, part = root / a.name, root / f"{a.name}.part"
    found = final.is_file()
    if not found:
        url = f"{base_url.rstrip('/')}/{a.path}"
        say(f"{a.name}: downloading {url} ({_gb(a.size)})" +
            (f", resuming at byte {part.stat().st_size}" if part.is_file() else ""))
        download(url, part, a, retries, timeout)
        os.replace(part, final)
    size = final.stat().st_size
    if size != a.size:
        raise GetCocoError(f"{final}: {size} bytes, but the published {a.name} has {a.size}; delete it and re-run")
    say(f"{a.name}: checking sha256 ({_gb(size)})")
    digest = sha256_file(final)
    if digest != a.sha256:
        if not found:
            final.unlink()
        fate = "removed it: re-run to download it again" if not found else "delete it and re-run to download it"
        raise GetCocoError(f"{final}: corrupted archive, sha256 {digest[:16]}... is not the published "
                           f"{a.sha256[:16]}...; {fate}")
    return final


def _member_ok(name: str, top: str) -> bool:
    p = PurePosixPath(name)
    return not p.is_absolute() and ".." not in p.parts and len(p.parts) >= 1 and p.parts[0] == top


def extract(root: Path, a: Archive, zpath: Path) -> None:
    """Unzip into ROOT/.get_coco/unpack-TOP, then move TOP into ROOT; record what was put in place."""
    tmp = _state(root) / f"unpack-{a.top}"
    shutil.rmtree(tmp, ignore_errors=True)        # ours, left by an interrupted run
    try:
        with zipfile.ZipFile(zpath) as z:
            infos = z.infolist()
            bad = next((i.filename for i in infos if not _member_ok(i.filename, a.top)), None)
            if bad is not None:
                raise GetCocoError(f"{zpath}: member {bad!r} is outside {a.top}/: not the COCO-2014 layout")
            need = sum(i.file_size for i in infos) + SPACE_MARGIN
            free = shutil.disk_usage(root).free
            if free < need:
                raise GetCocoError(f"{root}: {_gb(free)} free, {_gb(need)} needed to unpack {a.name}")
            say(f"{a.name}: extracting {len(infos)} entries")
            z.extractall(tmp)                      # reads every member: a bad CRC raises BadZipFile
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise GetCocoError(f"{zpath}: damaged archive ({e}); delete it and re-run") from None
    files = sorted(str(p.relative_to(tmp)) for p in (tmp / a.top).rglob("*") if p.is_file())
    dest = root / a.top
    if dest.exists():     # annotations/: the user's other files stay, ours replace theirs
        for f in files:
            (root / f).parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / f, root / f)
    else:
        os.replace(tmp / a.top, dest)
    atomic_write_text(_state(root) / f"{a.name}.done", json.dumps({"sha256": a.sha256, "files": files}) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)


def get_coco(root: Path, base_url: str = BASE_URL, keep_archives: bool = False, retries: int = 5,
             timeout: float = 60.0) -> int:
    """Bring ROOT to the complete COCO-2014 layout; returns how many archives were installed."""
    if root.exists() and not root.is_dir():
        raise GetCocoError(f"{root}: not a directory", code=2)
    if not base_url.startswith(("http://", "https://")):
        raise GetCocoError(f"--base-url {base_url}: not an http(s) URL", code=2)
    root.mkdir(parents=True, exist_ok=True)
    todo = [a for a in ARCHIVES if not is_done(root, a)]
    if not todo:
        say(f"{root} already holds COCO-2014 ({', '.join(REQUIRED)}): nothing to do")
        return 0
    _preflight(root, todo)
    check_space(root, todo, keep_archives)
    _state(root).mkdir(exist_ok=True)
    for a in todo:
        zpath = fetch(root, a, base_url, retries, timeout)
        extract(root, a, zpath)
        if not keep_archives:
            zpath.unlink()
        say(f"{a.name}: installed {root / a.top}")
    missing = [r for r in REQUIRED if not (root / r).exists()]
    if missing:
        raise GetCocoError(f"{root}: the archives did not provide {', '.join(missing)}")
    say(f"done: probres-train --coco-root {root} ...")
    return len(todo)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.get_coco", description=__doc__.split("\n\n")[0])
    p.add_argument("root", type=Path, metavar="ROOT", help="where train2014/, val2014/ and annotations/ go")
    p.add_argument("--base-url", default=BASE_URL,
                   help=f"server holding zips/ and annotations/ as the official one does (default {BASE_URL})")
    p.add_argument("--keep-archives", action="store_true", help="keep the .zip files after extraction")
    p.add_argument("--retries", type=int, default=5, help="resumed attempts per archive after a dropped transfer")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds a connect or read may stall (default 60)")
    args = p.parse_args(argv)
    try:
        get_coco(args.root, args.base_url, args.keep_archives, max(0, args.retries), args.timeout)
    except GetCocoError as e:
        print(f"get_coco: error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("get_coco: interrupted; re-run to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
