"""Select, target and check an offline wheelhouse (`make wheelhouse`, `make check-wheelhouse`;
README "Offline install").

  requirements  print the pins of constraints-offline.txt a wheelhouse holds (profile, --exclude, --only, --kind)
  pip-args      print pip download's target flags for a cross build (--python-version, --implementation, --platform ...)
  check         every file a wheel pip accepts for the target, one version per project, every selected pin there,
                no torch / triton / nvidia-*, the project's own wheel there; prints files, sizes and the total
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.tags import Tag, compatible_tags, cpython_tags, sys_tags
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename

PROJECT = "megatron-bdlora"
# Never in a wheelhouse: they come with the cluster's torch build, and install-offline must not replace them.
FORBIDDEN = ("torch", "triton")
FORBIDDEN_PREFIX = "nvidia-"
# Legacy aliases of manylinux_2_{17,12,5}: older wheels carry only these names.
LEGACY = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}


def _names(text: str) -> set[str]:
    return {canonicalize_name(n) for n in text.replace(",", " ").split()}


def read_pins(path: Path) -> list[tuple[Requirement, set[str]]]:
    """(requirement, tags) per pin line; tags are the words of its trailing comment ("full", "sdist")."""
    pins = []
    for line in path.read_text().splitlines():
        spec, _, comment = line.partition("#")
        if spec.strip():
            pins.append((Requirement(spec.strip()), set(comment.split())))
    return pins


def select(args: argparse.Namespace) -> list[tuple[Requirement, set[str]]]:
    only, exclude = _names(args.only), _names(args.exclude)
    unknown = (only | exclude) - {canonicalize_name(r.name) for r, _ in read_pins(args.pins)}
    if unknown:
        sys.exit(f"--only/--exclude name(s) not in {args.pins}: {' '.join(sorted(unknown))}")
    chosen = []
    for req, tags in read_pins(args.pins):
        name = canonicalize_name(req.name)
        if name in exclude or (only and name not in only):
            continue
        if args.profile == "gpu-check" and "full" in tags and name not in only:  # named in --only: wanted anyway
            continue
        chosen.append((req, tags))
    return chosen


def platforms(platform: str) -> list[str]:
    """manylinux_2_28_x86_64 -> itself, every older manylinux_2_N of that arch and the legacy aliases, then 'any'."""
    if not platform.startswith("manylinux_2_"):
        return [platform, "any"]
    minor, _, arch = platform[len("manylinux_2_"):].partition("_")
    out = []
    for m in range(int(minor), 4, -1):
        out.append(f"manylinux_2_{m}_{arch}")
        if m in LEGACY:
            out.append(f"{LEGACY[m]}_{arch}")
    return out + ["any"]


def target(args: argparse.Namespace) -> tuple[str, str] | None:
    """(python version, platform) of a cross build, None for the running interpreter's own tags."""
    if not args.python_version and not args.platform:
        return None
    version = args.python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
    return version, args.platform or "manylinux_2_28_x86_64"


def supported_tags(args: argparse.Namespace) -> set[Tag]:
    t = target(args)
    if t is None:
        return set(sys_tags())
    version = tuple(int(x) for x in t[0].split("."))
    plats = [p for p in platforms(t[1]) if p != "any"]
    interp = "cp" + "".join(map(str, version))
    return set(cpython_tags(version, [interp], plats)) | set(compatible_tags(version, interp, plats))


def cmd_requirements(args: argparse.Namespace) -> int:
    for req, tags in select(args):
        if args.kind == "all" or (args.kind == "sdist") == ("sdist" in tags):
            print(req)
    return 0


