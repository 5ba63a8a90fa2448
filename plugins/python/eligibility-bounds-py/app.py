"""eligibility-bounds-py: the `eligibility-bounds` validator, in Python.

The same check as the Rust plugin in `plugins/eligibility-bounds` (see its
crate docs for the rules): same settings, same codes, same JSON pointers
and the same messages, so tests/all/python_plugin.rs can compare the findings
of both on the same policies. Numbers are printed as Rust prints an f64
(`650`, not `650.0`), because the messages are compared too.

Built with componentize-py against `wit/v0.1.0` (see README.md).
"""

import json
import re
from decimal import Decimal

from componentize_py_types import Err
from wit_world import WitWorld as _World
from wit_world.imports import host
from wit_world.imports.types import Context, Diagnostic, Policy, Severity

NAME = "eligibility-bounds-py"

# (code, noun) per kind; the kind comes from the words of the rule key.
KINDS = {
    "age": ("eligibility.age-range", "age"),
    "income": ("eligibility.income-range", "income threshold"),
    "percent": ("eligibility.percent-range", "percentage"),
}
DEFAULTS = {"age": (0.0, 120.0), "income": (0.0, 1_000_000.0), "percent": (0.0, 100.0)}
MISSING = object()


class SettingsError(Exception):
    """The [settings] table is unusable: a plugin fault, not a finding."""


def classify(key):
    """The kind of quantity a rule key names, or None."""
    words = {w.lower() for w in re.split(r"[^A-Za-z0-9]", key)}
    if words & {"percent", "percentage", "pct"}:
        return "percent"
    if words & {"income", "earnings", "wages", "salary"}:
        return "income"
    if words & {"age", "ages"}:
        return "age"
    return None


