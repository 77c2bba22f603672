#!/usr/bin/env python3
"""Check that every cacheprobe metric the alert rules and the dashboard use is exported.

Usage (from the repository root):
  packaging/check-metrics.py                       # rules + dashboard against packaging/metrics.txt
  packaging/check-metrics.py --exports scrape.txt  # ... against a live scrape:
                                                   #   curl -s localhost:19150/metrics > scrape.txt
  packaging/check-metrics.py --promtool            # also syntax-check dashboard PromQL
  packaging/check-metrics.py --exports X FILE...   # other rule files (.yml) or dashboards (.json)
  packaging/check-metrics.py --runbooks README.md  # also: every #runbook-... link has a heading

Only names in the agent's namespace (cacheprobe_*) are checked; others (up, ALERTS) belong to
Prometheus. Histogram _bucket/_sum/_count series are checked by their base name. Where the
exports say which labels a metric has, label matchers in selectors (name{label=...}) are checked
too, which catches typos such as closedby= that would otherwise match nothing, silently.

Exit status: 0 when everything used is exported, 1 when something is not, 2 on unusable input.
Standard library only.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_EXPORTS = os.path.join(HERE, "metrics.txt")
DEFAULT_SOURCES = [
    os.path.join(HERE, "prometheus", "cacheprobe.rules.yml"),
    os.path.join(HERE, "grafana", "cacheprobe.json"),
]
PREFIX = "cacheprobe_"
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# A metric name (not preceded by a name character, a colon or a quote, so label values such as
# service="cacheprobe_x" and recording-rule names are not read as metrics) and an optional
# selector. Label values cannot contain an unescaped '"', so [^}"]|"(?:\\.|[^"\\])*" walks them.
METRIC_RE = re.compile(
    r'(?<![A-Za-z0-9_:"])(' + PREFIX + r'[A-Za-z0-9_]*)\s*(\{(?:[^}"]|"(?:\\.|[^"\\])*")*\})?'
)
MATCHER_RE = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"(?:\\.|[^"\\])*"')
TYPES = {"counter", "gauge", "histogram", "summary", "info", "stateset", "gaugehistogram", "untyped", "unknown"}


class InputError(Exception):
    pass


class Exports:
    """Exported metric names, with their type and label names when known."""

    def __init__(self):
        self.types = {}  # name -> type
        self.labels = {}  # name -> set of label names, or None when unknown

    def add(self, name, mtype, labels):
        self.types.setdefault(name, mtype)
        if labels is None:
            self.labels.setdefault(name, None)
        elif self.labels.get(name) is None:
            self.labels[name] = set(labels)
        else:
            self.labels[name] |= set(labels)

    def resolve(self, used):
        """The exported metric a used series name belongs to, or None."""
        if used in self.types:
            return used
        for suffix in HISTOGRAM_SUFFIXES:
            if used.endswith(suffix):
                base = used[: -len(suffix)]
                if self.types.get(base) in ("histogram", "summary", "gaugehistogram", None) and base in self.types:
                    return base
        return None


def load_metrics_list(text, origin):
    """packaging/metrics.txt: '<name> <type> <labels|->' per line, '#' comments."""
    exports = Exports()
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 3 or fields[1] not in TYPES:
            raise InputError(f"{origin}:{number}: expected '<name> <type> <labels|->', got {line!r}")
        name, mtype, labels = fields
        exports.add(name, mtype, [] if labels == "-" else labels.split(","))
    return exports


def load_exposition(text, origin):
    """A /metrics scrape (Prometheus text format 0.0.4 or OpenMetrics)."""
    exports = Exports()
    sample_re = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{.*\})?\s+\S+")
    declared = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            parts = line.split()
            if len(parts) >= 4:
                declared[parts[2]] = parts[3]
            continue
        if not line or line.startswith("#"):
            continue
        match = sample_re.match(line)
        if not match:
            continue
        name, selector = match.group(1), match.group(2) or ""
        labels = {m.group(1) for m in MATCHER_RE.finditer(selector)} - {"le", "quantile"}
        exported, mtype = name, declared.get(name)
        for suffix in HISTOGRAM_SUFFIXES + ("_total", "_created"):
            stem = name[: -len(suffix)] if name.endswith(suffix) else None
            stem_type = declared.get(stem) if stem else None
            if stem_type is None:
                continue
            if suffix == "_created":
                exported = None  # OpenMetrics creation timestamps are not metrics of their own
            elif suffix == "_total" and stem_type == "counter":
                exported, mtype = name, "counter"
            elif suffix in HISTOGRAM_SUFFIXES and stem_type in ("histogram", "summary", "gaugehistogram"):
                exported, mtype = stem, stem_type
            break
        if exported is not None:
            exports.add(exported, mtype or "untyped", labels)
    # Families declared but without samples yet (a labelled counter before its first event):
    # the name is exported, its labels are not known from this scrape.
    for name, mtype in declared.items():
        if mtype == "counter" and not name.endswith("_total"):
            name = name + "_total"
        if name not in exports.types:
            exports.add(name, mtype, None)
    if not exports.types:
        raise InputError(f"{origin}: no metrics found; is this a /metrics scrape?")
    return exports


def load_exports(path):
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as err:
        raise InputError(f"cannot read exports {path}: {err}") from err
    looks_like_scrape = any(
        line.startswith("# TYPE ") or re.match(r"^[A-Za-z_:][A-Za-z0-9_:]*(\{.*\})?\s+[-+0-9.eEINaf]+(\s|$)", line)
        and len(line.split()) == 2
        for line in text.splitlines()
    )
    return load_exposition(text, path) if looks_like_scrape else load_metrics_list(text, path)


def rule_expressions(text):
    """(line, expression) for each expr: of a Prometheus rules file, without a YAML parser."""
    lines = text.splitlines()
    found = []
    index = 0
    while index < len(lines):
        line = lines[index]
        match = re.match(r"^(\s*)(?:-\s+)?expr:\s*(.*)$", line)
        if not match:
            index += 1
            continue
        indent, value = len(match.group(1)), match.group(2).strip()
        start = index + 1
        if value and value[0] in "|>":
            block = []
            index += 1
            while index < len(lines) and (not lines[index].strip() or len(lines[index]) - len(lines[index].lstrip()) > indent):
                block.append(lines[index].strip())
                index += 1
            found.append((start, " ".join(block)))
            continue
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        found.append((start, value))
        index += 1
    return found


def dashboard_expressions(document):
    """(json path, expression) for every PromQL string of a Grafana dashboard: targets' expr and
    template variables' query/definition, in rows and in collapsed rows alike."""
    found = []

    def walk(node, path):
        if isinstance(node, dict):
            for key, value in node.items():
                here = f"{path}.{key}"
                if isinstance(value, str) and key in ("expr", "query", "definition"):
                    found.append((here, value))
                else:
                    walk(value, here)
        elif isinstance(node, list):
            for position, value in enumerate(node):
                walk(value, f"{path}[{position}]")

    walk(document, "$")
    return found


