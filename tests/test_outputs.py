"""Every file a stage writes goes through ``weakcell.outputs`` (a temporary file and a rename): this test
lists the package's writers, so that a new bare write (``open(..., "w")``, ``.write_text``,
``.to_parquet``, ``np.save``, ``torch.save``, ``savefig``, a hand-rolled rename...) fails it. A writer
passes when it writes the temporary of an atomic helper (inside a lambda given to one, or a function
handed to one) or is one of the exceptions below, each with its reason."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

from weakcell.outputs import atomic_parquet, atomic_savefig, atomic_write, atomic_write_json

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "weakcell"
HELPERS = "outputs.py"  # the helpers themselves
ATOMIC = {
    "atomic_write",
    "atomic_write_text",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_parquet",
    "atomic_csv",
    "atomic_savefig",
}
# Methods and functions that write a file whatever they are called on.
WRITING_METHODS = {"write_text", "write_bytes", "to_parquet", "to_csv", "to_json", "savefig", "tofile"}
WRITING_FUNCTIONS = {
    ("np", "save"),
    ("np", "savez"),
    ("np", "savez_compressed"),
    ("torch", "save"),
    ("cv2", "imwrite"),
    ("json", "dump"),
    ("yaml", "safe_dump"),
    ("yaml", "dump"),
    ("os", "replace"),
    ("os", "rename"),
}
# (module, enclosing function, call) -> why it may write without the helpers.
ALLOWED = {
    ("submission.py", "publish", "os.replace"): (
        "moves files already written atomically into a staging folder into place; published.json, written "
        "last through the helpers, records the set (a partly moved set is refused by check_published)"
    ),
    ("pretrained.py", "download", "open"): (
        "streams a download into <file>.part while hashing it; the rename happens only once its sha256 "
        "matches, and a network fault must stay a FetchError, not an output fault"
    ),
    ("pretrained.py", "download", "replace"): "the rename of that verified download",
    ("external/stage.py", "append", "open"): (
        "appends one line per fetched image to the resumable fetch log (fetch-log.jsonl); rewriting the log "
        "whole per image would cost O(n^2) over 100k images, and a line cut short by a kill is skipped when "
        "the log is read back (FetchLog.records)"
    ),
    ("kagglekit/datasets.py", "_swap_in", "rename"): (
        "publishes a finished staging folder (its files written through the helpers) in place of the old "
        "one: a failed build leaves the old folder as it was"
    ),
}


@dataclass(frozen=True)
class Writer:
    module: str
    function: str
    call: str
    line: int


def _call_name(call: ast.Call) -> str | None:
    """``open``, ``os.replace``, ``write_text``... for a call that writes a file, else None."""
    func = call.func
    if isinstance(func, ast.Name):
        return "open" if func.id == "open" and _opens_for_writing(call, 1) else None
    if not isinstance(func, ast.Attribute):
        return None
    if isinstance(func.value, ast.Name) and (func.value.id, func.attr) in WRITING_FUNCTIONS:
        if func.attr in ("dump", "safe_dump") and len(call.args) < 2:
            return None  # yaml.safe_dump(data) returns text; only a stream argument writes
        return f"{func.value.id}.{func.attr}"
    if func.attr in WRITING_METHODS:
        return func.attr
    if func.attr == "open" and _opens_for_writing(call, 0):
        return "open"
    # Path.replace / Path.rename take one argument (str.replace takes two, DataFrame.replace a mapping)
    if func.attr in ("replace", "rename") and len(call.args) == 1 and not call.keywords:
        if not isinstance(call.args[0], ast.Dict | ast.Constant):
            return func.attr
    return None


def _opens_for_writing(call: ast.Call, mode_position: int) -> bool:
    mode = call.args[mode_position] if len(call.args) > mode_position else None
    mode = next((k.value for k in call.keywords if k.arg == "mode"), mode)
    return (
        isinstance(mode, ast.Constant) and isinstance(mode.value, str) and bool(set(mode.value) & set("wax+"))
    )


def _callbacks(tree: ast.AST) -> set[str]:
    """Names of functions handed to an atomic helper (``atomic_write(path, write)``, or through
    ``functools.partial``): they write the helper's temporary."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _helper(node):
            for arg in node.args:
                if isinstance(arg, ast.Call) and arg.args:  # partial(function, ...)
                    arg = arg.args[0]
                if isinstance(arg, ast.Name):
                    names.add(arg.id)
    return names


