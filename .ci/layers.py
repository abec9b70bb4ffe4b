#!/usr/bin/env python3
"""The layering check: fails on any import cycle among src/'s files and on any import of a higher layer.

Each top-level module of the crate has a layer (LAYERS below, the same table as the "# Layout" section of
src/lib.rs). A file may import from a lower layer, or from its own top-level module; within one module the
files must not import each other in a cycle. `crate::proto` (generated code) may be imported only by the
front doors, the transport and the server. Unit tests (`#[cfg(test)]` blocks, `tests.rs` files and `tests/` folders) are not
checked: they may reach up to build what they test.

Imports are read from `use` trees and from paths written in code (`crate::a::b::f()`), comments and
strings stripped. A path resolves to the deepest module file it names; an item a module re-exports with
`pub use` resolves to the module that defines it, and a module's `pub use` of its own children is its
public face, not a dependency.

    python3 .ci/layers.py [--graph]     # exit 1 and say why on any violation; --graph prints the edges
    python3 .ci/layers.py --self-test   # shows the check failing on an upward import and on a cycle
"""

import re
import sys
from collections import defaultdict
from pathlib import Path

LAYERS = {
    "domain": 0,
    "proto": 0,
    "pem": 0,
    "key": 1,
    "reload": 1,
    "secret_file": 1,
    "telemetry": 1,
    "rescue": 1,
    "config": 2,
    "store": 3,
    "identity": 4,
    "policy": 4,
    "scope": 4,
    "ban_check": 4,
    "ratelimit": 4,
    "issuer": 4,
    "transport": 4,
    "moderation": 5,
    "stack": 6,
    "door": 7,
    "app": 8,
    "server": 9,
}
PROTO_USERS = {"door", "transport", "server", "proto"}

SRC = Path(__file__).resolve().parent.parent / "src"


def module_of(path: Path) -> tuple:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "mod":
        parts.pop()
    return tuple(parts)


def strip(text: str) -> str:
    """Removes comments, string and char literals, and #[cfg(test)] items."""
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r'r#*"(?:.|\n)*?"#*', '""', text)
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', text)
    text = re.sub(r"'(?:\\.|[^'\\])'", "''", text)
    out, i = [], 0
    for match in re.finditer(r"#\[cfg\(test\)\]", text):
        if match.start() < i:
            continue
        out.append(text[i : match.start()])
        # Skip the attributed item: up to its `;` or its balanced `{ … }`.
        j = match.end()
        while j < len(text) and text[j] not in "{;":
            j += 1
        if j < len(text) and text[j] == "{":
            depth = 0
            while j < len(text):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                j += 1
                if depth == 0:
                    break
        else:
            j += 1
        i = j
    out.append(text[i:])
    return "".join(out)


def expand(tree: str) -> list:
    """`a::{b, c::{d, e}}` → ["a::b", "a::c::d", "a::c::e"]."""
    tree = re.sub(r"\s+", "", tree)
    if "{" not in tree:
        return [re.sub(r"as\w+$", "", tree)]
    prefix, rest = tree.split("{", 1)
    body = rest[: rest.rindex("}")]
    items, depth, start = [], 0, 0
    for k, ch in enumerate(body):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append(body[start:k])
            start = k + 1
    items.append(body[start:])
    return [p for item in items if item for p in expand(prefix + item)]


def self_test() -> int:
    """Copies src/ and breaks it twice: each break must be caught, and the copy untouched must pass."""
    import shutil
    import subprocess
    import tempfile

    breaks = {
        "an upward import": ("domain/mod.rs", "use crate::app::App;\n"),
        "a cycle": ("domain/room.rs", "use super::moderation::Ban;\n"),
    }
    failed = False
    for name, (file, line) in [("nothing", (None, None)), *breaks.items()]:
        with tempfile.TemporaryDirectory() as scratch:
            copy = Path(scratch) / "src"
            shutil.copytree(SRC, copy)
            if file:
                target = copy / file
                target.write_text(line + target.read_text())
            result = subprocess.run(
                [sys.executable, __file__, "--src", str(copy)], capture_output=True, text=True
            )
            caught = result.returncode != 0
            expected = file is not None
            verdict = "ok" if caught == expected else "WRONG"
            failed |= caught != expected
            summary = result.stdout.strip().splitlines()[-1].strip()
            print(f"{verdict}: with {name} the check {'fails' if caught else 'passes'}: {summary}")
    return 1 if failed else 0