def cmd_pip_args(args: argparse.Namespace) -> int:
    t = target(args)
    if t is not None:
        flags = ["--python-version", t[0], "--implementation", "cp"]
        for p in platforms(t[1]):
            flags += ["--platform", p]
        print(" ".join(flags))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    tags = supported_tags(args)
    t = target(args)
    where = "this interpreter" if t is None else f"CPython {t[0]} {t[1]}"
    errors, found, rows, total = [], {}, [], 0
    for f in sorted(p for p in args.wheelhouse.iterdir()):
        size = f.stat().st_size
        total += size
        rows.append((f.name, size))
        try:
            name, version, _, wheel_tags = parse_wheel_filename(f.name)
        except InvalidWheelFilename:
            errors.append(f"{f.name}: not a wheel")
            continue
        if not wheel_tags & tags:
            offered = ", ".join(map(str, sorted(wheel_tags, key=str)))
            errors.append(f"{f.name}: pip on {where} would not take it ({offered})")
        if name in FORBIDDEN or name.startswith(FORBIDDEN_PREFIX):
            errors.append(f"{f.name}: {name} must come with the cluster's torch, not from the wheelhouse")
        if name in found:
            errors.append(f"{f.name}: a second wheel of {name} (one of version {found[name]} is there)")
        found[name] = version
    for req, _ in select(args):
        name = canonicalize_name(req.name)
        if name not in found:
            errors.append(f"missing: {req}")
        elif found[name] not in req.specifier:
            errors.append(f"{name} {found[name]} is not the pinned {req}")
    if PROJECT not in found:
        errors.append(f"missing: the project's own wheel ({PROJECT})")
    width = max((len(n) for n, _ in rows), default=0)
    for n, size in rows:
        print(f"{n:<{width}}  {size / 2**20:8.2f} MB")
    print(f"{len(rows)} files, {total / 2**20:.1f} MB in {args.wheelhouse} (target: {where})")
    if args.max_mb.strip() and total > float(args.max_mb) * 2**20:
        errors.append(f"total {total / 2**20:.1f} MB is over the limit of {args.max_mb} MB")
    for e in errors:
        print("ERROR:", e, file=sys.stderr)
    print("OK" if not errors else f"{len(errors)} problem(s)")
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    first, rest = __doc__.split("\n\n", 1)  # the first paragraph (one line in --help), then the commands
    p = argparse.ArgumentParser(description=" ".join(first.split()), epilog=rest,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def selection(s: argparse.ArgumentParser) -> None:
        s.add_argument("--pins", type=Path, default=Path("constraints-offline.txt"), help="the pins file")
        s.add_argument("--profile", choices=("full", "gpu-check"), default="full",
                       help="gpu-check leaves out the pins tagged '# full' (embedded model, datasets, matplotlib)")
        s.add_argument("--exclude", default="", help="names to leave out (space or comma separated)")
        s.add_argument("--only", default="",
                       help="keep only these names (space or comma separated), even those the profile leaves out")

    def tgt(s: argparse.ArgumentParser) -> None:
        s.add_argument("--python-version", default="", help="e.g. 3.12; empty: this interpreter (unless --platform)")
        s.add_argument("--platform", default="",
                       help="newest platform tag of the target, e.g. manylinux_2_28_x86_64 (the default of a cross "
                       "build)")

    s = sub.add_parser("requirements", help="print the selected pins, one per line")
    selection(s)
    s.add_argument("--kind", choices=("all", "wheel", "sdist"), default="all",
                   help="wheel: pins downloaded as wheels; sdist: pins tagged '# sdist' (built with pip wheel)")
    s.set_defaults(fn=cmd_requirements)
    s = sub.add_parser("pip-args", help="print pip download's target flags (nothing for a native build)")
    tgt(s)
    s.set_defaults(fn=cmd_pip_args)
    s = sub.add_parser("check", help="check a wheelhouse folder against the target and the selected pins")
    s.add_argument("wheelhouse", type=Path)
    selection(s)
    tgt(s)
    s.add_argument("--max-mb", default="", help="fail if the folder holds more than this many MB (2**20 bytes)")
    s.set_defaults(fn=cmd_check)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
