# The `eligibility-bounds` validator (plugins/eligibility-bounds) ported to
# Rego, for the regorus comparison in BENCHMARKS.md and the parity test
# host/engine/tests/rego_parity.rs, which checks that both give the same
# findings (severity, JSON pointer, code; messages are not ported).
#
# input: {"policy": <the policy document>, "settings": <the plugin's settings>}
# query: data.eligibility.findings, a set of {severity, path, code}.
# Not ported: refusing unknown or inverted settings (the plugin's `Err`).
package eligibility

import rego.v1

default_bounds := {
	"age": {"min": 0, "max": 120},
	"income": {"min": 0, "max": 1000000},
	"percent": {"min": 0, "max": 100},
}

codes := {
	"age": "eligibility.age-range",
	"income": "eligibility.income-range",
	"percent": "eligibility.percent-range",
}

settings := object.get(input, "settings", {})

categories := object.get(settings, "categories", ["eligibility"])

# The policy's agency override, layered over the global settings.
default agency_overrides := {}

agency_overrides := object.get(object.get(settings, "agencies", {}), input.policy.agency, {}) if {
	is_string(input.policy.agency)
}

bound(kind, end) := v if {
	v := agency_overrides[kind][end]
} else := v if {
	v := settings[kind][end]
} else := v if {
	v := default_bounds[kind][end]
}

# Words of a key: split on anything not an ASCII letter or digit, lower-cased.
words(key) := {lower(w) | some w in regex.split(`[^A-Za-z0-9]`, key)}

kind(key) := "percent" if {
	count(words(key) & {"percent", "percentage", "pct"}) > 0
} else := "income" if {
	count(words(key) & {"income", "earnings", "wages", "salary"}) > 0
} else := "age" if {
	count(words(key) & {"age", "ages"}) > 0
}

# The kind of every rule in scope that has one, by the rule's index. An
# object keyed by index, not a set of [index, rule, kind]: a set would
# hash and compare whole rule objects to insert each one.
kinds[i] := k if {
	some i, rule in input.policy.rules
	is_string(rule.category)
	rule.category in categories
	is_string(rule.key)
	k := kind(rule.key)
}

within(k, v) if {
	v >= bound(k, "min")
	v <= bound(k, "max")
}

number_findings(ptr, k, v) := {{"severity": "error", "path": ptr, "code": codes[k]}} if {
	not within(k, v)
} else := {{"severity": "warning", "path": ptr, "code": "eligibility.percent-as-fraction"}} if {
	k == "percent"
	v > 0
	v < 1
} else := set()

has(obj, end) if {
	_ = obj[end]
}

is_range(v) if {
	is_object(v)
	some end in ["min", "max"]
	has(v, end)
}

# A plain number.
findings contains f if {
	some i, k in kinds
	rule := input.policy.rules[i]
	is_number(rule.value)
	some f in number_findings(sprintf("/rules/%d/value", [i]), k, rule.value)
}

# Each end of a range.
findings contains f if {
	some i, k in kinds
	rule := input.policy.rules[i]
	is_range(rule.value)
	some end in ["min", "max"]
	x := rule.value[end]
	is_number(x)
	some f in number_findings(sprintf("/rules/%d/value/%s", [i, end]), k, x)
}

findings contains {"severity": "error", "path": sprintf("/rules/%d/value/%s", [i, end]), "code": "eligibility.not-a-number"} if {
	some i, _ in kinds
	rule := input.policy.rules[i]
	is_range(rule.value)
	some end in ["min", "max"]
	x := rule.value[end]
	not is_number(x)
}

findings contains {"severity": "error", "path": sprintf("/rules/%d/value", [i]), "code": "eligibility.inverted-range"} if {
	some i, _ in kinds
	rule := input.policy.rules[i]
	is_range(rule.value)
	is_number(rule.value.min)
	is_number(rule.value.max)
	rule.value.min > rule.value.max
}

# Neither a number nor a range (or no value at all).
findings contains {"severity": "error", "path": sprintf("/rules/%d/value", [i]), "code": "eligibility.not-a-number"} if {
	some i, _ in kinds
	rule := input.policy.rules[i]
	not is_number(rule.value)
	not is_range(rule.value)
}
