"""BUILD covers the code: every module is in a py_library glob, every test file has a py_test."""

import ast
import fnmatch
import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _build_text():
  with open(os.path.join(ROOT, "BUILD")) as f:
    return f.read()


def _glob_to_regex(pattern):
  # Bazel glob: ** spans directories, * stays inside one path segment.
  out = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*")
  return re.compile(out + "$")


def _library_patterns(text):
  return [p for call in re.findall(r"glob\((\[[^\]]*\])", text) for p in ast.literal_eval(call)]


def test_every_module_is_in_a_library():
  patterns = [_glob_to_regex(p) for p in _library_patterns(_build_text())]
  modules = [os.path.relpath(p, ROOT) for d in ("jaxgen", "configs", "benchmarks")
             for p in glob.glob(os.path.join(ROOT, d, "**", "*.py"), recursive=True)]
  uncovered = [m for m in modules if not any(p.match(m) for p in patterns)]
  assert not uncovered, f"add these to a py_library in BUILD: {uncovered}"


def test_every_test_file_has_a_py_test():
  text = _build_text()
  blocks = text.split("py_test(")[1:]
  names = {m for block in blocks for m in re.findall(r'"tests/(test_[^"]+)\.py"', block)}
  tests = {os.path.splitext(os.path.basename(p))[0]
           for p in glob.glob(os.path.join(ROOT, "tests", "test_*.py"))}
  assert tests - names == set(), f"add py_test targets to BUILD for {sorted(tests - names)}"
  assert names - tests == set(), f"BUILD names missing test files {sorted(names - tests)}"


def test_main_binary_declared():
  assert re.search(r'py_binary\(\s*name\s*=\s*"main"', _build_text())
  assert fnmatch.fnmatch("jaxgen/main.py", "jaxgen/*.py")
