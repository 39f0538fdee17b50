#!/usr/bin/env python3
"""Checks the layering of `src/`: no import points up a tier, and no import cycle.

Tiers, top to bottom (an arrow may point down or sideways, never up):

    cli -> recipe -> {diffusion, text} -> {models, align, data} -> {peft, train} -> nn -> candle

`media`, `util`, `rng` and `error` are leaves: they may import only each other. Within a tier, `align`
imports neither `models` nor `data`, and `diffusion` and `text` do not import each other.

Every `.rs` file under `src/` is read with comments and string literals removed. Its references are
the paths of its `use` items (`use crate::a::{b, c::d}`, `use super::x`, `use child::y`, `pub use`) and
every `crate::…`, `super::…`, `self::…` or `postforge::…` path in its code. Each one is resolved to the
file of the deepest module it names, following `pub use` re-exports (so `crate::peft::ConvCfg` lands
in the file that defines `ConvCfg`, not in `peft/mod.rs`). `src/main.rs` and `src/cli/` form the binary
crate: there `crate::` is the binary's root and `postforge::` the library's.

Printed: upward arrows, file-level cycles (strongly connected files) and room-level cycles (between
top-level modules). The exit status is 1 if any is found, apart from the cycles in `KNOWN_CYCLES`,
which are listed but tolerated unless `--strict` is given. Standard library only.

Usage: python3 scripts/check_layers.py [--strict] [--edges] [SRC_DIR]
"""

import os
import re
import signal
import sys
from collections import defaultdict

TIERS = {
    "cli": 6,
    "recipe": 5,
    "diffusion": 4,
    "text": 4,
    "models": 3,
    "align": 3,
    "data": 3,
    "peft": 2,
    "train": 2,
    "nn": 1,
    "media": 0,
    "util": 0,
    "check": 0,
    "rng": 0,
    "error": 0,
}

# Sideways arrows (same tier) that are not allowed either: the alignment core stays free of model
# families and data readers, and the per-modality recipe rooms do not use each other.
FORBIDDEN = {
    ("align", "models"),
    ("align", "data"),
    ("diffusion", "text"),
    ("text", "diffusion"),
}

# File cycles that are known and tracked elsewhere: a cycle whose files all lie in one of these sets
# is reported but does not fail the check (unless --strict).
KNOWN_CYCLES = [
    # None: the adapter core's cycle (config/layer/methods/adalora) went with the adapter contract.
]


# ---------------------------------------------------------------------------------------------
# Reading Rust source
# ---------------------------------------------------------------------------------------------


def strip_comments_and_strings(src):
    """The source with comments, string and char literals replaced by spaces (newlines kept)."""
    out = []
    i, n = 0, len(src)

    def blank(s):
        return "".join("\n" if c == "\n" else " " for c in s)

    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
            out.append(blank(src[i:j]))
            i = j
        elif src.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if src.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif src.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append(blank(src[i:j]))
            i = j
        elif re.match(r'(?:b?r)(#*)"', src[i:i + 260]) and (i == 0 or not (src[i - 1].isalnum() or src[i - 1] == "_")):
            m = re.match(r'(?:b?r)(#*)"', src[i:])
            end = '"' + m.group(1)
            j = src.find(end, i + m.end())
            j = n if j < 0 else j + len(end)
            out.append(blank(src[i:j]))
            i = j
        elif c == '"' or (c == "b" and src.startswith('b"', i) and (i == 0 or not (src[i - 1].isalnum() or src[i - 1] == "_"))):
            j = i + (2 if c == "b" else 1)
            while j < n and src[j] != '"':
                j += 2 if src[j] == "\\" else 1
            j = min(n, j + 1)
            out.append(blank(src[i:j]))
            i = j
        elif c == "'":
            # A char literal ('a', '\n', '\u{1F600}', b'x'), or else a lifetime / label.
            m = re.match(r"'(?:\\(?:u\{[0-9a-fA-F]+\}|x[0-9a-fA-F]{2}|.)|[^\\'\n])'", src[i:])
            if m:
                out.append(blank(m.group(0)))
                i += m.end()
            else:
                out.append(c)
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def split_top(s, sep=","):
    """Splits `s` at `sep` outside braces."""
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def expand_use_tree(tree, prefix=()):
    """`a::{b, c::{d as e, *}}` -> [(segments, alias or None, is_glob)]."""
    tree = re.sub(r"\s+", " ", tree).strip()
    if tree.startswith("::"):
        tree = tree[2:]
    out = []
    brace = tree.find("{")
    if brace >= 0:
        head = tree[:brace].strip()
        head_segs = tuple(s.strip() for s in head.split("::") if s.strip())
        inner = tree[brace + 1: tree.rfind("}")]
        for part in split_top(inner):
            out.extend(expand_use_tree(part, prefix + head_segs))
        return out
    alias = None
    m = re.match(r"^(.*?)\s+as\s+(\w+)$", tree)
    if m:
        tree, alias = m.group(1), m.group(2)
    segs = tuple(s.strip() for s in tree.split("::") if s.strip())
    if segs and segs[-1] == "*":
        return [(prefix + segs[:-1], None, True)]
    if segs and segs[-1] == "self":
        segs = segs[:-1]
        if alias is None and (prefix + segs):
            alias = (prefix + segs)[-1]
    full = prefix + segs
    if alias is None and full:
        alias = full[-1]
    return [(full, alias, False)]


