"""Constraints for `make test-deps`: one end of the range pyproject.toml declares for the core's upstreams.

`python tools/deps.py lowest` pins transformers, peft and accelerate (and typer, whose vendored click the CLI
imports) to their declared lower bounds;
`python tools/deps.py newest` pins nothing, so pip takes the newest release within each range. Both keep torch at
constraints.txt's CPU build (a newer torch is a multi-GB CUDA download on Linux).
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RANGED = ("transformers", "peft", "accelerate", "typer")  # the upstreams whose interfaces dylora uses
ENDS = ("lowest", "newest")


def lower_bounds(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, str]:
    """{name: lower bound} of the dependencies in RANGED (the core's and the `cli` extra's), read from `>=X` in
    pyproject.toml."""
    project = tomllib.loads(pyproject.read_text())["project"]
    deps = [*project["dependencies"], *project["optional-dependencies"]["cli"]]
    bounds = {}
    for dep in deps:
        match = re.match(r"([A-Za-z0-9_.-]+)\s*(.*)", dep)
        name, spec = match[1].lower(), match[2]
        if name in RANGED:
            low = re.search(r">=\s*([0-9][^,\s]*)", spec)
            if low is None:
                raise ValueError(f"pyproject.toml: {dep!r} has no lower bound (>=X)")
            bounds[name] = low[1]
    missing = set(RANGED) - set(bounds)
    if missing:
        raise ValueError(f"pyproject.toml declares no {', '.join(sorted(missing))}")
    return bounds


def torch_pin(constraints: Path = ROOT / "constraints.txt") -> str:
    """The torch line of constraints.txt (`torch==X`)."""
    for line in constraints.read_text().splitlines():
        if re.match(r"torch\s*==", line):
            return line.strip()
    raise ValueError(f"{constraints} pins no torch")


def constraints(end: str) -> list[str]:
    """The constraint lines of one end of the range: `lowest` or `newest`."""
    if end not in ENDS:
        raise ValueError(f"end must be one of {', '.join(ENDS)}, got {end!r}")
    pins = [f"{name}=={low}" for name, low in lower_bounds().items()] if end == "lowest" else []
    return [torch_pin(), *pins]


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ENDS:
        print(f"usage: python tools/deps.py {{{','.join(ENDS)}}}", file=sys.stderr)
        return 2
    print("\n".join(constraints(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
