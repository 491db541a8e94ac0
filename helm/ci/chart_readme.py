"""Writes the values table of helm/ringcache/README.md from the chart's
schema (descriptions, types) and values.yaml (defaults), between the
`values:start` and `values:end` markers; `--check` fails if it is stale.

    python3 helm/ci/chart_readme.py           # rewrite the table
    python3 helm/ci/chart_readme.py --check   # scripts/check-helm.sh runs this
"""

import json
import sys
from pathlib import Path

import yaml

CHART = Path(__file__).resolve().parent.parent / "ringcache"
START, END = "<!-- values:start -->", "<!-- values:end -->"


def rows(schema, values, prefix=""):
    """One row per leaf of the schema (objects without properties are leaves)."""
    for name, prop in schema.get("properties", {}).items():
        key = f"{prefix}{name}"
        value = values.get(name) if isinstance(values, dict) else None
        if prop.get("properties"):
            yield from rows(prop, value if isinstance(value, dict) else {}, key + ".")
            continue
        kind = prop.get("type", "")
        if isinstance(kind, list):
            kind = " or ".join(kind)
        default = json.dumps(value, separators=(", ", ": ")) if value is not None else ""
        text = " ".join(prop.get("description", "").split()).replace("|", "\\|")
        yield f"| `{key}` | {kind} | `{default}` | {text} |".replace("``", "")


def table():
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    lines = ["| value | type | default | what it does |", "| --- | --- | --- | --- |"]
    lines += list(rows(schema, values))
    return "\n".join(lines)


def main():
    readme = CHART / "README.md"
    text = readme.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{START}\n{table()}\n{END}{tail}"
    if "--check" in sys.argv[1:]:
        if new != text:
            sys.exit("helm/ringcache/README.md: the values table is stale: run python3 helm/ci/chart_readme.py")
        print("chart README: values table up to date")
        return
    readme.write_text(new)


if __name__ == "__main__":
    main()