TOKEN = re.compile(
    r"(?P<mod>\bmod\s+(?P<modname>\w+)\s*\{)"
    r"|(?P<modecl>\bmod\s+(?P<modecl_name>\w+)\s*;)"
    r"|(?P<use>(?P<vis>\bpub(?:\s*\([^)]*\))?\s+)?\buse\s+(?P<usebody>[^;]*);)"
    r"|(?P<path>(?<![\w$])(?:crate|super|self|postforge)(?:\s*::\s*(?:\w+))+)"
    r"|(?P<open>\{)|(?P<close>\})"
)


class Crate:
    def __init__(self, name, root_file):
        self.name = name
        self.root_file = root_file
        self.modules = {}  # module path (tuple) -> file


class SourceFile:
    def __init__(self, rel, crate, modpath):
        self.rel = rel
        self.crate = crate
        self.modpath = modpath
        self.children = set()  # child modules declared in this file (mod x;)
        self.uses = []  # (module path at the use, segments, alias, glob, public, line)
        self.paths = []  # (module path at the reference, segments, line)
        self.reexports = {}  # name -> (crate, absolute segments)
        self.globs = []  # (crate, absolute module segments) of `pub use x::*`


def discover(src_dir):
    lib = Crate("lib", "lib.rs")
    binc = Crate("bin", "main.rs")
    files = {}
    for root, _, names in os.walk(src_dir):
        for name in names:
            if not name.endswith(".rs"):
                continue
            rel = os.path.relpath(os.path.join(root, name), src_dir).replace(os.sep, "/")
            parts = rel[:-3].split("/")
            if parts[-1] == "mod":
                parts = parts[:-1]
            if rel == "lib.rs":
                crate, modpath = lib, ()
            elif rel == "main.rs":
                crate, modpath = binc, ()
            elif parts[0] == "cli":
                crate, modpath = binc, tuple(parts)
            else:
                crate, modpath = lib, tuple(parts)
            crate.modules[modpath] = rel
            files[rel] = SourceFile(rel, crate, modpath)
    return lib, binc, files


def parse(src_dir, sf):
    with open(os.path.join(src_dir, sf.rel), encoding="utf-8") as f:
        code = strip_comments_and_strings(f.read())
    depth = 0
    stack = []  # (inline module name, depth of its body)
    for m in TOKEN.finditer(code):
        line = code.count("\n", 0, m.start()) + 1
        here = sf.modpath + tuple(name for name, _ in stack)
        if m.group("mod"):
            depth += 1
            stack.append((m.group("modname"), depth))
        elif m.group("modecl"):
            if not stack:
                sf.children.add(m.group("modecl_name"))
        elif m.group("use"):
            public = bool(m.group("vis")) and not stack
            for segs, alias, glob in expand_use_tree(m.group("usebody")):
                sf.uses.append((here, segs, alias, glob, public, line))
        elif m.group("path"):
            segs = tuple(s.strip() for s in m.group("path").split("::"))
            sf.paths.append((here, segs, line))
        elif m.group("open"):
            depth += 1
        elif m.group("close"):
            if stack and stack[-1][1] == depth:
                stack.pop()
            depth -= 1


def absolute(sf, here, segs, lib, use_stmt):
    """(crate, absolute segments) of a path written in `sf` inside module `here`, or None
    (an external crate)."""
    if not segs:
        return None
    head = segs[0]
    if head == "crate":
        return sf.crate, segs[1:]
    if head == "postforge":
        return lib, segs[1:]
    if head in ("super", "self"):
        mod = list(here)
        i = 0
        while i < len(segs) and segs[i] in ("super", "self"):
            if segs[i] == "super":
                if not mod:
                    return None
                mod.pop()
            i += 1
        return sf.crate, tuple(mod) + segs[i:]
    if use_stmt and here == sf.modpath and head in sf.children:
        return sf.crate, sf.modpath + segs
    if use_stmt and (sf.modpath + (head,)) in sf.crate.modules and here == sf.modpath:
        return sf.crate, sf.modpath + segs
    return None


