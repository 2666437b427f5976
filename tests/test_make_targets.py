"""The Makefile's benchmark targets start their scripts so that those find what they import: the test
harness (not installed) and the generated contracts. Each script is run through its own make target with
--help, which imports everything the script imports at its top (the benchmarks import their heavy
dependencies inside their functions)."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def bench_targets() -> list[tuple[str, str]]:
    """(target, script) for each benchmark script a make target runs (on a plain recipe line: `bench`'s
    conditional run of side_by_side.py is bench-peer's command)."""
    pairs: list[tuple[str, str]] = []
    target = ""
    for line in (ROOT / "Makefile").read_text().splitlines():
        if match := re.match(r"^([a-z-]+):", line):
            target = match.group(1)
        elif (
            line.startswith("\t")
            and not line.startswith("\t@")
            and (script := re.search(r"(bench/\w+\.py)", line))
        ):
            pairs.append((target, script.group(1)))
    return pairs


def test_every_benchmark_script_has_a_target() -> None:
    scripts = {path.relative_to(ROOT).as_posix() for path in (ROOT / "bench").glob("*.py")}
    targeted = {script for _, script in bench_targets()}
    assert scripts - {"bench/common.py"} <= targeted, scripts - targeted


@pytest.mark.parametrize(("target", "script"), bench_targets())
def test_a_benchmark_target_starts_its_script(target: str, script: str) -> None:
    recipe = subprocess.run(
        ["make", "--no-print-directory", "-n", target], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    line = next(line for line in recipe.splitlines() if script in line and "echo" not in line)
    command = line.split(script)[0] + script + " --help"
    started = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, f"make {target}: {command}\n{started.stderr[-2000:]}"
    assert "usage:" in started.stdout, started.stdout[-500:]