def _helper(call: ast.Call) -> bool:
    func = call.func
    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
    return name in ATOMIC


def writers(source: str, module: str) -> list[Writer]:
    """The bare writes of one module: writing calls neither inside an atomic helper's lambda nor in a
    function handed to one."""
    tree = ast.parse(source)
    callbacks = _callbacks(tree)
    found = []

    def visit(node: ast.AST, function: str, inside_helper: bool) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            function, inside_helper = node.name, inside_helper or node.name in callbacks
        if isinstance(node, ast.Call):
            name = _call_name(node)
            if name is not None and not inside_helper:
                found.append(Writer(module, function, name, node.lineno))
            if _helper(node):
                for arg in node.args:
                    visit(arg, function, inside_helper=isinstance(arg, ast.Lambda) or inside_helper)
                visit(node.func, function, inside_helper)
                for keyword in node.keywords:
                    visit(keyword, function, inside_helper)
                return
        for child in ast.iter_child_nodes(node):
            visit(child, function, inside_helper)

    visit(tree, "<module>", False)
    return found


def package_writers() -> list[Writer]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = str(path.relative_to(PACKAGE))
        if module != HELPERS:
            found += writers(path.read_text(), module)
    return found


def test_every_stage_writes_through_the_atomic_helpers():
    bare = [w for w in package_writers() if (w.module, w.function, w.call) not in ALLOWED]
    listing = "\n".join(f"  {w.module}:{w.line} {w.function}: {w.call}" for w in bare)
    assert not bare, f"bare writes (use weakcell.outputs' helpers, or allow one with a reason):\n{listing}"
    used = {(w.module, w.function, w.call) for w in package_writers()}
    assert set(ALLOWED) <= used, f"allowed writers that no longer exist: {set(ALLOWED) - used}"


@pytest.mark.parametrize(
    ("source", "bare"),
    [
        ('def f(p):\n    open(p, "w").write("x")', [("f", "open")]),
        ('def f(p):\n    p.open("wb")', [("f", "open")]),
        ('def f(p):\n    open(p).read()\n    p.open("rb")', []),
        (
            "def f(t, p):\n    t.to_parquet(p)\n    p.write_text('x')",
            [("f", "to_parquet"), ("f", "write_text")],
        ),
        ("def f(m, p):\n    torch.save(m, p)\n    np.save(p, m)", [("f", "torch.save"), ("f", "np.save")]),
        ("def f(fig, p):\n    fig.savefig(p)", [("f", "savefig")]),
        (
            "def f(tmp, p):\n    os.replace(tmp, p)\n    tmp.replace(p)",
            [("f", "os.replace"), ("f", "replace")],
        ),
        ("def f(s):\n    return s.replace('a', 'b')", []),
        ("def f(t, p):\n    atomic_write(p, lambda tmp: t.to_parquet(tmp))", []),
        ("def f(t, p):\n    def write(tmp):\n        t.to_csv(tmp)\n    atomic_write(p, write)", []),
        ("def w(tmp):\n    open(tmp, 'wb')\ndef f(p):\n    atomic_write(p, partial(w))", []),
        ("def f(d, p):\n    yaml.safe_dump(d, open(p, 'w'))", [("f", "yaml.safe_dump"), ("f", "open")]),
        ("def f(d):\n    return yaml.safe_dump(d)", []),
    ],
)
def test_the_listing_finds_bare_writes(source, bare):
    assert [(w.function, w.call) for w in writers(source, "m.py")] == bare


def test_the_helpers_leave_the_file_or_nothing(tmp_path):
    """A write that fails midway leaves neither a half file nor a temporary; the old file stays."""
    import pandas as pd
    from matplotlib.figure import Figure

    target = tmp_path / "table.parquet"
    atomic_parquet(target, pd.DataFrame({"a": [1, 2]}))
    old = target.read_bytes()

    def half_then_fail(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == old and sorted(p.name for p in tmp_path.iterdir()) == ["table.parquet"]
    atomic_write_json(tmp_path / "m.json", {"value": __import__("numpy").float64(0.5)})
    assert (tmp_path / "m.json").read_text() == '{\n  "value": 0.5\n}\n'
    atomic_savefig(tmp_path / "f.png", Figure(figsize=(1, 1)), dpi=10)
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