def resolve(files, crate, segs, seen=0):
    """The file of the deepest module `segs` names in `crate`, through `pub use` re-exports."""
    mod = ()
    i = 0
    while i < len(segs) and (mod + (segs[i],)) in crate.modules:
        mod += (segs[i],)
        i += 1
    rel = crate.modules.get(mod)
    if rel is None:
        return None
    if i < len(segs) and seen < 16:
        sf = files[rel]
        target = sf.reexports.get(segs[i])
        if target is not None:
            deeper = resolve(files, target[0], target[1] + segs[i + 1:], seen + 1)
            if deeper is not None:
                return deeper
        for gcrate, gsegs in sf.globs:
            deeper = resolve(files, gcrate, gsegs + segs[i:], seen + 1)
            if deeper is not None and deeper != crate.modules.get(gsegs):
                return deeper
    return rel


def room(rel):
    if rel in ("main.rs",) or rel.startswith("cli/"):
        return "cli"
    if rel == "lib.rs":
        return None
    head = rel.split("/")[0]
    return head[:-3] if head.endswith(".rs") else head


def reasons(refs):
    """`line: path` for each distinct path by which one file refers to another."""
    seen, out = set(), []
    for line, path in sorted(refs):
        if path not in seen:
            seen.add(path)
            out.append(f"{line}: {path}")
    return "; ".join(out)


def tarjan(nodes, edges):
    index, low, on, stack, out = {}, {}, set(), [], []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w == v:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def main(argv):
    strict = "--strict" in argv
    show_edges = "--edges" in argv
    args = [a for a in argv if not a.startswith("--")]
    here = os.path.dirname(os.path.abspath(__file__))
    src_dir = args[0] if args else os.path.join(here, "..", "src")
    lib, binc, files = discover(src_dir)
    for sf in files.values():
        parse(src_dir, sf)
    # Re-export tables first (they are needed to resolve everything else).
    for sf in files.values():
        for mod, segs, alias, glob, public, _ in sf.uses:
            if not public:
                continue
            ab = absolute(sf, mod, segs, lib, True)
            if ab is None:
                continue
            if glob:
                sf.globs.append(ab)
            elif alias:
                sf.reexports[alias] = ab

    edges = defaultdict(set)
    why = {}
    for sf in files.values():
        refs = [(mod, segs, line, True) for mod, segs, _, _, _, line in sf.uses]
        refs += [(mod, segs, line, False) for mod, segs, line in sf.paths]
        for mod, segs, line, use_stmt in refs:
            ab = absolute(sf, mod, segs, lib, use_stmt)
            if ab is None:
                continue
            target = resolve(files, ab[0], ab[1])
            if target is None or target == sf.rel:
                continue
            edges[sf.rel].add(target)
            why.setdefault((sf.rel, target), []).append((line, "::".join(segs)))

    problems = 0
    unmapped = sorted({room(r) for r in files if room(r) is not None and room(r) not in TIERS})
    if unmapped:
        problems += len(unmapped)
        print(f"rooms without a tier: {', '.join(unmapped)}")

    upward = []
    for a in sorted(edges):
        for b in sorted(edges[a]):
            ra, rb = room(a), room(b)
            if ra is None or rb is None or ra not in TIERS or rb not in TIERS:
                continue
            if TIERS[rb] > TIERS[ra] or (ra, rb) in FORBIDDEN:
                upward.append((a, b))
    print(f"upward (or forbidden sideways) arrows: {len(upward)}")
    for a, b in upward:
        print(f"  src/{a} ({room(a)}) -> src/{b} ({room(b)}): {reasons(why[(a, b)])}")
    problems += len(upward)

    cycles = tarjan(files.keys(), edges)
    known = [c for c in cycles if any(set(c) <= k for k in KNOWN_CYCLES)]
    new = [c for c in cycles if c not in known]
    print(f"file-level cycles: {len(new)}")
    for c in new:
        print("  " + " <-> ".join(f"src/{f}" for f in c))
        for a in c:
            for b in sorted(edges[a] & set(c)):
                print(f"      src/{a} -> src/{b}: {reasons(why[(a, b)])}")
    problems += len(new)
    if known:
        print(f"known cycles (tracked, tolerated{'' if not strict else ' only without --strict'}): {len(known)}")
        for c in known:
            print("  " + " <-> ".join(f"src/{f}" for f in c))
            for a in c:
                for b in sorted(edges[a] & set(c)):
                    print(f"      src/{a} -> src/{b}: {reasons(why[(a, b)])}")
        if strict:
            problems += len(known)

    room_edges = defaultdict(set)
    for a in edges:
        for b in edges[a]:
            ra, rb = room(a), room(b)
            if ra and rb and ra != rb:
                room_edges[ra].add(rb)
    room_cycles = tarjan({room(r) for r in files if room(r)}, room_edges)
    print(f"room-level cycles: {len(room_cycles)}")
    for c in room_cycles:
        print("  " + " <-> ".join(c))
    problems += len(room_cycles)

    if show_edges:
        print("room arrows:")
        for a in sorted(room_edges):
            print(f"  {a} -> {', '.join(sorted(room_edges[a]))}")

    return 1 if problems else 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main(sys.argv[1:]))