def load_source(path):
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as err:
        raise InputError(f"cannot read {path}: {err}") from err
    if path.endswith(".json"):
        try:
            document = json.loads(text)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}: invalid JSON: {err}") from err
        return [(f"{path}:{where}", expr) for where, expr in dashboard_expressions(document)]
    return [(f"{path}:{line}", expr) for line, expr in rule_expressions(text)]


RUNBOOK_LINK_RE = re.compile(r"https://github\.com/cacheprobe/cacheprobe#([A-Za-z0-9_-]+)")


def github_anchor(heading):
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def runbook_problems(sources, runbooks_path):
    """Links into the README (#anchor) from the sources that no heading of runbooks_path matches."""
    try:
        with open(runbooks_path, encoding="utf-8") as handle:
            headings = {github_anchor(m.group(1)) for m in re.finditer(r"(?m)^#{1,6}\s+(.+?)\s*#*\s*$", handle.read())}
    except OSError as err:
        raise InputError(f"cannot read runbooks {runbooks_path}: {err}") from err
    problems = []
    for source in sources:
        with open(source, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                for anchor in RUNBOOK_LINK_RE.findall(line):
                    if anchor not in headings:
                        problems.append(f"{source}:{number}: link #{anchor} has no heading in {runbooks_path}")
    return problems


def check(expressions, exports):
    """Problems found, as human-readable lines, and the set of metric names used."""
    problems = []
    used = set()
    for where, expr in expressions:
        for match in METRIC_RE.finditer(expr):
            name, selector = match.group(1), match.group(2) or ""
            used.add(name)
            metric = exports.resolve(name)
            if metric is None:
                problems.append(f"{where}: {name} is not exported")
                continue
            known = exports.labels.get(metric)
            if known is None:
                continue
            allowed = known | {"job", "instance"} | ({"le"} if name.endswith("_bucket") else set())
            for matcher in MATCHER_RE.finditer(selector):
                label = matcher.group(1)
                if label not in allowed and label != "__name__":
                    problems.append(
                        f"{where}: {name} has no label {label!r} (it has: {', '.join(sorted(known)) or 'none'})"
                    )
    return problems, used


def promql_syntax_problems(expressions):
    """Syntax-check expressions with promtool by wrapping them as recording rules. Grafana
    macros and variables are replaced by values of the same shape first."""
    promtool = shutil.which("promtool")
    if promtool is None:
        return ["--promtool: promtool is not installed"]
    substitutions = [
        ("$__rate_interval", "5m"), ("$__interval", "1m"), ("$__range", "1h"),
        ("${__range}", "1h"), ("${__rate_interval}", "5m"),
    ]
    problems = []
    for where, expr in expressions:
        if expr.lstrip().startswith("label_values("):
            inner = re.match(r"\s*label_values\((.*),\s*[A-Za-z_][A-Za-z0-9_]*\s*\)\s*$", expr, re.S)
            if not inner:
                problems.append(f"{where}: cannot read label_values() query {expr!r}")
                continue
            expr = inner.group(1)
        for macro, value in substitutions:
            expr = expr.replace(macro, value)
        expr = re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", r"\1", expr)
        with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as rules:
            json.dump({"groups": [{"name": "syntax", "rules": [{"record": "syntax_check", "expr": expr}]}]}, rules)
        try:
            result = subprocess.run([promtool, "check", "rules", rules.name], capture_output=True, text=True)
        finally:
            os.unlink(rules.name)
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()
            problems.append(f"{where}: PromQL does not parse: {detail[-1] if detail else 'promtool failed'}")
    return problems


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exports", default=DEFAULT_EXPORTS,
                        help="metrics.txt-style list or a saved /metrics scrape (default: %(default)s)")
    parser.add_argument("--promtool", action="store_true",
                        help="also syntax-check dashboard expressions with promtool")
    parser.add_argument("--runbooks", metavar="MARKDOWN",
                        help="check that every README anchor the sources link to is a heading here")
    parser.add_argument("sources", nargs="*", default=DEFAULT_SOURCES,
                        help="rule files (.yml) and Grafana dashboards (.json)")
    args = parser.parse_args(argv)
    try:
        exports = load_exports(args.exports)
        expressions = []
        dashboard_exprs = []
        for source in args.sources:
            found = load_source(source)
            if not found:
                raise InputError(f"{source}: no expressions found")
            expressions += found
            if source.endswith(".json"):
                dashboard_exprs += found
        problems, used = check(expressions, exports)
        if args.runbooks:
            problems += runbook_problems(args.sources, args.runbooks)
    except InputError as err:
        print(f"check-metrics: {err}", file=sys.stderr)
        return 2

    if args.promtool:
        problems += promql_syntax_problems(dashboard_exprs)
    problems = list(dict.fromkeys(problems))  # one line per place, however often a name repeats
    if problems:
        print(f"check-metrics: {len(problems)} problem(s) against {args.exports}:", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        missing = sorted({name for name in used if exports.resolve(name) is None})
        if missing:
            print(f"check-metrics: not exported: {', '.join(missing)}", file=sys.stderr)
        return 1
    unused = sorted(set(exports.types) - {exports.resolve(name) for name in used})
    print(f"check-metrics: ok: {len(used)} metric names in {len(expressions)} expressions "
          f"from {len(args.sources)} file(s) are exported by {args.exports}")
    if unused:
        print(f"check-metrics: exported but unused: {', '.join(unused)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
