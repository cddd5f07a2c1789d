#!/usr/bin/env python3
"""Finds modules of the agent and hub crates that import each other, directly or through
others: each crate's `crate::x` / `super::x` paths give its module graph (a submodule counts as
its own module), which must have no cycle. Prints the cycles and exits 1 if there are any."""
import os
import re
import sys

def modules(src):
    out = {}
    for root, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs"):
                continue
            path = os.path.join(root, f)
            rel = os.path.relpath(path, src)[:-3].split(os.sep)
            if rel[-1] == "mod":
                rel = rel[:-1]
            name = "::".join(rel) if rel != ["lib"] else "crate"
            out[name] = open(path).read()
    return out

def refs(name, text, names):
    deps = set()
    text = re.sub(r"//[^\n]*", "", text)
    # Test code may reach anywhere.
    text = text.split("#[cfg(test)]")[0]
    parent = name.rsplit("::", 1)[0] if "::" in name else "crate"
    for m in re.finditer(r"\b(crate|super)((?:::\w+)+)", text):
        base = [] if m.group(1) == "crate" else ([] if parent == "crate" else parent.split("::"))
        parts = base + m.group(2).strip(":").split("::")
        # The longest prefix that is a module.
        for k in range(len(parts), 0, -1):
            cand = "::".join(parts[:k])
            if cand in names:
                if cand != name:
                    deps.add(cand)
                break
        else:
            deps.add("crate" if not base else parent)
    if name == "crate":
        # The root names its modules without `crate::`.
        for n in names:
            if "::" not in n and n != "crate" and re.search(r"\b" + n + r"::", text):
                deps.add(n)
    deps.discard(name)
    return deps

def cycles(graph):
    found, stack, state = [], [], {}
    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                found.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[n] = 2
    for n in sorted(graph):
        if n not in state:
            visit(n)
    return found

bad = False
for crate in sys.argv[1:] or ["crates/agent/src", "crates/hub/src"]:
    mods = modules(crate)
    graph = {n: refs(n, t, mods) for n, t in mods.items()}
    for c in cycles(graph):
        bad = True
        print(f"{crate}: " + " -> ".join(c))
sys.exit(1 if bad else 0)
