"""Build the C++ example client against the Arrow C++ libraries inside the pyarrow wheel.

Needs only a C++20 compiler (g++ >= 11 or clang++ >= 14) and ``pip install pyarrow``:
no Arrow or gRPC install, no CMake. Run with the Python that has pyarrow::

    python flight_client/cpp/build.py                 # -> flight_client/cpp/build/arrowengine_client
    python flight_client/cpp/build.py --out /tmp/aec  # elsewhere
    python flight_client/cpp/build.py --print         # only print the command

The wheel ships versioned library names (``libarrow_flight.so.2600``) and no unversioned
``.so`` links, so the command links them by exact file name (``-l:NAME``) and records the
wheel's folder as the binary's RPATH: it runs without LD_LIBRARY_PATH for as long as that
pyarrow install stays where it is (rebuild after upgrading or moving pyarrow).
"""
from __future__ import annotations

import argparse
import logging
import mmap
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger("arrowengine.cpp.build")

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "arrowengine_client.cc"
DEFAULT_OUT = HERE / "build" / "arrowengine_client"
COMPILERS = ("g++", "c++", "clang++")
# Status::ToString() returns std::string: its mangled name tells which libstdc++ ABI the wheel uses.
NEW_ABI_SYMBOL = b"_ZNK5arrow6Status8ToStringB5cxx11Ev"
OLD_ABI_SYMBOL = b"_ZNK5arrow6Status8ToStringEv"


def find_compiler() -> str | None:
    """The C++ compiler to use: $CXX if set, else the first of g++, c++, clang++ on PATH."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else list(COMPILERS)
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    return None


def wheel_abi(libarrow: Path) -> int:
    """1 if the wheel was built with the C++11 libstdc++ ABI (std::__cxx11), else 0."""
    with libarrow.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data.find(NEW_ABI_SYMBOL) >= 0:
            return 1
        if data.find(OLD_ABI_SYMBOL) >= 0:
            return 0
    raise RuntimeError(f"cannot tell the libstdc++ ABI of {libarrow}: neither {NEW_ABI_SYMBOL.decode()} nor "
                       f"{OLD_ABI_SYMBOL.decode()} is in it; is this an Arrow C++ library?")


def build_command(out: Path, compiler: str) -> list[str]:
    """The compiler command line that builds ``out`` from arrowengine_client.cc."""
    import pyarrow as pa

    include = pa.get_include()
    so_version = pa.cpp_build_info.so_version  # e.g. "2600"
    lib_dirs = [Path(d) for d in pa.get_library_dirs()]
    names = [f"libarrow_flight.so.{so_version}", f"libarrow.so.{so_version}"]
    lib_dir = next((d for d in lib_dirs if all((d / n).exists() for n in names)), None)
    if lib_dir is None:
        raise FileNotFoundError(f"{' and '.join(names)} are not in pyarrow's library folders {lib_dirs}; "
                                "this build needs a pyarrow wheel with Flight (pip install pyarrow)")
    abi = wheel_abi(lib_dir / names[1])
    return [compiler, "-std=c++20", "-O2", "-Wall", "-Wextra", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            "-isystem", include, str(SOURCE), "-o", str(out),
            f"-L{lib_dir}", *(f"-l:{n}" for n in names), f"-Wl,-rpath,{lib_dir}", "-pthread"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"binary to write (default {DEFAULT_OUT})")
    parser.add_argument("--print", action="store_true", help="print the build command, do not run it")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    compiler = find_compiler()
    if compiler is None:
        log.error("no C++ compiler found (looked for $CXX, %s); install g++ (e.g. apt-get install g++)",
                  ", ".join(COMPILERS))
        return 1
    command = build_command(args.out, compiler)
    if args.print:
        sys.stdout.write(shlex.join(command) + "\n")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log.info("%s", shlex.join(command))
    start = time.perf_counter()
    done = subprocess.run(command)
    if done.returncode != 0:
        log.error("the build failed (exit %d); the command is above", done.returncode)
        return done.returncode
    log.info("built %s in %.1f s", args.out, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