def main() -> int:
    global SRC
    if "--self-test" in sys.argv:
        return self_test()
    if "--src" in sys.argv:
        SRC = Path(sys.argv[sys.argv.index("--src") + 1])
    files = {module_of(p): p for p in SRC.rglob("*.rs") if "tests" not in module_of(p)}
    files.pop(("main",), None)
    files.pop(("lib",), None)
    modules = set(files)
    texts = {m: strip(p.read_text()) for m, p in files.items()}

    # Where each re-exported item comes from: (module, item) → defining module.
    reexports = {}
    uses = {}
    for module, text in texts.items():
        found = []
        for vis, tree in re.findall(r"(pub(?:\([^)]*\))?\s+)?\buse\s+([^;]+);", text):
            for path in expand(tree):
                found.append((bool(vis), path))
        uses[module] = found

    def absolute(module: tuple, path: str) -> tuple:
        segments = [s for s in path.split("::") if s]
        if segments and segments[0] == "crate":
            return tuple(segments[1:])
        base = list(module)
        while segments and segments[0] in ("super", "self"):
            if segments.pop(0) == "super":
                base.pop()
        if segments and tuple(base + segments[:1]) in modules:
            return tuple(base + segments)
        return ()

    def resolve(path: tuple, seen=()) -> tuple:
        for cut in range(len(path), 0, -1):
            if path[:cut] in modules:
                module = path[:cut]
                if cut < len(path) and (module, path[cut]) in reexports and module not in seen:
                    return resolve(reexports[(module, path[cut])], seen + (module,))
                return module
        return ()

    for module, found in uses.items():
        for public, path in found:
            target = absolute(module, path)
            if public and target:
                reexports[(module, target[-1])] = target

    edges = defaultdict(set)
    for module, text in texts.items():
        paths = []
        for public, path in uses[module]:
            target = absolute(module, path)
            # A module's re-export of its own descendants is its public face, not a dependency.
            if public and target[: len(module)] == module and len(target) > len(module):
                continue
            paths.append(target)
        code = re.sub(r"(pub(?:\([^)]*\))?\s+)?\buse\s+[^;]+;", "", text)
        paths += [tuple(p.split("::")) for p in re.findall(r"\bcrate::(\w+(?:::\w+)*)", code)]
        for path in paths:
            target = resolve(path)
            if target and target != module:
                edges[module].add(target)

    problems = []
    for module, targets in sorted(edges.items()):
        top = module[0]
        for target in sorted(targets):
            if target[0] == "proto" and top not in PROTO_USERS:
                problems.append(f"{'::'.join(module)} imports crate::proto (only door, transport, server may)")
            if target[0] != top and LAYERS[target[0]] >= LAYERS[top]:
                problems.append(
                    f"{'::'.join(module)} (layer {LAYERS[top]}) imports {'::'.join(target)} "
                    f"(layer {LAYERS[target[0]]}): imports must go to a lower layer"
                )
    for top in {m[0] for m in modules} - set(LAYERS):
        problems.append(f"src/{top}: not in the layer table (.ci/layers.py and src/lib.rs)")

    # Tarjan's strongly connected components.
    index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]

    def connect(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                sccs.append(component)

    sys.setrecursionlimit(10_000)
    for v in sorted(modules):
        if v not in index:
            connect(v)
    for component in sccs:
        names = ", ".join(sorted("::".join(m) for m in component))
        problems.append(f"import cycle: {names}")

    if "--graph" in sys.argv:
        for module, targets in sorted(edges.items()):
            for target in sorted(targets):
                print(f"{'::'.join(module)} -> {'::'.join(target)}")
    levels = sorted({LAYERS[m[0]] for m in modules if m[0] in LAYERS})
    edge_count = sum(len(t) for t in edges.values())
    print(
        f"layers: {len(modules)} modules in {len(levels)} layers, {edge_count} imports, "
        f"{len(problems)} problem(s)"
    )
    for problem in problems:
        print(f"  {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
