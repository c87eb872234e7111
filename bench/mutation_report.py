"""The report of bench/mutation.sh: the mutation score per module, then every mutant not killed.

Reads what `mutmut run` left in mutants/ (the *.meta result files and the mutated sources) through
mutmut's own functions, so it is tied to the mutmut pinned in the `mutation` extra. A survivor is
printed as `module:line  name  [status]` followed by the lines the mutant changes; the line is the
first changed line in the original source. Run from the project root.
"""

from __future__ import annotations

import ast
import sys
from collections import Counter
from pathlib import Path

from mutmut.configuration import config
from mutmut.mutation.data import SourceFileMutationData
from mutmut.mutation.diff_apply import get_diff_for_mutant
from mutmut.stats import status_by_exit_code
from mutmut.utils.file_utils import walk_mutatable_files
from mutmut.utils.format_utils import orig_function_and_class_names_from_key

# what counts as killed in the score: a failing test, or a mutant that made the tests hang
KILLED = ("killed", "timeout")


def function_lines(tree: ast.Module, name: str, class_name: str | None) -> tuple[int, int] | None:
    """First and last line of a module-level function or a method, decorators included."""
    body: list[ast.stmt] = tree.body
    if class_name is not None:
        classes = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name]
        if not classes:
            return None
        body = classes[0].body
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name:
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            return start, node.end_lineno or node.lineno
    return None


def changed_lines(diff: str) -> list[str]:
    return [line for line in diff.splitlines() if line[:1] in "-+" and not line.startswith(("---", "+++"))]


def diff_offset(diff: str) -> int:
    """Line of the first change, counted from the first line of the diffed function text (1-based)."""
    offset = 0
    for line in diff.splitlines():
        if line.startswith("@@"):
            offset = int(line.split()[1].lstrip("-").split(",")[0])
        elif line.startswith(("---", "+++")):
            continue
        elif line[:1] in "-+":
            return offset
        else:
            offset += 1
    return 1


def source_line(src: list[str], tree: ast.Module, mutant: str, diff: str) -> int | None:
    """The changed line in the source: the line that reads like the first removed one, nearest to
    where the diff puts it (the same statement can occur twice in one function)."""
    name, class_name = orig_function_and_class_names_from_key(mutant)
    span = function_lines(tree, name, class_name) or (1, len(src))
    estimate = span[0] + diff_offset(diff) - 1
    removed = [c[1:].strip() for c in changed_lines(diff) if c.startswith("-") and c[1:].strip()]
    if not removed:
        return estimate
    matches = [n for n in range(span[0], span[1] + 1) if src[n - 1].strip() == removed[0]]
    return min(matches, key=lambda n: abs(n - estimate)) if matches else estimate


def main() -> int:
    if not Path("mutants").is_dir():
        print("mutation: no mutants/ directory: run bench/mutation.sh first", file=sys.stderr)
        return 2
    config()  # reads [tool.mutmut] from ./pyproject.toml
    rows = []
    survivors: list[tuple[str, int | None, str, str, list[str]]] = []
    totals: Counter[str] = Counter()
    for path in sorted(walk_mutatable_files()):
        data = SourceFileMutationData(path=path)
        data.load()
        statuses = {key: status_by_exit_code[code] for key, code in data.exit_code_by_key.items()}
        counts = Counter(statuses.values())
        totals.update(counts)
        rows.append((str(path), len(statuses), counts))
        src_text = Path(path).read_text()
        src, tree = src_text.splitlines(), ast.parse(src_text)
        for key in sorted(statuses, key=lambda k: (k.rpartition("__mutmut_")[0], int(k.rpartition("_")[2]))):
            status = statuses[key]
            if status in KILLED or status in ("caught by type check", "not checked"):
                continue
            try:
                diff = get_diff_for_mutant(key, path=path)
            except Exception as exc:  # noqa: BLE001 - a diff we cannot show must not hide the rest
                survivors.append((str(path), None, key, status, [f"? (no diff: {exc})"]))
                continue
            survivors.append((str(path), source_line(src, tree, key, diff), key, status, changed_lines(diff)))

    print()
    print(
        f"{'module':<28} {'mutants':>7} {'killed':>7} {'timeout':>7} {'survived':>8} {'no tests':>8} "
        f"{'other':>6} {'score':>7}"
    )

    def line(name: str, total: int, counts: Counter[str]) -> str:
        killed = counts["killed"] + counts["timeout"]
        other = total - killed - counts["survived"] - counts["no tests"]
        score = f"{100 * killed / total:.1f}%" if total else "-"
        return (
            f"{name:<28} {total:>7} {counts['killed']:>7} {counts['timeout']:>7} {counts['survived']:>8} "
            f"{counts['no tests']:>8} {other:>6} {score:>7}"
        )

    for name, total, counts in rows:
        print(line(name, total, counts))
    print(line("all", sum(t for _, t, _ in rows), totals))
    other = {k: v for k, v in totals.items() if k not in ("killed", "timeout", "survived", "no tests")}
    if other:
        print("other: " + ", ".join(f"{k} {v}" for k, v in sorted(other.items())))
    print(
        "score = (killed + timeout) / mutants; 'no tests': no selected test calls the function; "
        "'not checked': the run ended (MUTATION_MAX_S) before that mutant"
    )

    print()
    print(f"surviving mutants: {len(survivors)}")
    for path, lineno, key, status, changes in survivors:
        print(f"{path}:{lineno}  {key}  [{status}]")
        for change in changes:
            print(f"    {change.strip() if change.startswith('?') else change[0] + ' ' + change[1:].strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
