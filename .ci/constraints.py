#!/usr/bin/env python3
"""constraints.txt, the tested ranges of tuneserve's dependencies (standard library only).

    constraints.py floors constraints.txt           # the runtime section at its floors, as
                                                    # `name==floor` lines (make test-floor)
    constraints.py check constraints.txt pyproject.toml ...
                                                    # every pyproject dependency that
                                                    # constraints.txt ranges has the same range,
                                                    # and every runtime one is ranged there

Sections are the `# --- name` comment lines; the first (runtime) is the one floored.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    from pip._vendor import tomli as tomllib  # type: ignore[no-redef]

LINE = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*([^;#]*)")
# Local packages: never on an index, installed from the tree.
OURS = {"tuneserve", "tuneserve-client"}


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def specifiers(text: str) -> frozenset[str]:
    return frozenset(s.replace(" ", "") for s in text.split(",") if s.strip())


def upper_last(specifier: str) -> tuple[bool, str]:
    """Sort key: floors and pins before ceilings."""
    return (specifier.startswith("<"), specifier)


def parse(requirement: str) -> tuple[str, frozenset[str]]:
    match = LINE.match(requirement)
    if not match:
        raise ValueError(f"not a requirement: {requirement!r}")
    return normalized(match.group(1)), specifiers(match.group(3))


def sections(path: Path) -> list[dict[str, frozenset[str]]]:
    """Each section's ranges by package name."""
    found: list[dict[str, frozenset[str]]] = [{}]
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("# ---"):
            if found[-1]:
                found.append({})
            continue
        if not line or line.startswith("#"):
            continue
        name, spec = parse(line)
        found[-1][name] = spec
    return found


def floors(path: Path) -> list[str]:
    out = []
    for name, spec in sections(path)[0].items():
        lower = [s[2:] for s in spec if s.startswith(">=")]
        pinned = [s[2:] for s in spec if s.startswith("==")]
        if len(lower) + len(pinned) != 1:
            raise ValueError(f"{path}: {name} needs exactly one floor (>=) or pin (==): {spec}")
        out.append(f"{name}=={(lower or pinned)[0]}")
    return out


def check(constraints: Path, pyprojects: list[Path]) -> list[str]:
    found = sections(constraints)
    runtime = found[0]
    ranged = {name: spec for section in found for name, spec in section.items()}
    problems = []
    for pyproject in pyprojects:
        project = tomllib.loads(pyproject.read_text())["project"]
        groups = {"dependencies": project.get("dependencies", [])}
        for extra, requirements in project.get("optional-dependencies", {}).items():
            groups[f"optional-dependencies.{extra}"] = requirements
        for group, requirements in groups.items():
            for requirement in requirements:
                name, spec = parse(requirement)
                if name in OURS:
                    continue
                if name not in ranged:
                    if group == "dependencies":
                        problems.append(f"{pyproject}: {name} has no range in {constraints}")
                    continue
                if spec != ranged[name]:
                    problems.append(
                        f"{pyproject} [{group}]: {requirement!r} disagrees with {constraints}: "
                        f"{name}{','.join(sorted(ranged[name], key=upper_last))}"
                    )
                if group == "dependencies" and name not in runtime:
                    problems.append(
                        f"{pyproject}: runtime dependency {name} is outside the runtime "
                        f"section of {constraints}, so make test-floor does not test its floor"
                    )
    return problems


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "floors":
        print("\n".join(floors(Path(argv[1]))))
        return 0
    if len(argv) >= 3 and argv[0] == "check":
        problems = check(Path(argv[1]), [Path(p) for p in argv[2:]])
        for problem in problems:
            print(problem, file=sys.stderr)
        return 1 if problems else 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
