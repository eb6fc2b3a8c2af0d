"""MkDocs hook: the configuration reference, generated from the config dataclasses at build time.

A page that holds the marker ``<!-- config-reference -->`` gets, in its place, one table per config
section (key, type, default, description). Descriptions are the ``# comment`` of each field in the
source (trailing on the field's line, or the comment lines directly above it); a section's intro is
its class docstring. Nothing in the table is typed by hand, so it cannot drift from the code.
"""

from __future__ import annotations

import ast
import dataclasses
import html
import inspect
import io
import textwrap
import tokenize

MARKER = "<!-- config-reference -->"


def sections() -> list:
    """(section name, dataclass) pairs, in the order of the reference: the fields of the top-level
    Config, and in place of ``method`` one section per registered method (its own dataclass, defined
    in its module). The one place that knows where the config sections come from. A name may carry a
    qualifier after a space, e.g. ("method (moco)", MoCoConfig): its first word is the key prefix."""
    from ssl_sphere import config, methods

    out = []
    for f in dataclasses.fields(config.Config):
        if f.name in config.RECORDS:
            continue
        if f.name == "method":
            out += [(f"method ({name})", methods.get(name).Config) for name in methods.names()]
        else:
            out.append((f.name, f.default_factory))
    return out


def _comments(cls) -> tuple:
    """(class docstring, {field name: comment}) read from the class's source."""
    src = textwrap.dedent(inspect.getsource(cls))
    tree = ast.parse(src).body[0]
    by_line = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            by_line[tok.start[0]] = (tok.line.strip().startswith("#"), tok.string.lstrip("#").strip())
    out = {}
    for node in tree.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        own = by_line.get(node.lineno)
        if own and not own[0]:  # trailing comment on the field's own line
            out[node.target.id] = own[1]
            continue
        above, line = [], node.lineno - 1  # else the whole-line comments directly above it
        while line in by_line and by_line[line][0]:
            above.insert(0, by_line[line][1])
            line -= 1
        out[node.target.id] = " ".join(above)
    return ast.get_docstring(tree) or "", out


def _annotation(cls, name: str) -> str:
    src = textwrap.dedent(inspect.getsource(cls))
    for node in ast.parse(src).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
            return ast.get_source_segment(src, node.annotation)
    return "?"


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if isinstance(value, float):
        value = round(value, 6)
    elif isinstance(value, list):
        value = [round(v, 6) if isinstance(v, float) else v for v in value]
    return f"`{value!r}`"


def _cell(text: str) -> str:
    """Plain text for a markdown table cell: no HTML, no column breaks, no link syntax (a source tag such
    as [lightly] next to [solo] would read as a reference link)."""
    return html.escape(text, quote=False).replace("|", "\\|").replace("[", "&#91;").replace("]", "&#93;") or "–"


def section_table(name: str, cls) -> str:
    doc, comments = _comments(cls)
    prefix = name.split()[0]
    lines = [f"### `{name}`", ""]
    if doc:
        lines += [_cell(" ".join(doc.split())), ""]
    lines += ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for f in dataclasses.fields(cls):
        lines.append(f"| `{prefix}.{f.name}` | `{_annotation(cls, f.name)}` | {_default(f)} | "
                     f"{_cell(comments.get(f.name, ''))} |")
    return "\n".join(lines)


def reference() -> str:
    return "\n\n".join(section_table(name, cls) for name, cls in sections())


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, reference())
    return markdown
