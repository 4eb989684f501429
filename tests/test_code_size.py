"""The house's size rule: no file under vinf_jax/ over 600 lines, no function (or method) over 80 lines.

A file that does several jobs, or a function that does a whole job in one body, is where a newcomer gets
lost (the pipeline module before its split was 1,182 lines with a 174-line ``generate``). The test parses
the package with ``ast`` and names every offender with its length, so the fix is obvious.
"""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "vinf_jax"
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80


def offenders(root: pathlib.Path = PACKAGE) -> list[str]:
  """``path: N lines`` for each long file and ``path:line name: N lines`` for each long function."""
  out = []
  for path in sorted(root.rglob("*.py")):
    rel = path.relative_to(root.parent)
    text = path.read_text(encoding="utf-8")
    n = len(text.splitlines())
    if n > MAX_FILE_LINES:
      out.append(f"{rel}: {n} lines (at most {MAX_FILE_LINES})")
    for node in ast.walk(ast.parse(text, filename=str(path))):
      if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        length = node.end_lineno - node.lineno + 1  # from `def` to its last line; decorators not counted
        if length > MAX_FUNCTION_LINES:
          out.append(f"{rel}:{node.lineno} {node.name}: {length} lines (at most {MAX_FUNCTION_LINES})")
  return out


def test_no_long_files_or_functions():
  found = offenders()
  assert not found, "too long:\n  " + "\n  ".join(found)


def test_the_check_finds_offenders(tmp_path):
  """The check itself: a long file and a long (nested) function are both named."""
  pkg = tmp_path / "vinf_jax"
  pkg.mkdir()
  body = "\n".join(f"  x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
  (pkg / "long_function.py").write_text(f"def outer():\n  def inner():\n  {body.replace(chr(10), chr(10) + '  ')}\n")
  (pkg / "long_file.py").write_text("x = 1\n" * (MAX_FILE_LINES + 1))
  (pkg / "fine.py").write_text("def f():\n  return 1\n")
  found = offenders(pkg)
  assert found == [
    f"vinf_jax/long_file.py: {MAX_FILE_LINES + 1} lines (at most {MAX_FILE_LINES})",
    f"vinf_jax/long_function.py:1 outer: {MAX_FUNCTION_LINES + 2} lines (at most {MAX_FUNCTION_LINES})",
    f"vinf_jax/long_function.py:2 inner: {MAX_FUNCTION_LINES + 1} lines (at most {MAX_FUNCTION_LINES})",
  ], found


def test_the_slow_tier_names_real_tests():
  """Every test tests/conftest.py marks slow exists (a renamed test would drop out of the list silently)."""
  from tests import conftest

  tests = PACKAGE.parent / "tests"
  for name in sorted(conftest.SLOW | set(conftest.SLOW_PARAMS)):
    file, func = name.split("::")
    assert f"def {func}(" in (tests / file).read_text(encoding="utf-8"), name