def is_number(v):
    # JSON true/false arrive as Python bools, which are ints.
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def fmt(v):
    """An f64 as Rust's `{}` prints it: shortest round trip, no exponent."""
    text = format(Decimal(repr(float(v))), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def found(v):
    """A JSON value as serde_json prints it in a message."""
    return json.dumps(v, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def pointer(*segments):
    """An RFC 6901 JSON pointer."""
    return "".join("/" + str(s).replace("~", "~0").replace("/", "~1") for s in segments)


def read_bound(where, raw):
    if not isinstance(raw, dict):
        raise SettingsError(f"{where} must be a table {{min, max}}, found {found(raw)}")
    for k, v in raw.items():
        if k not in ("min", "max"):
            raise SettingsError(f"unknown field `{k}` in {where}, expected `min` or `max`")
        if v is not None and not is_number(v):
            raise SettingsError(f"{where}.{k} must be a number, found {found(v)}")
    return raw


def read_overrides(where, raw):
    if not isinstance(raw, dict):
        raise SettingsError(f"{where} must be a table, found {found(raw)}")
    out = {}
    for k, v in raw.items():
        if k not in KINDS:
            raise SettingsError(f"unknown field `{k}` in {where}")
        if v is not None:
            out[k] = read_bound(f"{where}.{k}", v)
    return out


def bounds(settings, agency):
    """Defaults, then the settings, then the agency's override."""
    if settings is None:
        settings = {}
    if not isinstance(settings, dict):
        raise SettingsError(f"[settings] must be a table, found {found(settings)}")
    categories = settings.get("categories")
    if categories is None:
        categories = ["eligibility"]
    elif not (isinstance(categories, list) and all(isinstance(c, str) for c in categories)):
        raise SettingsError(f"categories must be a list of strings, found {found(categories)}")
    agencies = settings.get("agencies", {})
    if not isinstance(agencies, dict):
        raise SettingsError(f"agencies must be a table, found {found(agencies)}")
    top = {k: v for k, v in settings.items() if k not in ("categories", "agencies")}
    layers = [read_overrides("[settings]", top)]
    layers += [read_overrides(f"agencies.{a}", o) for a, o in agencies.items() if a == agency]
    b = dict(DEFAULTS)
    for layer in layers:
        for kind, o in layer.items():
            lo, hi = b[kind]
            lo = o.get("min") if o.get("min") is not None else lo
            hi = o.get("max") if o.get("max") is not None else hi
            b[kind] = (lo, hi)
    for kind, (lo, hi) in b.items():
        if lo is not None and hi is not None and lo > hi:
            raise SettingsError(
                f"[settings] bound `{kind}` has min {fmt(lo)} > max {fmt(hi)}; swap them"
            )
    return categories, b


def describe(lo, hi):
    if lo is not None and hi is not None:
        return f"{fmt(lo)} to {fmt(hi)}"
    if lo is not None:
        return f"at least {fmt(lo)}"
    if hi is not None:
        return f"at most {fmt(hi)}"
    return "anything"


class Findings:
    def __init__(self):
        self.items = []

    def add(self, severity, path, code, message):
        self.items.append(Diagnostic(severity, path, code, message))


def check_number(key, kind, bound, v, path, out):
    lo, hi = bound
    code, noun = KINDS[kind]
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        out.add(
            Severity.ERROR, path, code,
            f"rule `{key}`: {noun} {fmt(v)} is outside the allowed range "
            f"({describe(lo, hi)}); fix the value or adjust this agency's bounds "
            "in the plugin settings",
        )
    elif kind == "percent" and 0 < v < 1:
        out.add(
            Severity.WARNING, path, "eligibility.percent-as-fraction",
            f"rule `{key}`: percentage {fmt(v)} looks like a fraction; percentages "
            f"are written 0 to 100 (did you mean {fmt(float(v) * 100.0)}?)",
        )


def check_rule(index, key, value, kind, bound, out):
    at = pointer("rules", index, "value")
    if is_number(value):
        check_number(key, kind, bound, float(value), at, out)
    elif isinstance(value, dict) and ("min" in value or "max" in value):
        ends = {}
        for end in ("min", "max"):
            if end not in value:
                continue
            v = value[end]
            if is_number(v):
                ends[end] = float(v)
                check_number(key, kind, bound, float(v), f"{at}/{end}", out)
            else:
                out.add(
                    Severity.ERROR, f"{at}/{end}", "eligibility.not-a-number",
                    f"rule `{key}`: range {end} must be a number, found {found(v)}",
                )
        if "min" in ends and "max" in ends and ends["min"] > ends["max"]:
            out.add(
                Severity.ERROR, at, "eligibility.inverted-range",
                f"rule `{key}`: range min {fmt(ends['min'])} is greater than max "
                f"{fmt(ends['max'])}",
            )
    else:
        shown = "nothing" if value is MISSING else found(value)
        out.add(
            Severity.ERROR, at, "eligibility.not-a-number",
            f"rule `{key}` is an {KINDS[kind][1]} and must be a number or "
            f'{{"min", "max"}}, found {shown}',
        )


def check(document, settings):
    """The whole check over a parsed policy document and settings."""
    agency = document.get("agency") if isinstance(document, dict) else None
    categories, b = bounds(settings, agency if isinstance(agency, str) else None)
    rules = document.get("rules") if isinstance(document, dict) else None
    out = Findings()
    checked = 0
    for index, rule in enumerate(rules if isinstance(rules, list) else []):
        if not isinstance(rule, dict):
            continue
        key, category = rule.get("key"), rule.get("category")
        kind = classify(key) if isinstance(key, str) else None
        if isinstance(category, str) and category in categories and kind:
            checked += 1
            check_rule(index, key, rule.get("value", MISSING), kind, b[kind], out)
    host.log(
        host.Level.DEBUG,
        f"{NAME}: checked {checked} rule(s), {len(out.items)} finding(s)",
    )
    return out.items


class WitWorld(_World):
    def validate(self, policy: Policy, context: Context) -> list[Diagnostic]:
        try:
            document = json.loads(policy.document)
            settings = json.loads(context.settings) if context.settings.strip() else {}
        except ValueError as e:
            raise Err(f"{NAME}: the host sent invalid JSON: {e}")
        try:
            return check(document, settings)
        except SettingsError as e:
            raise Err(f"{NAME}: invalid [settings]: {e}")
